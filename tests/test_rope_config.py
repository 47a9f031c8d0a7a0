"""RoPE settings read exactly as transformers reads them, or refused when the config is ambiguous."""

from __future__ import annotations

import itertools

import pytest

from boomerang_jax.models.config import ConfigError, ModelConfig

BASE = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
NEW = {  # transformers-5 `rope_parameters`
    "none": None,
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear2": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}
LEGACY = {  # older `rope_scaling`
    "none": None,
    "linear2": {"type": "linear", "factor": 2.0},
    "linear3": {"type": "linear", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


def _hf_dict(new, legacy) -> dict:
    d = dict(BASE)
    if new is not None:
        d["rope_parameters"] = dict(new)
    if legacy is not None:
        d["rope_scaling"] = dict(legacy)
    return d


def _agree(new, legacy) -> bool:
    if new is None or legacy is None:
        return True
    norm = lambda d: {("rope_type" if k == "type" else k): v for k, v in d.items() if k != "rope_theta"}  # noqa: E731
    return norm(new) == norm(legacy)


@pytest.mark.parametrize("new_name,legacy_name", list(itertools.product(NEW, LEGACY)))
def test_rope_settings_follow_transformers_or_are_refused_when_ambiguous(new_name, legacy_name):
    from transformers import AutoConfig

    new, legacy = NEW[new_name], LEGACY[legacy_name]
    hf = _hf_dict(new, legacy)
    spec = dict(hf)
    theirs = AutoConfig.for_model(spec.pop("model_type"), **spec).rope_parameters  # the independent truth
    if not _agree(new, legacy):
        # what the error says: transformers silently takes rope_scaling
        assert theirs["rope_type"] == legacy.get("type", legacy.get("rope_type"))
        assert theirs["factor"] == legacy["factor"]
        with pytest.raises(ConfigError, match=r"config.json: rope_parameters .* rope_scaling .* disagree"):
            ModelConfig.from_hf(hf)
        return
    ours = ModelConfig.from_hf(hf)
    assert ours.rope_type == theirs["rope_type"]
    assert ours.rope_theta == theirs["rope_theta"]
    if theirs["rope_type"] != "default":
        assert ours.rope_factor == theirs["factor"]
    if theirs["rope_type"] == "llama3":
        assert (ours.rope_low_freq_factor, ours.rope_high_freq_factor, ours.rope_original_max_positions) == (
            theirs["low_freq_factor"], theirs["high_freq_factor"], theirs["original_max_position_embeddings"])


def test_the_ambiguous_case_of_the_hardening_report_is_refused():
    # transformers 5 writes rope_parameters (rope_type default); a legacy rope_scaling added by hand used to be
    # dropped here while transformers applied it
    hf = _hf_dict(NEW["default"], {"type": "linear", "factor": 4.0})
    with pytest.raises(ConfigError, match=r"disagree on \['factor', 'rope_type'\]"):
        ModelConfig.from_hf(hf)

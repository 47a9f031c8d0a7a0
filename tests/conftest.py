"""Shared test helpers: tiny random HF models built by transformers from a config and saved to a temp dir."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gcsfs >= 2026.x otherwise probes gRPC/TLS endpoints that the plain-HTTP GCS emulator lacks (read at import).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# libtpu (the tpu extra, for ahead-of-time TPU compiles) takes a machine-wide lock when loaded; tests never use a
# real TPU, and their subprocesses load it too.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Odd shapes per family: GQA ratios, head_dim != hidden/heads, tied and untied, partial rotary,
# parallel residual on/off, llama3 rope scaling, biases.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-gqa3-tied-llama3rope": dict(
        model_type="llama", vocab_size=160, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16),
    ),
    "llama-mha-untied-bias-headdim": dict(
        model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=72, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False,
        attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
    "qwen3-gqa4-untied": dict(
        model_type="qwen3", vocab_size=150, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    "qwen3-gqa2-tied": dict(
        model_type="qwen3", vocab_size=128, hidden_size=40, intermediate_size=56, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    ),
    "neox-partial-parallel": dict(
        model_type="gpt_neox", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.25),
    ),
    "neox-sequential-fullrotary-gelu_new": dict(
        model_type="gpt_neox", vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=3, use_parallel_residual=False, tie_word_embeddings=False, hidden_act="gelu_new",
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0),
    ),
}


# Eight-layer models for surgery: the default plan gives blocks {0,1},{2,3},{4,5},{6},{7};
# first=2,last=1 gives {0},{1,2},{3,4},{5,6},{7}.
EIGHT_LAYER_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-tied": dict(
        model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
    ),
    "qwen3-untied": dict(
        model_type="qwen3", vocab_size=80, hidden_size=32, intermediate_size=40, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
    ),
    "qwen3-tied": dict(
        model_type="qwen3", vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=8,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
    ),
    "neox": dict(
        model_type="gpt_neox", vocab_size=72, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
        num_attention_heads=4, use_parallel_residual=True, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
    ),
}


def build_hf_model(spec: dict[str, Any], seed: int = 0, scale: float = 0.2):
    """A random transformers model from a config dict; weights perturbed so every parameter matters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = copy.deepcopy(spec)  # transformers edits nested dicts (rope_parameters) in place
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def save_tiny(path: Path, name: str, seed: int = 0):
    """Build TINY_CONFIGS[name], save it to `path` as an HF dir, and return the torch model."""
    model = build_hf_model(TINY_CONFIGS[name], seed)
    model.save_pretrained(path)
    return model


WORDS = "the cat sat on a mat and dog ran to big red house".split()


def word_model(path, num_layers: int):
    """A tiny llama saved with a word-level tokenizer over WORDS (id 1 = </s>); returns (model, tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    model = build_hf_model(dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                eos_token_id=1, tie_word_embeddings=False))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_name(request) -> str:
    return request.param


@pytest.fixture
def tiny(tmp_path, tiny_name):
    """(transformers model, our Model) of one TINY_CONFIGS family, saved and reloaded from an HF dir."""
    from boomerang_jax.hf.load import load_hf

    model = save_tiny(tmp_path / tiny_name, tiny_name)
    return model, load_hf(tmp_path / tiny_name)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A local GCS emulator for the whole session, with every client pointed at it through its documented
    endpoint variable (tests/gcs_emulator.py) and a private model cache; yields the emulator."""
    from boomerang_jax.infra import storage
    from tests.gcs_emulator import GcsEmulator

    emu = GcsEmulator(tmp_path_factory.mktemp("fake-gcs")).start()
    env = {**emu.env(), storage.CACHE_ENV: str(tmp_path_factory.mktemp("boomerang-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # subprocesses (boomerang distill, ...) inherit it
    storage._filesystem.cache_clear()
    try:
        yield emu
    finally:
        emu.stop()
        storage._filesystem.cache_clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(gcs, request) -> str:
    """A fresh, empty bucket per test: gs://<test-name-derived>."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{os.getpid() % 1000}"
    return gcs.create_bucket(name)


# A short English text and a word-level tokenizer over it: tiny models that read real sentences (lm-eval tests).
WORDS_TEXT = """The quick brown fox jumps over the lazy sleeping dog tonight. A small green frog sat quietly on the
floating water lily. Every morning the old baker sells fresh bread to the village. The tired children walked
home slowly after the long football match. My neighbour plants bright yellow flowers along the garden fence.
The captain steered the wooden ship through the stormy northern waters. Our teacher explained the difficult
lesson again with great patience. The hungry cat waited beside the kitchen door for dinner."""


def word_tokenizer(text: str = WORDS_TEXT):
    """A transformers fast tokenizer with one id per word (and '.') of `text`; 0 = <unk>, 1 = </s> (EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for w in text.replace(".", " . ").split()})
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")

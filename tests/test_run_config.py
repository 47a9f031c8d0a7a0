"""The typed run config (distill/config.py) and the one plan parser (LayerPlan.from_spec) it and the CLI use."""

from __future__ import annotations

import json

import pytest

from boomerang_jax.distill.config import RunConfig, RunConfigError, build_run_config, load_run_config
from boomerang_jax.distill.optim import TrainConfig
from boomerang_jax.infra.parallel import MeshConfig
from boomerang_jax.surgery.plan import LayerPlan, PlanError


def test_from_spec_reads_every_form_of_a_plan(tmp_path):
    want = LayerPlan.from_knobs(8, every=2, first=1, last=2)
    assert LayerPlan.from_spec("every=2,first=1,last=2", 8) == want
    assert LayerPlan.from_spec({"every": 2, "first": 1, "last": 2}, 8) == want
    assert LayerPlan.from_spec({"kept": list(want.kept)}, 8) == want
    assert LayerPlan.from_spec(want.to_dict(), 8) == want
    assert LayerPlan.from_spec(f"kept={','.join(map(str, want.kept))}", 8) == want
    plan_file, family_file, bad = tmp_path / "plan.json", tmp_path / "family.json", tmp_path / "bad.json"
    plan_file.write_text(want.to_json())
    family_file.write_text(json.dumps({"format": "boomerang-family", "plan": want.to_dict(), "sizes": []}))
    bad.write_text("{not json")
    assert LayerPlan.from_spec(str(plan_file), 8) == want
    assert LayerPlan.from_spec(str(family_file), 8) == want
    with pytest.raises(PlanError, match="not valid JSON"):
        LayerPlan.from_spec(str(bad), 8)
    with pytest.raises(PlanError, match=r"unknown key\(s\) \['stride'\]"):
        LayerPlan.from_spec({"stride": 2}, 8)
    with pytest.raises(PlanError, match="cannot read 3"):
        LayerPlan.from_spec(3, 8)


def test_run_config_is_typed_and_keeps_the_dict_it_was_parsed_from():
    cfg = load_run_config(None, ["data.train.path=x", "train.lr=3e-4", "mesh=data=2,fsdp=-1", "plan.every=3",
                                 "data.eval={path: y, batch_size: 4}"])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.train, TrainConfig) and cfg.train.lr == 3e-4
    assert cfg.mesh == MeshConfig(data=2, fsdp=-1, tensor=1)
    assert cfg.data.train_batch_size == 8 and cfg.data.eval_batch_size == 4
    assert cfg.layer_plan(8) == LayerPlan.from_knobs(8, every=3, first=1, last=2)
    d = cfg.to_dict()  # what checkpoints record: the merged dict, only the keys that were given
    assert d["train"] == {"lr": 3e-4} and d["mesh"] == "data=2,fsdp=-1" and RunConfig.from_dict(d) == cfg
    with pytest.raises(RunConfigError, match="plan: cannot read 5"):
        RunConfig.from_dict({**d, "plan": 5})


def test_a_run_config_built_as_data_equals_the_same_settings_given_as_overrides():
    built = build_run_config({"data": {"train": {"path": "x", "batch_size": 4}}, "train": {"lr": 1e-3}},
                             ["loss.w_kl=1"])
    parsed = load_run_config(None, ["data.train={path: x, batch_size: 4}", "train.lr=1e-3", "loss.w_kl=1"])
    assert built == parsed and built.to_dict() == parsed.to_dict()
    with pytest.raises(RunConfigError, match=r"unknown section\(s\) \['trian'\]"):
        build_run_config({"trian": {}})
    with pytest.raises(ValueError, match="train.lr must be a number > 0, got -1"):
        build_run_config({"data": {"train": {"path": "x"}}, "train": {"lr": -1}})

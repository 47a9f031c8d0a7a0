"""The memory planner, topologies, presets and FLOPs: exact state bytes equal what the train step allocates."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from boomerang_jax.cli import main as cli_main
from boomerang_jax.distill.config import RunConfigError, load_run_config
from boomerang_jax.infra.topology import TopologyError, generation_of, parse_topology
from boomerang_jax.pod.planning import PlanningError, activation_parts, estimate_memory, run_flops, run_shape

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/paper-*.yaml"))

# A tiny Qwen3 teacher whose every dimension splits over 2 x 2 x 2 and 8 devices (and one that does not: head_dim
# norms), allocated for real by the train step on 8 CPU devices, then measured leaf by leaf.
_ALLOCATE = r"""
import json, sys
import jax, numpy as np
from boomerang_jax.infra import parallel
from boomerang_jax.distill.loss import LossConfig
from boomerang_jax.distill.optim import TrainConfig
from boomerang_jax.distill.step import Distiller
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import init_params
from boomerang_jax.pod.planning import RunShape, state_bytes
from boomerang_jax.surgery import LayerPlan, prune

teacher = ModelConfig.from_hf(dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                   tie_word_embeddings=False))
plan = LayerPlan.from_knobs(6)
params = init_params(teacher, jax.random.key(0))
student, s_params = prune(params, teacher, plan)
out = []
for mesh_spec, micro in (({"data": 2, "fsdp": 2, "tensor": 2}, 1), ({"data": 1, "fsdp": 8, "tensor": 1}, 2),
                         ({"data": 1, "fsdp": 2, "tensor": 4}, 1)):
    tcfg = TrainConfig(micro_batches=micro, param_dtype="float32", teacher_dtype="bfloat16", compute_dtype="float32")
    mesh = parallel.make_mesh(mesh_spec)
    d = Distiller(student, teacher, plan, mesh, tcfg, LossConfig())
    state = d.init_state(s_params)
    t = d.put_teacher(params)
    allocated = {"params": parallel.bytes_per_device(state.params), "opt_state": parallel.bytes_per_device(state.opt_state),
                 "teacher": parallel.bytes_per_device(t), "step": parallel.bytes_per_device(state.step)}
    planned = state_bytes(RunShape(teacher, student, plan, tcfg, LossConfig(), 8, 16), mesh_spec)
    out.append({"mesh": mesh_spec, "planned": planned,
                "allocated": {k: sorted(set(v.values())) for k, v in allocated.items()}})
print("RESULT " + json.dumps(out))
"""


def test_planned_state_bytes_equal_the_arrays_the_train_step_allocates():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _ALLOCATE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for r in results:
        for key, per_device in r["allocated"].items():
            assert per_device == [r["planned"][key]], (r["mesh"], key, per_device, r["planned"][key])
    sharded, replicated_ = results[1]["planned"], results[0]["planned"]
    assert sharded["params"] < replicated_["params"]  # fsdp=8 splits more than fsdp=2 x tensor=2


def test_plan_memory_command_on_a_paper_config_is_offline_and_covers_every_preset(capsys):
    path = REPO / "configs" / "paper-qwen3-4b-base.yaml"
    assert cli_main(["plan-memory", "--config", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    presets = list(load_run_config(path).presets)
    assert [t["topology"] for t in out["topologies"]] == presets and "v5p-128" in presets
    assert all(isinstance(t["fits"], bool) and t["total"] > 0 for t in out["topologies"])
    v5p = next(t for t in out["topologies"] if t["topology"] == "v5p-128")
    assert v5p["mesh"] == {"data": 1, "fsdp": 64, "tensor": 1} and v5p["rows_per_device"] == 16
    multi = next(t for t in out["topologies"] if t["topology"] == "2xv5p-128")
    assert multi["mesh"] == {"data": 2, "fsdp": 64, "tensor": 1}
    assert cli_main(["plan-memory", "--config", str(path), "--topology", "v5e-256", "train.micro_batches=16"]) == 2
    assert "does not split over data x fsdp = 256 devices" in capsys.readouterr().out


def test_every_gpu_preset_of_every_paper_config_fits_by_the_estimate():
    """GPU presets are judged by plan-memory (no ahead-of-time GPU compile here; it errs high, measured on an
    H200). TPU presets are judged by XLA itself: tests/test_aot.py checks the recorded compiles."""
    for path in CONFIGS:
        for name in load_run_config(path).presets:
            if parse_topology(name).kind != "gpu":
                continue
            cfg = load_run_config(path, preset=name)
            plan = estimate_memory(run_shape(cfg), name, cfg.mesh)
            assert plan.fits, (path.name, name, plan.table())


def test_presets_merge_before_overrides_and_unknown_presets_are_errors(tmp_path):
    path = REPO / "configs" / "paper-qwen3-8b-base.yaml"
    cfg = load_run_config(path, ["train.micro_batches=3"], preset="v5p-128")
    assert cfg.train.micro_batches == 3 and cfg.train.lr == 3e-4 and cfg.mesh.fsdp == -1
    with pytest.raises(RunConfigError, match=r"no preset 'v9-8' in this config; presets: \[.*'v5p-128'"):
        load_run_config(path, preset="v9-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: {path: x}}\npresets: {v4-8: {optimizer: {lr: 1}}}\n")
    with pytest.raises(RunConfigError, match=r"preset 'v4-8': unknown section\(s\) \['optimizer'\]"):
        load_run_config(bad, preset="v4-8")


def test_activation_estimate_follows_rows_and_remat():
    shape = run_shape(load_run_config(REPO / "configs" / "paper-pythia-2.8b.yaml"))
    sizes = {"data": 1, "fsdp": 64, "tensor": 1}

    def total(**train) -> int:
        s = dataclasses.replace(shape, train=dataclasses.replace(shape.train, **train))
        return sum(b for _, b in activation_parts(s, sizes))

    assert total(micro_batches=8) < total(micro_batches=4) < total(micro_batches=2)
    assert total(micro_batches=4, remat="full") < total(micro_batches=4, remat="dots") < total(
        micro_batches=4, remat="none")
    with pytest.raises(PlanningError, match="does not split over data x fsdp = 64"):
        total(micro_batches=64)


def test_topologies():
    v5p = parse_topology("v5p-128")
    assert (v5p.chips, v5p.hosts, v5p.accelerator_type, v5p.runtime_version) == (64, 16, "v5p-128", "v2-alpha-tpuv5")
    v5e = parse_topology("v5e-16")
    assert (v5e.chips, v5e.hosts, v5e.accelerator_type, v5e.runtime_version) == (
        16, 4, "v5litepod-16", "v2-alpha-tpuv5-lite")
    assert parse_topology("v5litepod-8").hosts == 1 and parse_topology("v5e-8").name == "v5e-8"
    v4 = parse_topology("v4-8")
    assert (v4.chips, v4.hosts, v4.runtime_version) == (4, 1, "tpu-ubuntu2204-base")
    multi = parse_topology("2xv5p-128")
    assert (multi.chips, multi.hosts, multi.slices, multi.accelerator_type) == (128, 32, 2, "v5p-128")
    assert parse_topology("h100x8").hbm_bytes == 80 * 10**9
    for bad, msg in [("v5p-7", "multiple of 2"), ("v5e-512", "at most 256"), ("v5e-24", "power-of-two"), ("v4-12", "multiples of 4"),
                     ("tpu-9", "unknown topology")]:
        with pytest.raises(TopologyError, match=msg):
            parse_topology(bad)


def test_run_flops_of_the_paper_pairs_match_the_papers_sizes_and_compute():
    sizes = {"qwen3-4b-base": (2.31, 4.02), "qwen3-8b-base": (4.91, 8.19), "llama-3.2-3b": (1.90, 3.21),
             "pythia-2.8b": (1.60, 2.78), "pythia-6.9b": (3.84, 6.86)}
    from boomerang_jax.surgery import count_params

    for path in CONFIGS:
        shape = run_shape(load_run_config(path))
        student, teacher = sizes[path.stem.removeprefix("paper-")]
        assert round(count_params(shape.student).total / 1e9, 2) == student, path
        assert round(count_params(shape.teacher).total / 1e9, 2) == teacher, path
        assert shape.tokens == 500 * 2048 * 2048
    flops = run_flops(run_shape(load_run_config(REPO / "configs" / "paper-qwen3-4b-base.yaml")))
    assert 0.9 < flops["6ND+2ND"] / 4.31e19 < 1.15 and 1.0 < flops["ours"] / 4.31e19 < 1.3  # paper: 4.31e19


def test_device_kinds_map_to_the_generation_tables_used_for_mfu_and_planning():
    # JAX's device_kind strings as the runtimes report them; the MFU estimate and planning share one table
    assert {k: generation_of(k).name for k in ("TPU v4", "TPU v5 lite", "TPU v5e", "TPU v5p", "TPU v5",
                                               "TPU v6 lite", "NVIDIA H100 80GB HBM3", "NVIDIA H200",
                                               "NVIDIA A100-SXM4-80GB", "NVIDIA L4")} == {
        "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5p": "v5p", "TPU v5": "v5p",
        "TPU v6 lite": "v6e", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200",
        "NVIDIA A100-SXM4-80GB": "a100", "NVIDIA L4": "l4"}
    assert generation_of("TPU v5 lite").peak_tflops == parse_topology("v5e-8").generation.peak_tflops
    assert generation_of("cpu") is None

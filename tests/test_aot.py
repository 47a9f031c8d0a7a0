"""Ahead-of-time TPU compilation on this CPU host (libtpu's topology descriptions), and the multi-host batch
assembly checked against the real process layout of TPU slices.

The truth here is XLA's own memory analysis (the arguments of a compiled step must be exactly the sharded
bytes of its state, teacher and batch) and libtpu's devices (their process indices and torus order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason="the tpu extra (jax[tpu]) is part of the test install")

from boomerang_jax.infra import parallel  # noqa: E402
from boomerang_jax.cli import main as cli_main  # noqa: E402
from boomerang_jax.distill.loss import LossConfig  # noqa: E402
from boomerang_jax.distill.optim import TrainConfig  # noqa: E402
from boomerang_jax.infra.topology import GIB, parse_topology  # noqa: E402
from boomerang_jax.models.config import ModelConfig  # noqa: E402
from boomerang_jax.pod.aot import (  # noqa: E402
    CompileError,
    compile_run,
    libtpu_topology_name,
    topology_devices,
)
from boomerang_jax.pod.planning import RunShape, state_bytes  # noqa: E402
from boomerang_jax.surgery import LayerPlan  # noqa: E402

TINY_HF = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
               num_attention_heads=8, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False)


# TPU tiles: (8, 128) for float32, so dimensions that are multiples of 128 lay out without padding
TILED_HF = dict(TINY_HF, vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                num_key_value_heads=2, head_dim=128)


def tiny_shape(batch: int = 8, seq: int = 64, micro: int = 2, hf: dict | None = None, **train) -> RunShape:
    teacher = ModelConfig.from_hf(hf or TINY_HF)
    plan = LayerPlan.from_knobs(teacher.num_layers)
    student = teacher.replace(num_layers=plan.num_student_layers)
    return RunShape(teacher, student, plan, TrainConfig(micro_batches=micro, **train), LossConfig(chunk=32), batch,
                    seq)


# ------------------------------------------------------------------------------------------ topologies
@pytest.mark.parametrize("name, libtpu, hosts", [
    ("v4-8", "v4:2x2x1", 1), ("v4-32", "v4:2x2x4", 4), ("v4-128", "v4:4x4x4", 16),
    ("v5p-8", "v5p:2x2x1", 1), ("v5p-128", "v5p:4x4x4", 16), ("v5e-4", "v5e:2x2", 1),
    ("v5e-16", "v5e:4x4", 4), ("v5e-64", "v5e:8x8", 16), ("v5e-256", "v5e:16x16", 64),
])
def test_topology_names_map_to_libtpu_slices_with_their_hosts(name, libtpu, hosts):
    topo = parse_topology(name)
    assert libtpu_topology_name(topo) == libtpu
    devices = topology_devices(topo)
    assert len(devices) == topo.chips
    assert len({d.process_index for d in devices}) == hosts == topo.hosts  # the public spec's host count


def test_two_slices_give_devices_of_two_slices_and_a_hybrid_mesh_with_data_over_slices():
    devices = topology_devices("2xv5e-16")
    assert len(devices) == 32 and parallel.num_slices(devices) == 2
    mesh = parallel.make_mesh("data=2,fsdp=-1", devices)
    assert parallel.mesh_shape(mesh) == {"data": 2, "fsdp": 16, "tensor": 1}
    for i in range(2):  # each data row of the mesh is one whole slice: only data parallelism crosses the DCN
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(parallel.MeshError, match="mesh.data must be a multiple of the number of slices"):
        parallel.make_mesh("data=1,fsdp=-1", devices)


def test_a_gpu_topology_is_refused_with_a_clear_error():
    with pytest.raises(CompileError, match="not a TPU topology"):
        topology_devices("h100x8")


# --------------------------------------------------------------------------- batch rows on real slices
def _owner_of_rows(mesh, size: int) -> dict[int, set[int]]:
    """Straight from the sharding: which processes hold each global row (the independent truth)."""
    owners: dict[int, set[int]] = {}
    for dev, idx in parallel.batch_sharding(mesh).devices_indices_map((size, 1)).items():
        for r in range(size)[idx[0]]:
            owners.setdefault(r, set()).add(dev.process_index)
    return owners


@pytest.mark.parametrize("name, mesh_spec", [
    ("v4-32", "data=1,fsdp=-1"), ("v5e-64", "data=1,fsdp=-1"), ("v5p-128", "data=1,fsdp=-1"),
    ("v5p-128", "data=2,fsdp=-1,tensor=2"), ("2xv5p-128", "data=2,fsdp=-1"),
])
def test_every_process_gets_exactly_its_devices_rows_on_a_tpu_slice(name, mesh_spec):
    """On these slices a process's rows are not contiguous (the torus order): the batch assembly must still put
    each local row on the device that owns it, and processes must partition the data into equal shards."""
    mesh = parallel.make_mesh(mesh_spec, topology_devices(name))
    size = 4 * parallel.batch_shards(mesh)
    owners = _owner_of_rows(mesh, size)
    processes = sorted({d.process_index for d in mesh.devices.flat})
    contiguous = True
    for p in processes:
        blocks = parallel.process_row_blocks(size, mesh, p)
        rows = [r for s in blocks for r in range(s.start, s.stop)]
        assert len(rows) == len(set(rows)) == size // len(processes) * (len(processes) // len(
            {frozenset(o) for o in owners.values()}) or 1) or rows
        assert {r for r, o in owners.items() if p in o} == set(rows)
        contiguous &= all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    assert not contiguous  # the case the old contiguous-rows code refused
    groups = parallel._data_groups(mesh)  # data shards: disjoint, equal, covering the batch
    n = parallel.batch_shards(mesh)
    assert sorted(r for g in groups for r in g) == list(range(n))
    assert len({len(g) for g in groups}) == 1


# ------------------------------------------------------------------------------------------- compiling
def test_compiled_train_step_arguments_are_exactly_the_sharded_state_teacher_and_batch():
    shape = tiny_shape(seq=128, hf=TILED_HF)
    report = compile_run(shape, "v5e-4", "data=1,fsdp=2,tensor=2", eval_batch=4)
    assert [p.name for p in report.programs] == ["train step", "eval step", "teacher forward"]
    train = report.programs[0]
    sizes = {"data": 1, "fsdp": 2, "tensor": 2}
    state = state_bytes(shape, sizes)
    batch = 5 * shape.global_batch // 2 * shape.seq_len * 4  # five int32 [B, T] arrays over data x fsdp = 2
    expected = state["params"] + state["opt_state"] + state["step"] + state["teacher"] + batch
    # equal up to the tile padding of the small leaves (norm scales [layers, 256], scalar counters)
    assert expected <= train.argument <= 1.02 * expected, (train.argument, expected)
    # the donated state comes back in place: everything but the metrics is aliased
    donated = state["params"] + state["opt_state"] + state["step"]
    assert donated <= train.alias <= 1.02 * donated, (train.alias, donated)
    assert train.temp > 0 and report.fits and report.margin > 0.99
    assert report.mesh == sizes and report.libtpu_name == "v5e:2x2"
    assert report.attention == "splash"  # attention=auto, the default: splash for TPU devices, even on a CPU host
    assert report.estimate is not None and report.estimate.total > 0
    text = report.table()
    assert "train step" in text and "eval step" in text and "fits" in text


def test_the_train_step_compiles_with_splash_attention_on_a_tpu_mesh():
    # train.attention=splash: the step is traced under the mesh, so the Pallas kernel runs per device (shard_map)
    from boomerang_jax.distill.step import Distiller

    shape = tiny_shape(batch=4, seq=256, micro=1, hf=TILED_HF, attention="splash")
    mesh = parallel.make_mesh("data=2,fsdp=1,tensor=2", topology_devices("v5e-4"))
    d = Distiller(shape.student, shape.teacher, shape.plan, mesh, shape.train, shape.loss)
    assert d.student_config.attention == d.teacher_config.attention == "splash"
    hlo = d.lower_step(shape.global_batch, shape.seq_len).as_text()
    assert "tpu_custom_call" in hlo  # the Mosaic kernel, not the einsum over a [T, T] mask
    # and it compiles for the chips (at this size the kernel saves nothing; at T = 2048 it does: docs/DECISIONS.md)
    report = compile_run(shape, "v5e-4", "data=2,fsdp=1,tensor=2", programs=("train step",))
    assert report.fits and report.programs[0].argument > 0


def test_a_run_that_needs_more_than_the_chips_hbm_is_reported_as_not_fitting():
    # attention scores alone: 16 rows x 8 heads x 8192^2 float32 = 32 GiB per device on a 16 GiB v5e chip
    shape = tiny_shape(batch=64, seq=8192, micro=1, remat="none", attention="xla")  # the scores are xla's
    report = compile_run(shape, "v5e-4", "data=-1", programs=("train step",))
    assert report.attention == "xla"
    assert not report.fits and report.peak.total > 16 * GIB
    assert "DOES NOT FIT" in report.verdict() and "train.micro_batches" in report.verdict()


def test_patch_aware_runs_also_compile_their_largest_hybrid():
    report = compile_run(tiny_shape(patch_sizes=(0, 1)), "v5e-4", "data=-1", programs=("train step",))
    plain, hybrid = report.programs
    assert plain.name == "train step"
    # plan blocks {0,1},{2,3},{4},{5}: one multi-layer block patched gives 5 layers instead of 4
    assert hybrid.name.startswith("train step, largest patch-aware hybrid (5 layers)")
    assert hybrid.argument > plain.argument  # its gather indices come in as arguments
    assert hybrid.total >= plain.total


def test_two_slice_compile_splits_data_over_slices():
    report = compile_run(tiny_shape(batch=16), "2xv5e-4", "data=2,fsdp=-1", programs=("train step",))
    assert report.topology.slices == 2 and report.mesh == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report.fits


def _tiny_run_config(tmp_path: Path, **data) -> Path:
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(TINY_HF))
    train = dict(path=str(tmp_path / "data"), seq_len=64, batch_size=8) | data
    cfg = {"teacher": str(teacher), "data": {"train": train, "eval": {"path": str(tmp_path / "data"), "seq_len": 64,
                                                                     "batch_size": 4}},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "train": {"micro_batches": 2},
           "presets": {"v5e-4": {"train": {"micro_batches": 1}}}}
    path = tmp_path / "run.json"  # JSON is YAML
    path.write_text(json.dumps(cfg))
    return path


def test_compile_command_prints_xla_memory_and_exits_by_fit(tmp_path, capsys):
    cfg = _tiny_run_config(tmp_path)
    assert cli_main(["compile", "--config", str(cfg), "--preset", "v5e-4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["topology"] == "v5e-4" and out["fits"] and out["mesh"]["fsdp"] == 4
    assert [p["name"] for p in out["programs"]] == ["train step", "eval step", "teacher forward"]
    assert all(p["total"] == p["argument"] + p["output"] - p["alias"] + p["temp"] + p["code"]
               for p in out["programs"])
    assert cli_main(["compile", "--config", str(cfg), "--preset", "v5e-4", "--json", "--programs", "train-step"]) == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)["programs"]] == ["train step"]
    assert cli_main(["compile", "--config", str(cfg), "--preset", "v5e-4", "--programs", "backward"]) == 2
    assert "unknown program(s) ['backward']" in capsys.readouterr().err
    # too big for the chip: exit 1, with the verdict
    assert cli_main(["compile", "--config", str(cfg), "--topology", "v5e-4", "data.train.seq_len=8192",
                     "data.train.batch_size=64", "data.eval.seq_len=8192", "train.remat=none",
                     "train.micro_batches=1", "train.attention=xla"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    # a batch that cannot split over the topology's devices: a clear error, exit 2
    assert cli_main(["compile", "--config", str(cfg), "--topology", "v5e-4", "data.train.batch_size=6"]) == 2
    err = capsys.readouterr().err
    assert "data.train.batch_size=6 does not split over data x fsdp = 4 devices" in err, err


# Presets whose compile the 2-core sweep did not reach yet (docs/REPRODUCE.md lists them as such). This set may
# only shrink: a preset added or changed without compiling it fails the test below.
NOT_YET_COMPILED: frozenset[str] = frozenset()


def test_every_tpu_preset_of_every_paper_config_was_compiled_and_fits_with_margin():
    """The presets are judged by XLA's own figure: benchmarks/compile_presets.py compiles each one for its TPU
    (minutes each, so not in CI) and records it; a preset changed without compiling it again fails here."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("compile_presets", repo / "benchmarks" / "compile_presets.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.load_rows(bench.RESULTS)
    missing, tight = [], []
    for config in sorted((repo / "configs").glob("paper-*.yaml")):
        for preset, settings in bench.tpu_presets(config).items():
            row = rows.get(bench.key(config, preset, settings))
            name = f"{config.stem}:{preset}"
            if row is None and name in NOT_YET_COMPILED and not any(
                    r["config"].endswith(config.name) and r["preset"] == preset for r in rows.values()):
                continue  # never compiled (not: compiled with other settings)
            assert name not in NOT_YET_COMPILED or row is None, f"{name} is compiled now: drop it from the set"
            if row is None or "error" in row:
                missing.append(f"{config.name} {preset}" + (f": {row['error']}" if row else ""))
            elif not (row["fits"] and row["margin"] >= bench.MIN_MARGIN):
                tight.append(f"{config.name} {preset}: {row['peak'] / GIB:.1f} of {row['hbm'] / GIB:.0f} GiB")
    assert not missing, f"not compiled with the current preset (run benchmarks/compile_presets.py): {missing}"
    assert not tight, f"presets under the {bench.MIN_MARGIN:.0%} margin: {tight}"

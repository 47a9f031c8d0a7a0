"""What a distillation run checks when it starts: batch sizes against the mesh (before anything is loaded),
held-out batches never split by the training micro-batches, and package versions when it resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from tests.test_distill_run import losses, make_teacher_and_data, write_config
from tests.test_multihost import REPO
from tests.test_parallel import run_with_devices


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_teacher_and_data(tmp_path_factory.mktemp("startup"))


def _valid_train(b: int, k: int, n: int) -> bool:
    return b % k == 0 and (b // k) % n == 0


# ------------------------------------------------------------------------------- batch sizes vs the mesh
# Every case runs through run_distillation on 8 forced CPU devices with a teacher and data that do not exist:
# the batch error must come first (nothing was loaded); a config whose batches fit fails on the teacher instead.
_BAD_BATCHES = r"""
import json, jax
from boomerang_jax.distill.config import RunConfig, RunConfigError
from boomerang_jax.distill.train import run_distillation
assert len(jax.devices()) == 8
out = {}
for name, (mesh, train_b, eval_b, k) in CASES.items():
    cfg = {"teacher": "/nonexistent/teacher", "plan": {"every": 2}, "student": None, "mesh": mesh,
           "data": {"train": {"path": "/nonexistent/data", "batch_size": train_b, "seq_len": 8},
                    "eval": None if eval_b is None else {"path": "/nonexistent/data", "batch_size": eval_b}},
           "train": {"micro_batches": k}, "loss": {}, "run": {"dir": RUN_DIR, "progress": False}}
    try:
        run_distillation(RunConfig.from_dict(cfg))
    except RunConfigError as e:
        out[name] = ["RunConfigError", str(e)]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print("RESULT " + json.dumps(out))
"""

D2F4 = {"data": 2, "fsdp": 4, "tensor": 1}  # data x fsdp = 8
D2F2T2 = {"data": 2, "fsdp": 2, "tensor": 2}  # data x fsdp = 4: tensor does not split the batch
CASES = {
    "train-not-over-mesh": (D2F4, 12, 8, 1),
    "train-not-over-mesh-k2": (D2F4, 20, 8, 2),
    "micro-batches-too-many": (D2F4, 16, 8, 4),
    "micro-batches-not-dividing": (D2F4, 48, 8, 5),
    "eval-not-over-mesh": (D2F2T2, 8, 6, 1),
    "both": (D2F4, 12, 4, 1),
    "fits": (D2F2T2, 8, 4, 2),  # eval 4 = data x fsdp although 4 / 2 micro-batches would not be
}


def test_batch_sizes_that_do_not_fit_the_mesh_fail_at_start_up_naming_key_and_valid_values(tmp_path):
    code = f"CASES = {CASES!r}\nRUN_DIR = {str(tmp_path / 'run')!r}\n" + _BAD_BATCHES
    out = json.loads(next(ln for ln in run_with_devices(code, 8).splitlines() if ln.startswith("RESULT "))[7:])
    # Nothing was loaded or written: the errors came before the teacher, the data and the run directory.
    assert not (tmp_path / "run").exists()
    kind, fits = out.pop("fits")
    assert kind != "RunConfigError" and "/nonexistent/teacher" in fits  # a fitting config gets as far as the teacher
    for name, (kind, msg) in out.items():
        assert kind == "RunConfigError", (name, kind, msg)

    # the independent truth: brute force over batch sizes / micro-batch counts
    def nearest(values, x):
        return [max(v for v in values if v < x), min(v for v in values if v > x)] if any(v < x for v in values) \
            else [min(v for v in values if v > x)]

    msg = out["train-not-over-mesh"][1]
    assert "data.train.batch_size=12 does not split over data x fsdp = 8" in msg
    assert nearest([b for b in range(1, 64) if _valid_train(b, 1, 8)], 12) == [8, 16]
    assert "use data.train.batch_size=8 or data.train.batch_size=16" in msg and "micro_batches" not in msg

    msg = out["train-not-over-mesh-k2"][1]  # 20 % 8 != 0: no micro-batch count can help, the batch must change
    assert "data.train.batch_size=20" in msg and "train.micro_batches=2" in msg
    assert nearest([b for b in range(1, 64) if _valid_train(b, 2, 8)], 20) == [16, 32]
    assert "use data.train.batch_size=16 or data.train.batch_size=32" in msg

    msg = out["micro-batches-too-many"][1]  # 16 rows fit 8 devices; 4 micro-batches of 4 rows do not
    assert msg.count("train.micro_batches=4") == 1 and "a micro-batch of 4 rows does not split over" in msg
    assert [k for k in range(1, 17) if _valid_train(16, k, 8)] == [1, 2]
    assert "set train.micro_batches=2 (or data.train.batch_size=32)" in msg

    msg = out["micro-batches-not-dividing"][1]
    assert "train.micro_batches=5" in msg and "48 rows do not split into 5 micro-batches" in msg
    assert [k for k in range(1, 49) if _valid_train(48, k, 8)] == [1, 2, 3, 6]
    assert "set train.micro_batches=3 or train.micro_batches=6" in msg
    assert "data.train.batch_size=40 or data.train.batch_size=80" in msg  # multiples of 5 x 8 around 48

    msg = out["eval-not-over-mesh"][1]
    assert "data.eval.batch_size=6 does not split over data x fsdp = 4" in msg and "data.train" not in msg
    assert "use data.eval.batch_size=4 or data.eval.batch_size=8" in msg

    msg = out["both"][1]  # every problem at once, not one per attempt
    assert "data.train.batch_size=12" in msg and "data.eval.batch_size=4" in msg
    assert "use data.eval.batch_size=8" in msg


# ---------------------------------------------------------------- held-out batches are never micro-batched
_EVAL_RUN = r"""
import json, jax
from boomerang_jax.distill.config import load_run_config
from boomerang_jax.distill.train import run_distillation
assert len(jax.devices()) == 8
summary = run_distillation(load_run_config(CONFIG, ["mesh.data=2", "mesh.fsdp=4"]))
print("RESULT " + json.dumps(summary["status"]))
"""


def _eval_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(ln)
        if "eval/kl" in m:
            out[m["step"]] = {k: v for k, v in m.items() if k.startswith("eval/")}
    return out


def test_held_out_batches_are_not_split_by_the_training_micro_batches(setup):
    # The presets' failure, scaled down: 8 devices, training batch 16 in 2 micro-batches of 8 rows (fits), eval
    # batch 8 (fits, but 8 / 2 = 4 rows would not split over 8 devices). The eval must run and give the same
    # numbers as the same run on one device.
    root, teacher = setup
    runs = {}
    for name in ("mesh8", "one"):
        path = write_config(root, teacher, f"eval-{name}", total_steps=2, micro_batches=2)
        cfg = yaml.safe_load(path.read_text())
        cfg["data"]["train"]["batch_size"], cfg["data"]["eval"]["batch_size"] = 16, 8
        cfg["run"].update(eval_every=1, checkpoint_every=2, export_student=False)
        path.write_text(yaml.safe_dump(cfg))
        runs[name] = (path, root / f"eval-{name}")
    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.distill.train import run_distillation

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", f"CONFIG = {str(runs['mesh8'][0])!r}\n" + _EVAL_RUN],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # meanwhile the reference, here on this process's devices (one)
        assert run_distillation(load_run_config(runs["one"][0]))["status"] == "finished"
        stdout, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout[-4000:]
    assert json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:]) == "finished"
    got, want = _eval_metrics(runs["mesh8"][1]), _eval_metrics(runs["one"][1])
    assert sorted(got) == sorted(want) == [1, 2]
    for step in want:
        assert got[step]["eval/tokens"] == want[step]["eval/tokens"] > 0
        for key in ("eval/loss", "eval/kl", "eval/ce"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)
    assert losses(runs["mesh8"][1]) == pytest.approx(losses(runs["one"][1]), rel=1e-4)


def test_put_batch_keeps_the_training_contract_and_put_eval_batch_does_not_split():
    stdout = run_with_devices(r"""
import json
from boomerang_jax.infra import parallel
from boomerang_jax.distill.loss import LossConfig
from boomerang_jax.distill.optim import TrainConfig
from boomerang_jax.distill.step import Distiller
from tests.test_step import make_batch, tiny_setup
cfg, tparams, plan, student = tiny_setup()
d = Distiller(student.config, cfg, plan, parallel.make_mesh("data=2,fsdp=4"),
              TrainConfig(micro_batches=2, compute_dtype="float32"), LossConfig(chunk=8))
batch = make_batch(0, 8, 16, cfg.vocab_size)
out = {"eval_rows": [s.data.shape[0] for s in d.put_eval_batch(batch)["tokens"].addressable_shards]}
out["one_piece_rows"] = d.put_batch(batch, micro_batches=1)["tokens"].shape[0]
try:
    d.put_batch(batch)
except parallel.MeshError as e:
    out["train_error"] = str(e)
print("RESULT " + json.dumps(out))
""", 8)
    out = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert out["eval_rows"] == [1] * 8 and out["one_piece_rows"] == 8
    assert "micro-batch size 4" in out["train_error"] and "data x fsdp = 8" in out["train_error"]


# ------------------------------------------------------------------------------------- versions on resume
def _meta_file(run_dir: Path, step: int) -> Path:
    """The JSON file orbax wrote for a checkpoint's `meta` item (found by content, not by our code)."""
    for f in sorted((run_dir / "checkpoints" / str(step) / "meta").rglob("*")):
        if f.is_file():
            try:
                if "plan" in json.loads(f.read_text()):
                    return f
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
    raise AssertionError(f"no meta JSON under {run_dir}/checkpoints/{step}/meta")


def test_checkpoints_record_versions_and_resuming_under_others_warns(setup):
    import flax
    import grain
    import jax
    import jaxlib
    import optax
    import orbax.checkpoint

    import boomerang_jax
    from boomerang_jax.distill.checkpoint import VersionMismatchWarning, check_versions
    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.distill.train import run_distillation

    root, teacher = setup
    cfg = load_run_config(write_config(root, teacher, "versions", total_steps=6),
                          ["run.eval_every=0", "run.export_student=false"])
    assert run_distillation(cfg, max_steps=2)["step"] == 2
    meta_file = _meta_file(root / "versions", 2)
    meta = json.loads(meta_file.read_text())
    expected = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                "optax": optax.__version__, "orbax-checkpoint": orbax.checkpoint.__version__,
                "grain": grain.__version__}
    assert {k: meta["versions"][k] for k in expected} == expected
    pyproject = (Path(boomerang_jax.__file__).parents[1] / "pyproject.toml").read_text()
    assert f'version = "{meta["versions"]["boomerang-jax"]}"' in pyproject

    meta["versions"].update({"jax": "0.0.1", "grain": "9.9.9"})
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(VersionMismatchWarning) as caught:
        summary = run_distillation(cfg, max_steps=1)  # a warning, not an error: the run goes on
    assert summary["status"] == "finished" and summary["step"] == 3
    ours = [w for w in caught if issubclass(w.category, VersionMismatchWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert f"jax: 0.0.1 -> {jax.__version__}" in msg and f"grain: 9.9.9 -> {grain.__version__}" in msg
    assert "flax" not in msg and "checkpoints" in msg and "step 2" in msg

    resumed = json.loads(_meta_file(root / "versions", 3).read_text())  # written by the resumed run
    assert resumed["versions"] == {**meta["versions"], "jax": jax.__version__, "grain": grain.__version__}
    with warnings.catch_warnings():  # so resuming from step 3 would not warn
        warnings.simplefilter("error", VersionMismatchWarning)
        assert check_versions(resumed["versions"], "step 3") == []

"""`boomerang distill` end to end on a tiny teacher: checkpoints, exact resume after kill -9, SIGTERM, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from boomerang_jax.distill.config import RunConfigError, load_run_config

WORDS = ("the a of to and in that it was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama teacher with a word-level tokenizer, and a prepared dataset of random sentences."""
    return make_teacher_and_data(tmp_path_factory.mktemp("distill"))


def make_teacher_and_data(root: Path) -> tuple[Path, Path]:
    """(root, teacher dir): a tiny Llama teacher under root/teacher and a prepared dataset under root/data."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from boomerang_jax.data.prepare import prepare_dataset
    from boomerang_jax.data.tokenize import DocumentEncoder
    from tests.conftest import build_hf_model

    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    teacher = root / "teacher"
    model = build_hf_model(dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                eos_token_id=1, tie_word_embeddings=True), seed=0, scale=0.05)
    model.save_pretrained(teacher)
    fast.save_pretrained(teacher)
    rng = np.random.RandomState(0)
    docs = [" ".join(rng.choice(WORDS, rng.randint(5, 40))) for _ in range(300)]
    prepare_dataset(docs, DocumentEncoder.create(fast), str(root / "data"), val_fraction=0.1, seed=0)
    return root, teacher


def write_config(root: Path, teacher: Path, run: str, **train) -> Path:
    cfg = {
        "teacher": str(teacher),
        "plan": {"every": 2, "first": 1, "last": 2},
        "data": {"train": {"path": str(root / "data"), "seq_len": 32, "batch_size": 4, "seed": 1},
                 "eval": {"path": str(root / "data"), "seq_len": 32, "batch_size": 4}},
        "train": {"total_steps": 8, "lr": 1e-3, "warmup_steps": 1, "compute_dtype": "float32",
                  "teacher_dtype": "float32", **train},
        "loss": {"chunk": 16},
        "run": {"dir": str(root / run), "checkpoint_every": 2, "eval_every": 4, "eval_batches": 2,
                "progress": False, "async_checkpoints": True},
    }
    path = root / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def distill(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "boomerang_jax.cli", "distill", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for training steps")


@pytest.mark.parametrize("patch_sizes", [[], [0, 1]], ids=["plain", "patch-aware"])
def test_kill_9_then_resume_gives_the_same_losses_as_an_uninterrupted_run(setup, patch_sizes):
    # patch-aware: every other step trains a hybrid with one random block patched; a resumed run must draw the
    # same blocks at the same steps
    root, teacher = setup
    name = f"{len(patch_sizes)}"
    ref = distill(write_config(root, teacher, "ref" + name, patch_sizes=patch_sizes))
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out
    expected = losses(root / ("ref" + name))
    assert sorted(expected) == list(range(1, 9))
    assert (root / ("ref" + name) / "student" / "boomerang_plan.json").exists()
    metrics = [json.loads(ln) for ln in (root / ("ref" + name) / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in metrics if "eval/kl" in e] == [4, 8]
    if patch_sizes:  # the 6-layer teacher's student has 4 layers; one patched block adds one
        assert [e["model_layers"] for e in metrics if "loss" in e] == [4, 5] * 4

    cfg = write_config(root, teacher, "killed" + name, patch_sizes=patch_sizes)
    proc = distill(cfg)
    wait_for_steps(root / ("killed" + name), proc, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = distill(cfg)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert "resumed from" in out
    assert losses(root / ("killed" + name)) == expected  # bit-identical loss sequence


def test_sigterm_checkpoints_the_current_step(setup):
    from boomerang_jax.distill.checkpoint import Checkpointer

    root, teacher = setup
    cfg = write_config(root, teacher, "term", total_steps=200)
    proc = distill(cfg)
    wait_for_steps(root / "term", proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    last = max(losses(root / "term"))
    ckpt = Checkpointer(root / "term" / "checkpoints")
    assert ckpt.latest_step() == last and last < 200
    ckpt.close()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup):
    from boomerang_jax.distill.checkpoint import Checkpointer
    from boomerang_jax.distill.loop import TrainingDiverged
    from boomerang_jax.distill.train import run_distillation

    root, teacher = setup
    cfg = load_run_config(write_config(root, teacher, "nan", lr=1e38, clip_norm=1e38, total_steps=50),
                          ["run.checkpoint_every=1"])
    with pytest.raises(TrainingDiverged, match="non-finite loss") as err:
        run_distillation(cfg)
    ckpt = Checkpointer(root / "nan" / "checkpoints")
    good = ckpt.latest_step()
    assert good is not None and f"step {good}" in str(err.value)
    meta = ckpt.restore_meta(good)
    assert meta["step"] == good
    ckpt.close()
    assert all(np.isfinite(v) for v in losses(root / "nan").values())


def test_run_config_rejects_unknown_keys_and_sections(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"train": {"path": "x"}}, "train": {"learning_rate": 1.0}}))
    with pytest.raises(RunConfigError, match=r"unknown train key\(s\) \['learning_rate'\]"):
        load_run_config(cfg)
    with pytest.raises(RunConfigError, match="unknown section 'trian'"):
        load_run_config(None, ["trian.lr=1", "data.train.path=x"])
    with pytest.raises(RunConfigError, match="data.train is required"):
        load_run_config(None)
    ok = load_run_config(None, ["data.train.path=x", "train.lr=1e-3", "mesh.fsdp=2"])
    assert ok.train.lr == 1e-3 and ok.mesh.fsdp == 2


def test_shipped_configs_load():
    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        cfg = load_run_config(path)
        assert cfg.train.total_steps >= 1, path


def test_interpolate_reads_the_family_straight_from_a_training_checkpoint(setup):
    from boomerang_jax.cli import main as cli_main
    from boomerang_jax.distill.train import run_distillation
    from boomerang_jax.hf.load import load_hf

    root, teacher = setup
    run_distillation(load_run_config(write_config(root, teacher, "fam", total_steps=2), ["run.eval_every=0"]))
    out = root / "fam-family"
    assert cli_main(["interpolate", "--student", str(root / "fam"), "--teacher", str(teacher), "--sizes", "all",
                     "--out", str(out)]) == 0
    family = json.loads((out / "family.json").read_text())
    assert [s["num_layers"] for s in family["sizes"]] == [4, 5, 6]
    student = load_hf(root / "fam" / "student")  # the run's own export of the final student
    k0 = load_hf(out / family["sizes"][0]["dir"])
    for a, b in zip(jax_leaves(student.params), jax_leaves(k0.params)):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]

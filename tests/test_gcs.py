"""gs:// end to end against a real GCS JSON API on loopback (fake-gcs-server, see tests/gcs_emulator.py).

Clients exercised: gcsfs (boomerang_jax.infra.storage: HF import/export, family export, metrics, prepared data
metadata), tensorstore (orbax checkpoints), array_record's own GCS reader (grain data source) and
google-cloud-storage (tensorboardX event files).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from boomerang_jax.commands import family as fam_cli
from boomerang_jax.hf.export import ExportError, save_hf
from boomerang_jax.hf.load import CheckpointError, load_hf
from boomerang_jax.infra import storage
from boomerang_jax.surgery import LayerPlan, prune
from boomerang_jax.surgery import family_export as fam
from tests.conftest import build_hf_model
from tests.test_distill_run import losses, make_teacher_and_data, write_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The distillation tests' tiny teacher (local HF dir) and prepared dataset (under root / "data")."""
    return make_teacher_and_data(tmp_path_factory.mktemp("distill"))

TINY = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)
PLAN = LayerPlan.from_knobs(4)  # blocks {0,1},{2},{3}: a family of two sizes


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same_params(a, b) -> None:
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny teacher HF dir and its pruned, perturbed student HF dir (with its plan), both local."""
    root = tmp_path_factory.mktemp("pair")
    build_hf_model(TINY, seed=3).save_pretrained(root / "teacher")
    ck = load_hf(root / "teacher", to_device=False)
    s_config, s_params = prune(ck.params, ck.config, PLAN)
    rng = np.random.RandomState(0)
    s_params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), s_params)
    save_hf(root / "student", s_config, s_params, hf_config=ck.hf_config, extra_files=fam.plan_files(PLAN))
    return root / "teacher", root / "student"


class Crash(Exception):
    """An injected failure standing for a process killed mid-upload."""


@pytest.fixture
def crash_after(monkeypatch):
    """crash_after(n): from now on, uploads to the bucket fail once n more objects are uploaded (each object
    is one upload, so this stands for a process killed at any point of an upload sequence)."""
    fs = storage._fs("gs://x")
    put_file = fs.put_file  # the real (instance-bound) upload

    def arm(n: int) -> list[str]:
        done: list[str] = []

        def one(lpath, rpath, **kw):
            if len(done) >= n:
                raise Crash(f"killed before uploading {rpath}")
            put_file(lpath, rpath, **kw)
            done.append(str(rpath))

        def many(lpaths, rpaths, **kw):
            for lp, rp in zip(lpaths, rpaths, strict=True):
                one(lp, rp)

        monkeypatch.setattr(fs, "put_file", one)
        monkeypatch.setattr(fs, "put", many)
        return done

    return arm


# ------------------------------------------------------------------------------------------ storage
def test_storage_reads_lists_uploads_and_downloads_on_the_bucket(bucket, tmp_path):
    storage.write_text(f"{bucket}/a/x.txt", "hello")
    assert storage.read_text(f"{bucket}/a/x.txt") == "hello"
    assert storage.is_dir(f"{bucket}/a") and storage.is_file(f"{bucket}/a/x.txt")
    assert storage.listdir(bucket) == ["a"] and storage.listdir(f"{bucket}/nothing") == []
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "config.json").write_text("{}")
    (tmp_path / "d" / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "d" / "family.json").write_text("{}")
    order = storage.upload_dir(tmp_path / "d", f"{bucket}/d", last=("config.json", "family.json"))
    assert order == ["sub/w.bin", "sub/config.json", "family.json"]  # markers last, deepest first
    assert {k: v["size"] for k, v in storage.list_files(f"{bucket}/d").items()} == {
        "family.json": 2, "sub/config.json": 2, "sub/w.bin": 1000}
    assert storage.glob(f"{bucket}/d/*/*.json") == [f"{bucket}/d/sub/config.json"]
    storage.download_dir(f"{bucket}/d", tmp_path / "back", include=["*.json"])
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in (tmp_path / "back").rglob("*.*")) == [
        "family.json", "sub/config.json"]
    storage.rmtree(f"{bucket}/d")
    assert not storage.exists(f"{bucket}/d") and storage.list_files(f"{bucket}/d") == {}
    with pytest.raises(FileNotFoundError, match=f"{bucket}/nope: no such file"):
        storage.read_text(f"{bucket}/nope")


# --------------------------------------------------------------------------------------- HF import
def test_teacher_snapshot_in_a_bucket_loads_like_the_local_directory_and_is_cached(bucket, tiny_pair, monkeypatch):
    teacher, _ = tiny_pair
    storage.upload_dir(teacher, f"{bucket}/teacher")
    ck = load_hf(f"{bucket}/teacher")
    assert ck.where == f"{bucket}/teacher"
    assert_same_params(ck.params, load_hf(teacher).params)
    # Unchanged objects: the cached copy is reused without downloading anything.
    fs = storage._fs(bucket)
    monkeypatch.setattr(fs, "get", lambda *a, **k: pytest.fail("downloaded again"))
    assert_same_params(load_hf(f"{bucket}/teacher").params, ck.params)
    monkeypatch.undo()
    # A changed object (new generation) is fetched again.
    cfg = json.loads(storage.read_text(f"{bucket}/teacher/config.json"))
    storage.write_text(f"{bucket}/teacher/config.json", json.dumps({**cfg, "rms_norm_eps": 0.5}))
    assert load_hf(f"{bucket}/teacher").config.norm_eps == 0.5


def test_bucket_directories_that_are_not_models_are_clear_errors(bucket, tiny_pair):
    teacher, _ = tiny_pair
    with pytest.raises(CheckpointError, match=f"{bucket}/missing: no such HF model directory"):
        load_hf(f"{bucket}/missing")
    storage.write_bytes(f"{bucket}/half/model.safetensors", (teacher / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=f"{bucket}/half: no config.json; not a complete HF model directory"):
        load_hf(f"{bucket}/half")


# --------------------------------------------------------------------------------------- HF export
def test_export_to_a_bucket_reloads_and_every_interrupted_upload_leaves_no_config(bucket, tiny_pair, crash_after):
    teacher, _ = tiny_pair
    ck = load_hf(teacher, to_device=False)
    dest = f"{bucket}/export"
    kw = dict(hf_config=ck.hf_config, max_shard_bytes=4000)  # several shards + an index
    save_hf(dest, ck.config, ck.params, **kw)
    objects = list(storage.list_files(dest))
    assert "model.safetensors.index.json" in objects and len(objects) > 4
    assert_same_params(load_hf(dest).params, ck.params)
    with pytest.raises(ExportError, match=f"{dest}: already exists"):
        save_hf(dest, ck.config, ck.params, **kw)
    with pytest.raises(ExportError, match="not its root"):  # an --overwrite there would clear the whole bucket
        save_hf(bucket, ck.config, ck.params, overwrite=True, **kw)
    for n in range(len(objects)):  # a crash after each possible number of uploaded objects
        done = crash_after(n)
        with pytest.raises(Crash):
            save_hf(dest, ck.config, ck.params, overwrite=True, **kw)
        assert len(done) == n
        assert not storage.exists(f"{dest}/config.json"), n  # the old export was invalidated first
        with pytest.raises(CheckpointError, match="no config.json|no such HF model directory"):
            load_hf(dest)
    crash_after(10**6)
    save_hf(dest, ck.config, ck.params, **kw)  # leftovers of the crash need no --overwrite and are replaced
    assert sorted(storage.list_files(dest)) == sorted(objects)
    assert_same_params(load_hf(dest).params, ck.params)


# ----------------------------------------------------------------------------------- family export
def test_family_exports_to_a_bucket_and_verify_reads_it_back(bucket, tiny_pair, capsys):
    from boomerang_jax.cli import main as cli_main

    teacher, student = tiny_pair
    storage.upload_dir(teacher, f"{bucket}/teacher")
    storage.upload_dir(student, f"{bucket}/student")
    assert cli_main(["interpolate", "--student", f"{bucket}/student", "--teacher", f"{bucket}/teacher",
                     "--out", f"{bucket}/family"]) == 0
    family = fam.read_family(f"{bucket}/family")
    assert [s["num_layers"] for s in family["sizes"]] == [3, 4]
    assert family["student"] == f"{bucket}/student"
    local = tiny_pair[0].parent / "family-local"
    fam.export_family(fam_cli.open_source(student), fam_cli.open_source(teacher), local)
    for size in family["sizes"]:
        assert_same_params(load_hf(f"{bucket}/family/{size['dir']}").params, load_hf(local / size["dir"]).params)
    capsys.readouterr()
    assert cli_main(["verify", f"{bucket}/family", "--num-sequences", "1", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("OK: gs://") == 2 and f"{bucket}/family/{family['sizes'][1]['dir']}" in out


def test_an_interrupted_family_upload_never_looks_complete(bucket, tiny_pair, crash_after):
    from boomerang_jax.commands.verify import verify_target

    teacher, student = tiny_pair
    s, t = fam_cli.open_source(student), fam_cli.open_source(teacher)
    dest = f"{bucket}/family"
    fam.export_family(s, t, dest)
    objects = list(storage.list_files(dest))
    assert objects[0] == "family.json" and len(objects) > 6
    for n in range(len(objects)):
        done = crash_after(n)
        with pytest.raises(Crash):
            fam.export_family(s, t, dest, overwrite=True)
        assert len(done) == n
        assert not storage.exists(f"{dest}/family.json"), n
        with pytest.raises(fam.FamilyError, match="family.json: missing; .* is not a complete family export"):
            fam.read_family(dest)
        with pytest.raises(FileNotFoundError, match="nor a family"):
            verify_target(dest)
    crash_after(10**6)
    fam.export_family(s, t, dest)  # the leftovers are no family: no --overwrite needed
    assert sorted(storage.list_files(dest)) == sorted(objects)


# --------------------------------------------------------------------------- data + distillation
def gs_config(root: Path, teacher: str, data: str, run: str, **train) -> Path:
    cfg = yaml.safe_load(write_config(root, Path(teacher), "x", **train).read_text())
    cfg["teacher"] = teacher
    cfg["data"]["train"]["path"] = cfg["data"]["eval"]["path"] = data
    cfg["run"].update(dir=run, checkpoint_every=4, eval_every=0)
    path = root / f"{run.replace('://', '_').replace('/', '_')}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prepared_shards_in_a_bucket_give_the_same_batches(setup, bucket):
    from boomerang_jax.data.pipeline import DataConfig, make_iterator
    from boomerang_jax.data.prepare import Metadata

    root, _ = setup
    storage.upload_dir(root / "data", f"{bucket}/data")
    assert Metadata.load(f"{bucket}/data").splits == Metadata.load(str(root / "data")).splits
    local, remote = (make_iterator(DataConfig(path=p, seq_len=32, batch_size=4, seed=1))
                     for p in (str(root / "data"), f"{bucket}/data"))
    try:
        for _ in range(3):
            a, b = next(local), next(remote)
            assert sorted(a) == sorted(b)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    finally:  # stop the read-ahead threads while the emulator still answers them
        local.close()
        remote.close()


def test_prepare_data_reads_text_and_tokenizer_from_the_bucket_and_writes_shards_there(setup, bucket):
    from boomerang_jax.cli import main as cli_main
    from boomerang_jax.data.pipeline import DataConfig, make_iterator
    from boomerang_jax.data.prepare import Metadata
    from tests.test_distill_run import WORDS

    root, teacher = setup
    storage.upload_dir(teacher, f"{bucket}/teacher")
    rng = np.random.RandomState(1)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS, 20))}) for _ in range(60)]
    storage.write_text(f"{bucket}/raw/docs.jsonl", "\n".join(lines) + "\n")
    assert cli_main(["prepare-data", f"{bucket}/raw/docs.jsonl", "--tokenizer", f"{bucket}/teacher",
                     "--val-fraction", "0.1", "--out", f"{bucket}/data"]) == 0
    meta = Metadata.load(f"{bucket}/data")
    assert meta.splits["train"]["num_docs"] + meta.splits["validation"]["num_docs"] == 60
    assert not (storage.cache_root() / "tokenizers" / "gs" / storage.split_url(bucket)[1] / "teacher"
                / "model.safetensors").exists()  # only the tokenizer files were fetched
    it = make_iterator(DataConfig(path=f"{bucket}/data", seq_len=16, batch_size=2))
    try:
        assert next(it)["tokens"].shape == (2, 16)
    finally:
        it.close()


def test_distillation_checkpoints_to_a_bucket_is_killed_and_resumes_from_it(setup, bucket):
    from boomerang_jax.cli import main as cli_main
    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.distill.train import run_distillation

    root, teacher = setup
    steps = 24
    reference = run_distillation(load_run_config(write_config(root, teacher, "gs-ref", total_steps=steps),
                                                 ["run.checkpoint_every=4", "run.eval_every=0",
                                                  "run.export_student=false"]))
    assert reference["status"] == "finished"
    expected = losses(root / "gs-ref")
    assert sorted(expected) == list(range(1, steps + 1))

    storage.upload_dir(teacher, f"{bucket}/teacher")
    storage.upload_dir(root / "data", f"{bucket}/data")
    run = f"{bucket}/run"
    cfg = gs_config(root, f"{bucket}/teacher", f"{bucket}/data", run, total_steps=steps)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "boomerang_jax.cli", "distill", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    while not storage.exists(f"{run}/checkpoints/8/commit_success.txt"):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint in the bucket"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(int(s) for s in storage.listdir(f"{run}/checkpoints") if s.isdigit()
               if storage.exists(f"{run}/checkpoints/{s}/commit_success.txt"))
    assert 8 <= done < steps, "the run finished before it was killed"

    again = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout
    assert f"resumed from {run}/checkpoints step" in again.stdout
    got = {}
    for line in storage.read_text(f"{run}/metrics.jsonl").splitlines():
        m = json.loads(line)
        if "loss" in m:
            got[m["step"]] = m["loss"]
    assert got == expected  # bit-identical loss sequence across the kill, via the bucket
    assert storage.glob(f"{run}/tensorboard/events.out.tfevents.*")  # google-cloud-storage client
    assert storage.exists(f"{run}/student/config.json")

    # The family straight from the orbax checkpoint in the bucket, written to the bucket, verified from it.
    assert cli_main(["interpolate", "--student", run, "--teacher", f"{bucket}/teacher", "--out",
                     f"{bucket}/family"]) == 0
    k0 = fam.read_family(f"{bucket}/family")["sizes"][0]
    assert_same_params(load_hf(f"{bucket}/family/{k0['dir']}").params, load_hf(f"{run}/student").params)
    assert cli_main(["verify", f"{bucket}/family", "--num-sequences", "1", "--seq-len", "8"]) == 0

"""Outputs that would destroy good data (issue 19): an output over the command's own input, `prepare-data
--overwrite` from a broken source, leftovers of killed exports, and errors that used to end in tracebacks.
Each runs through `boomerang` as a user would, and checks the exit code, the message and that nothing good
was damaged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boomerang_jax.cli import main
from tests.conftest import save_tiny, word_model

NAME = "llama-mha-untied-bias-headdim"  # untied, 3 layers, hidden 32


def _run(argv: list, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    save_tiny(tmp_path / "model", NAME)
    return tmp_path / "model"


# --------------------------------------------------------------------------- output over the command's input
@pytest.mark.parametrize("out", ["same", "parent"])
def test_export_over_its_own_input_is_refused_and_the_input_kept(tmp_path, model_dir, capsys, out):
    before = _tree(model_dir)
    dest = model_dir if out == "same" else tmp_path
    rc, err = _run(["export", model_dir, "--out", dest, "--overwrite"], capsys)
    assert rc == 2
    assert f"the output would replace the input {model_dir}" in err
    assert _tree(model_dir) == before


def test_interpolate_over_its_student_is_refused(tmp_path, model_dir, capsys):
    assert main(["prune", "--teacher", str(model_dir), "--plan", "kept=0,2", "--out", str(tmp_path / "student")]) == 0
    capsys.readouterr()
    before = _tree(tmp_path / "student")
    rc, err = _run(["interpolate", "--teacher", model_dir, "--student", tmp_path / "student",
                    "--out", tmp_path / "student", "--overwrite"], capsys)
    assert rc == 2 and "would replace the input" in err and str(tmp_path / "student") in err
    assert _tree(tmp_path / "student") == before


def test_prune_over_its_teacher_is_refused(tmp_path, model_dir, capsys):
    before = _tree(model_dir)
    rc, err = _run(["prune", "--teacher", model_dir, "--plan", "kept=0,2", "--out", model_dir, "--overwrite"], capsys)
    assert rc == 2 and f"would replace the input {model_dir}" in err
    assert _tree(model_dir) == before


def test_prepare_data_over_its_own_source_is_refused(tmp_path, model_dir, capsys):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n\nanother paragraph\n")
    rc, err = _run(["prepare-data", src, "--tokenizer", model_dir, "--out", src, "--overwrite"], capsys)
    assert rc == 2 and f"would replace the input {src}" in err
    assert (src / "a.txt").read_text() == "hello world\n\nanother paragraph\n"


# --------------------------------------------------------------------------- prepare-data --overwrite
def test_prepare_data_overwrite_from_a_broken_source_keeps_the_old_dataset(tmp_path, capsys):
    word_model(tmp_path / "tok", 1)
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("the cat sat on a mat\n\nthe dog ran to a big red house\n")
    bad.write_bytes(b"the cat sat\n\n" + b"\xff\xfe not utf-8\n")
    out = tmp_path / "data"
    assert main(["prepare-data", str(good), "--tokenizer", str(tmp_path / "tok"), "--out", str(out)]) == 0
    capsys.readouterr()
    before = _tree(out)
    rc, err = _run(["prepare-data", bad, "--tokenizer", tmp_path / "tok", "--out", out, "--overwrite"], capsys)
    assert rc == 2 and str(bad) in err
    assert _tree(out) == before  # before the fix: an empty directory
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.")] == []


# --------------------------------------------------------------------------- leftovers of killed exports
def test_leftovers_of_killed_exports_are_removed_by_the_next_export(tmp_path, model_dir, capsys):
    out = tmp_path / "export"
    dead = 2**22 + 12345  # above any pid this machine hands out (pid_max is at most 2**22)
    stale = [tmp_path / f".export.partial-{dead}-0123abcd", tmp_path / ".export.old-89abcdef",
             tmp_path / f".export.old-{dead}-00000000"]
    live = tmp_path / f".export.partial-{os.getppid()}-fedcba98"  # a running process: maybe a live export
    other = tmp_path / f".other.partial-{dead}-0123abcd"  # another destination's: not ours to judge here
    for d in stale + [live, other]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
    rc, err = _run(["export", model_dir, "--out", out], capsys)
    assert rc == 0
    assert all(not d.exists() for d in stale) and live.exists() and other.exists()
    assert all(f"removed {d}: left by an interrupted export to {out}" in err for d in stale)
    assert (out / "config.json").exists()


# --------------------------------------------------------------------------- fsync before the rename
def test_an_export_is_on_disk_before_the_rename_that_publishes_it(tmp_path, model_dir, monkeypatch):
    from boomerang_jax.infra import storage

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", str(a)))
        return real_replace(a, b)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    assert main(["export", str(model_dir), "--out", str(tmp_path / "export")]) == 0
    publish = next(i for i, (kind, path) in enumerate(events) if kind == "replace" and ".export.partial-" in path)
    synced = {Path(p).name for kind, p in events[:publish] if kind == "fsync"}
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert files and files <= synced, files - synced
    assert any(kind == "fsync" and p == str(tmp_path) for kind, p in events[publish:])  # the rename itself


# --------------------------------------------------------------------------- errors that used to be tracebacks
def _one_line_error(err: str, command: str) -> str:
    """The single `boomerang COMMAND: error: ...` line of stderr (no traceback)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"boomerang {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def prepared(tmp_path, capsys) -> tuple[Path, Path]:
    """(tokenizer dir, prepared dataset dir with train and validation splits)."""
    word_model(tmp_path / "tok", 1)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(["the cat sat on a mat", "the dog ran to a big red house"] * 20) + "\n")
    out = tmp_path / "data"
    assert main(["prepare-data", str(text), "--tokenizer", str(tmp_path / "tok"), "--out", str(out),
                 "--val-fraction", "0.2"]) == 0
    capsys.readouterr()
    return tmp_path / "tok", out


@pytest.mark.parametrize("file", ["config.json", "model.safetensors.index.json"])
def test_a_model_file_that_is_not_a_json_object_is_one_line_naming_it(tmp_path, model_dir, capsys, file):
    (model_dir / file).write_text('["not", "an", "object"]')
    rc, err = _run(["export", model_dir, "--out", tmp_path / "out"], capsys)
    line = _one_line_error(err, "export")
    assert rc == 2 and f"{file}: expected a JSON object" in line and "got list" in line, err
    assert not (tmp_path / "out").exists()


def test_a_dataset_metadata_that_is_not_a_json_object_is_one_line_naming_it(prepared, model_dir, capsys):
    _, data = prepared
    (data / "metadata.json").write_text("[1, 2]")
    rc, err = _run(["eval", model_dir, "--data", data], capsys)
    line = _one_line_error(err, "eval")
    assert rc == 2 and f"{data / 'metadata.json'}: expected a JSON object" in line, err


def test_a_missing_split_is_one_line_naming_the_splits_there(prepared, model_dir, capsys):
    _, data = prepared
    rc, err = _run(["eval", model_dir, "--data", data, "--split", "nope"], capsys)
    line = _one_line_error(err, "eval")
    assert rc == 2 and f"split 'nope' not in the prepared dataset at {data}" in line
    assert "'train'" in line and "'validation'" in line, err


def test_a_run_config_that_is_not_a_mapping_is_one_line_naming_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("- teacher: x\n- plan: every=2\n")
    rc, err = _run(["distill", "--config", config], capsys)
    line = _one_line_error(err, "distill")
    assert rc == 2 and f"{config}: a run config is a mapping of sections" in line and "got a list" in line, err


def test_an_export_to_a_read_only_filesystem_is_one_line_and_writes_nothing(tmp_path, model_dir):
    """A real read-only mount (a private tmpfs in a user namespace; root ignores file modes, mounts it cannot)."""
    import shutil
    import subprocess
    import sys

    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o ro,size=64k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs `unshare -Urm` to mount a private read-only tmpfs (user namespaces)")
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro,size=1m tmpfs {ro} || exit 99; "
              f"{sys.executable} -m boomerang_jax.cli export {model_dir} --out {ro}/export; echo rc=$?; ls -A {ro}")
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=Path(__file__).resolve().parents[1])
    line = _one_line_error(proc.stderr, "export")
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr)
    assert "Read-only file system" in line and str(ro) in line, line
    assert proc.stdout.strip().splitlines()[-1] == "rc=2"  # `ls -A` of the mount printed nothing: nothing written

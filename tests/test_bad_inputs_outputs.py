"""Outputs that would destroy good data (issue 19): an output over the command's own input, `prepare-data
--overwrite` from a broken source, leftovers of killed exports, and errors that used to end in tracebacks.
Each runs through `boomerang` as a user would, and checks the exit code, the message and that nothing good
was damaged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boomerang_jax.cli import main
from tests.conftest import save_tiny

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

"""Nonsense run settings fail before anything runs, through the CLI, naming the key (issue 19, defect 5).

Before: `train.lr=-0.03` ran gradient ascent for 20 steps (loss 4.9 -> 22.9) and exported the student.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from boomerang_jax.cli import main as cli_main
from boomerang_jax.distill.checkpoint import _QuietOrbaxErrors

BAD = [
    ("train.lr=-0.03", "train.lr must be a number > 0, got -0.03"),
    ("train.lr=0", "train.lr must be a number > 0, got 0"),
    ("train.lr=fast", "train.lr must be a number > 0, got 'fast'"),
    ("train.b1=1.0", "train.b1 must be a number in [0, 1), got 1.0"),
    ("train.b2=-0.1", "train.b2 must be a number in [0, 1), got -0.1"),
    ("train.eps=0", "train.eps must be a number > 0, got 0"),
    ("train.weight_decay=-0.1", "train.weight_decay must be a number >= 0, got -0.1"),
    ("train.clip_norm=0", "train.clip_norm must be a number > 0, got 0"),
    ("train.end_lr_ratio=-1", "train.end_lr_ratio must be a number in [0, 1]"),
    ("train.warmup_steps=-5", "train.warmup_steps must be a number >= 0"),
    ("train.lr=.nan", "train.lr must be a number > 0, got nan"),
    ("loss.tau=0", "loss.tau must be a number > 0 (the KL temperature), got 0"),
    ("loss.w_kl=-1", "loss.w_kl must be a number >= 0, got -1"),
    ("loss.chunk=0", "loss.chunk must be an integer > 0"),
    ("loss.w_ce=0 loss.w_kl=0 loss.w_cos=0", "are all 0: nothing would be trained"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[b[0] for b in BAD])
def test_nonsense_hyper_parameters_are_refused_before_training_naming_the_key(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    code = cli_main(["distill", f"data.train.path={tmp_path / 'data'}", f"run.dir={run_dir}", *overrides.split()])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert not run_dir.exists()  # nothing was started


def test_sensible_settings_still_pass_the_checks():
    from boomerang_jax.distill.loss import LossConfig
    from boomerang_jax.distill.optim import TrainConfig

    TrainConfig(lr=3e-4, b1=0.0, b2=0.999, weight_decay=0.0, end_lr_ratio=1.0, warmup_steps=0)
    TrainConfig(warmup_steps=None, lr=1)
    LossConfig(w_ce=0.0, w_kl=1.0, w_cos=0.0)


@pytest.mark.parametrize("student_name, layers, message", [
    ("llama-gqa3-tied-llama3rope", None, "student and teacher differ in"),  # another architecture
    ("qwen3-gqa2-tied", 4, "the plan has 3 blocks (student layers), but the student has 4 layers"),
])
def test_a_student_that_does_not_fit_its_teacher_is_refused_at_start_up(tmp_path, capsys, student_name, layers,
                                                                         message):
    """Before: a Llama student with a Qwen3 teacher trained to the end and exported; a wrong layer count failed
    only at the first step with shape tuples (issue 19, defect 8)."""
    from tests.conftest import TINY_CONFIGS, build_hf_model

    teacher_dir, student_dir, run_dir = tmp_path / "teacher", tmp_path / "student", tmp_path / "run"
    build_hf_model(TINY_CONFIGS["qwen3-gqa2-tied"]).save_pretrained(teacher_dir)  # 4 layers -> plan of 3 blocks
    spec = dict(TINY_CONFIGS[student_name], num_hidden_layers=layers or 3)
    build_hf_model(spec, seed=1).save_pretrained(student_dir)
    code = cli_main(["distill", f"teacher={teacher_dir}", f"student={student_dir}", f"run.dir={run_dir}",
                     f"data.train.path={tmp_path / 'data'}", "data.train.batch_size=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"student {student_dir} cannot be distilled from teacher {teacher_dir}" in err and message in err, err
    assert not (run_dir / "checkpoints").exists()


def test_a_half_written_last_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    from boomerang_jax.distill.loop import MetricsLog, PartialLineWarning

    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / (s + 1)}) for s in range(4)]
    path.write_text("\n".join(rows) + '\n{"step": 4, "loss": 0.2, "ce": 0.1')  # the disk filled mid-line
    with pytest.warns(PartialLineWarning, match=r"metrics\.jsonl: line 5 is cut off"):
        log = MetricsLog(str(tmp_path), resume_step=2)
    assert path.read_text().splitlines() == rows[:3]  # rows after the checkpoint go, and so does the cut line
    log.write(3, {"loss": 0.5})
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 3, "loss": 0.5}


def test_a_broken_metrics_line_before_the_last_is_an_error_naming_the_file_and_line(tmp_path):
    from boomerang_jax.distill.loop import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2 is not a metrics row"):
        MetricsLog(str(tmp_path), resume_step=2)
    assert path.read_text() == '{"step": 0}\n{"step": 1, oops\n{"step": 2}\n'  # nothing rewritten


# --------------------------------------------------------------------------- a run that cannot go on
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(root, teacher dir, config path): the tiny teacher and data of the distillation tests, 40 steps."""
    from tests.test_distill_run import make_teacher_and_data, write_config

    root, teacher = make_teacher_and_data(tmp_path_factory.mktemp("runs"))
    return root, teacher, write_config(root, teacher, "run", total_steps=40)


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_stops_the_run_in_one_message_and_it_resumes_once_space_is_freed(tiny_run, tmp_path):
    """The disk fills (another program's file) right after the step-2 checkpoint; the run stops with one message
    and exit 2; with the file removed, the same command resumes and finishes with every step logged once."""
    if shutil.which("unshare") is None or not _can_mount_tmpfs():
        pytest.skip("needs `unshare -Urm` to mount a private tmpfs (user namespaces)")
    root, _, config = tiny_run
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    distill = f"{sys.executable} -m boomerang_jax.cli distill --config {config} run.dir={mnt}/run"
    script = f"""
        mount -t tmpfs -o size=8m tmpfs {mnt} || exit 99
        ( while [ ! -d {mnt}/run/checkpoints/2 ]; do sleep 0.02; done
          dd if=/dev/zero of={mnt}/filler bs=64k 2>/dev/null ) &
        {distill} > {out}/first.out 2> {out}/first.err; echo $? > {out}/first.rc
        wait
        rm {mnt}/filler
        {distill} > {out}/second.out 2> {out}/second.err; echo $? > {out}/second.rc
        cp {mnt}/run/metrics.jsonl {out}/
        ls {mnt}/run > {out}/ls
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], env=env, check=True, timeout=600,
                   cwd=Path(__file__).resolve().parents[1])
    first = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "2", first
    assert "Traceback" not in first and len(first.splitlines()) <= 8, first
    error = [ln for ln in first.splitlines() if ln.startswith("boomerang distill: error: ")]
    assert len(error) == 1, first
    assert ("a checkpoint failed in the background (the disk is full" in error[0]
            or "No space left on device" in error[0] and "the disk is full: free space and rerun" in error[0]), first
    second = (out / "second.out").read_text() + (out / "second.err").read_text()
    assert (out / "second.rc").read_text().strip() == "0", second
    assert "resumed from" in second
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = sorted(s for s in steps)
    assert sorted(set(train_steps)) == list(range(1, 41))
    assert "student" in (out / "ls").read_text().split()


def _raise_from(filename: str) -> tuple:
    """An OSError(28) raised by code that claims to live in `filename` (its traceback names that file)."""
    namespace: dict = {}
    exec(compile("def write():\n    raise OSError(28, 'No space left on device')\n", filename, "exec"), namespace)
    try:
        namespace["write"]()
    except OSError as e:
        return type(e), e, e.__traceback__
    raise AssertionError("unreachable")


@pytest.mark.parametrize("where, kept", [("/site-packages/orbax/checkpoint/_src/path/async_path.py", False),
                                         ("/home/user/my_code.py", True)])
def test_an_unretrieved_orbax_future_is_not_printed_but_other_ones_are(where, kept):
    """asyncio reports a failed orbax writer future (message: the exception only; where: its traceback) at exit;
    the checkpoint filter drops exactly those, keeping unretrieved futures of any other code."""
    record = logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1,
                               "Future exception was never retrieved\nfuture: <Future finished exception="
                               "OSError(28, 'No space left on device')>", None, _raise_from(where))
    assert _QuietOrbaxErrors().filter(record) is kept


def test_a_diverging_run_ends_in_one_line_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path, capsys):
    root, _, config = tiny_run
    run_dir = tmp_path / "run"
    code = cli_main(["distill", "--config", str(config), f"run.dir={run_dir}", "train.lr=1e8", "train.clip_norm=1e9"])
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("boomerang distill: error: non-finite loss nan at step ") and "is kept" in line, err
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_resuming_with_changed_settings_warns_naming_each(tiny_run, tmp_path, capsys):
    from boomerang_jax.distill.checkpoint import SettingsChangedWarning

    root, teacher, config = tiny_run
    run_dir = tmp_path / "run"
    assert cli_main(["distill", "--config", str(config), f"run.dir={run_dir}", "--max-steps", "2"]) == 0
    moved = tmp_path / "teacher-copy"
    shutil.copytree(teacher, moved)
    with pytest.warns(SettingsChangedWarning) as record:
        assert cli_main(["distill", "--config", str(config), f"run.dir={run_dir}", f"teacher={moved}",
                         "train.lr=0.002", "run.log_every=2", "--max-steps", "1"]) == 0
    message = str(record[0].message)
    assert f"teacher: '{teacher}' -> '{moved}'" in message and "train.lr: 0.001 -> 0.002" in message, message
    assert "run.log_every" not in message

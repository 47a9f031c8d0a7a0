"""Nonsense run settings fail before anything runs, through the CLI, naming the key (issue 19, defect 5).

Before: `train.lr=-0.03` ran gradient ascent for 20 steps (loss 4.9 -> 22.9) and exported the student.
"""

from __future__ import annotations

import json

import pytest

from boomerang_jax.cli import main as cli_main

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

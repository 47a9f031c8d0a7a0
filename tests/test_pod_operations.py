"""Running for days on a pod: `launch/tpu.py up --retries N` against a FAKE gcloud (a script on PATH that reports
the slice's state from a scripted sequence and records every command it gets), and what a run shows while it
runs (the worker log copied to the run dir periodically)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/paper-qwen3-8b-base.yaml"

FAKE_GCLOUD = textwrap.dedent('''\
    #!{python}
    """Fake gcloud: records argv; `describe` prints the next scripted state, the status ssh the next scripted
    worker status, `create` exits with the next scripted code (the last entry of each list repeats)."""
    import json, os, sys
    d = os.environ["FAKE_GCLOUD_DIR"]
    argv = sys.argv[1:]
    with open(os.path.join(d, "calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\\n")
    script = json.load(open(os.path.join(d, "script.json")))
    pos_path = os.path.join(d, "pos.json")
    pos = json.load(open(pos_path)) if os.path.exists(pos_path) else {{}}

    def take(key, default):
        items = script.get(key) or [default]
        i = pos.get(key, 0)
        pos[key] = i + 1
        json.dump(pos, open(pos_path, "w"))
        return items[min(i, len(items) - 1)]

    command = next((a for a in argv if a.startswith("--command=")), "")
    if "describe" in argv:
        print(take("states", "READY"))
    elif "ssh" in argv and "boomerang-distill.rc" in command and "pgrep" in command:
        print(take("status", "exit=0"))
    elif "create" in argv:
        sys.exit(take("create", 0))
''')


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A fake `gcloud` first on PATH; returns (set the script, read the calls)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "gcloud-state"
    bin_dir.mkdir()
    state.mkdir()
    exe = bin_dir / "gcloud"
    exe.write_text(FAKE_GCLOUD.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(state))

    def scripted(**script) -> None:
        (state / "script.json").write_text(json.dumps(script))

    def calls() -> list[list[str]]:
        path = state / "calls.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    return scripted, calls


def tpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_tpu_pod", REPO / "launch" / "tpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def up(monkeypatch, *argv: str) -> tuple[object, list[str]]:
    """`launch/tpu.py ... up` in-process for real (not a dry run: the fake gcloud answers), the checkout's
    packing skipped; returns the tpu module and the lines it printed."""
    tpu = tpu_module()
    monkeypatch.setattr(tpu, "pack_repo", lambda runner: "/tmp/boomerang-jax.tar.gz")
    monkeypatch.chdir(REPO)
    printed: list[str] = []
    args = tpu.build_parser().parse_args(["--zone", "z", "--topology", argv[0], "--name", "n", "up", "--skip-compile",
                                          "--poll-s", "0", "--retry-wait-s", "0", *argv[1:], "--config", CONFIG,
                                          "--", "run.dir=gs://b/runs/r"])
    tpu.TPU(args, tpu.Runner(False, echo=printed.append)).up()
    return tpu, printed


def kinds(calls: list[list[str]]) -> list[str]:
    """Each gcloud call as one word: create/delete/describe/scp, or ssh:install/start/follow/status."""
    out = []
    for c in calls:
        verb = next(v for v in ("create", "delete", "describe", "scp", "ssh") if v in c)
        if verb == "ssh":
            command = next(a for a in c if a.startswith("--command="))
            verb = ("ssh:install" if "uv venv" in command else "ssh:start" if "nohup" in command else
                    "ssh:follow" if "tail --pid" in command else "ssh:status")
        out.append(verb)
    return out


def test_a_preempted_spot_vm_is_recreated_reinstalled_and_resumes_the_same_run_dir(fake_gcloud, monkeypatch):
    scripted, calls = fake_gcloud
    scripted(states=["READY", "PREEMPTED", "READY"], status=["running", "exit=0"])
    _, printed = up(monkeypatch, "v5p-8", "--spot", "--retries", "2")
    assert kinds(calls()) == [
        "create", "scp", "ssh:install", "ssh:start", "ssh:follow", "describe", "ssh:status",  # training runs
        "ssh:follow", "describe",  # ... until the slice is preempted
        "delete", "create", "scp", "ssh:install", "ssh:start", "ssh:follow", "describe", "ssh:status"]  # finished
    creates = [c for c in calls() if "create" in c]
    assert creates[0] == creates[1] and "--spot" in creates[0]
    starts = [c[-1] for c in calls() if kinds([c]) == ["ssh:start"]]
    assert starts[0] == starts[1] and "run.dir=gs://b/runs/r" in starts[0]  # the same run dir: it resumes
    notes = [p for p in printed if p.startswith("# ")]
    lost = next(n for n in notes if "PREEMPTED" in n)
    assert re.match(r"# \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ the slice is PREEMPTED: attempt 2 of 3: delete and "
                    r"recreate the slice, reinstall, resume", lost), lost
    assert re.search(r"training finished on every worker after 1 recoveries", notes[-1])


def test_a_queued_resource_that_fails_then_is_suspended_runs_out_of_retries_with_a_clear_error(fake_gcloud,
                                                                                                monkeypatch):
    scripted, calls = fake_gcloud
    scripted(states=["FAILED", "ACTIVE", "ACTIVE", "SUSPENDED"], status=["running"])
    tpu = tpu_module()
    with pytest.raises(tpu.LaunchError) as e:
        up(monkeypatch, "v5e-16", "--queued", "--spot", "--retries", "1", "--delete-after")
    message = str(e.value)
    assert message.startswith("gave up after 1 retries (--retries 1): attempt 1: ")
    assert re.search(r"attempt 1: \S+Z the queued resource is FAILED; attempt 2: \S+Z the slice is SUSPENDED\. "
                     r"The run dir keeps its checkpoints: the same `up` command resumes it", message), message
    assert kinds(calls()) == [
        "create", "describe",  # the queued resource FAILED while waiting for capacity
        "delete", "create", "describe", "scp", "ssh:install", "ssh:start", "ssh:follow", "describe", "ssh:status",
        "ssh:follow", "describe",  # SUSPENDED (preempted): no retries left
        "delete"]  # --delete-after tears it down
    assert all("queued-resources" in c for c in calls() if "create" in c or "delete" in c)


def test_a_training_failure_on_a_healthy_slice_is_not_retried(fake_gcloud, monkeypatch):
    scripted, calls = fake_gcloud
    scripted(states=["READY"], status=["exit=1"])
    tpu = tpu_module()
    with pytest.raises(tpu.LaunchError, match=r"training failed on a READY slice \(exit=1\); not retried"):
        up(monkeypatch, "v5p-8", "--retries", "3")
    assert kinds(calls()).count("create") == 1


def test_sigterm_or_a_restarted_vm_restarts_distill_without_recreating(fake_gcloud, monkeypatch):
    scripted, calls = fake_gcloud
    scripted(states=["READY"], status=["exit=143", "gone", "exit=0"])
    _, printed = up(monkeypatch, "v5p-8", "--retries", "2", "--no-follow")
    assert kinds(calls()) == ["create", "scp", "ssh:install", "ssh:start", "describe", "ssh:status",
                              "ssh:start", "describe", "ssh:status", "ssh:start", "describe", "ssh:status"]
    assert sum("start distill again on this slice" in p for p in printed) == 2


def test_a_create_without_capacity_is_retried_and_then_succeeds(fake_gcloud, monkeypatch):
    scripted, calls = fake_gcloud
    scripted(create=[1, 0], states=["", "READY"], status=["exit=0"])  # no VM after the failed create
    _, printed = up(monkeypatch, "v5p-8", "--spot", "--retries", "1")
    assert kinds(calls())[:5] == ["create", "describe", "delete", "create", "scp"]
    assert any("command failed with exit code 1" in p and "not found" in p for p in printed)


def test_the_cli_exits_2_with_one_line_when_retries_run_out(fake_gcloud, tmp_path):
    scripted, calls = fake_gcloud
    scripted(states=["READY", "PREEMPTED"], status=["running"])
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the tarball of this checkout goes there
    proc = subprocess.run([sys.executable, "launch/tpu.py", "--zone", "z", "--topology", "v5p-8", "up",
                           "--skip-compile", "--retries", "0", "--poll-s", "0", "--spot", "--config", CONFIG,
                           "--", "run.dir=gs://b/r"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    # --retries 0 keeps the old behaviour: create, install, start, follow, and no watching
    assert proc.returncode == 0 and kinds(calls()) == ["create", "scp", "ssh:install", "ssh:start", "ssh:follow"]
    (tmp_path / "gcloud-state" / "calls.jsonl").unlink()
    proc = subprocess.run([sys.executable, "launch/tpu.py", "--zone", "z", "--topology", "v5p-8", "up",
                           "--skip-compile", "--retries", "1", "--retry-wait-s", "0", "--poll-s", "0", "--spot",
                           "--config", CONFIG, "--", "run.dir=gs://b/r"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "error: gave up after 1 retries" in proc.stderr
    assert "the slice is PREEMPTED" in proc.stderr and "Traceback" not in proc.stderr
    assert kinds(calls()).count("create") == 2


def test_the_worker_script_copies_the_log_while_training_runs_and_records_the_exit_status(tmp_path):
    """The distill start script run for real with bash: `boomerang` and `gcloud` are stand-ins that write a log
    line per second and copy files; the log reaches the run dir before training ends, and the status script
    reports running, then exit=N."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import common
    finally:
        sys.path.pop(0)
    home, bin_dir, bucket = tmp_path / "home", tmp_path / "bin", tmp_path / "bucket"
    for d in (home / "boomerang-jax", home / "boomerang-venv" / "bin", bin_dir, bucket):
        d.mkdir(parents=True)
    fake = home / "boomerang-venv" / "bin" / "boomerang"  # prints 4 lines, one a second, then exits 7
    fake.write_text("#!/bin/bash\nfor i in 1 2 3 4; do echo \"boomerang distill step $i\"; sleep 1; done\nexit 7\n")
    fake.chmod(0o755)
    gcloud = bin_dir / "gcloud"  # `gcloud storage cp SRC DEST`, the bucket being a local folder
    gcloud.write_text(f"#!/bin/bash\ncp \"$3\" \"{bucket}/$(basename \"$4\")\"\n")
    gcloud.chmod(0o755)
    script = common.distill_script(CONFIG, ["run.dir=gs://b/r"], log_to="gs://b/r/logs", log_every_s=1)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30, capture_output=True)
    copied = bucket / f"{os.uname().nodename}.log"
    import time

    deadline = time.monotonic() + 20
    while not (copied.exists() and "step 2" in copied.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    status = subprocess.run(["bash", "-c", common.status_script()], env=env, capture_output=True, text=True,
                            check=False)
    assert "step 2" in copied.read_text() and "step 4" not in copied.read_text()  # copied while it runs
    assert status.stdout.strip() == "running"
    while not (home / "boomerang-distill.rc").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    status = subprocess.run(["bash", "-c", common.status_script()], env=env, capture_output=True, text=True,
                            check=False)
    assert status.stdout.strip() == "exit=7"
    assert "step 4" in copied.read_text()  # the final copy at exit


DISTILL = ("import argparse, sys\n"  # `boomerang distill` through its own command module (not all of the CLI)
           "from boomerang_jax.commands.distill import add_distill_arguments, distill_command\n"
           "parser = argparse.ArgumentParser()\nadd_distill_arguments(parser)\n"
           "sys.exit(distill_command(parser.parse_args(sys.argv[1:])))\n")


def test_a_tiny_run_records_data_wait_and_input_rate_and_writes_the_profile_it_was_asked_for(tmp_path):
    """`boomerang distill --profile 3,4` on the tiny CPU teacher: every metrics row has data_wait_s (0 <= wait <=
    step time) and data_tokens_per_s, and a jax.profiler trace (xplane.pb) of those steps lands in RUN_DIR/profile."""
    from tests.test_distill_run import make_teacher_and_data, write_config

    root, teacher = make_teacher_and_data(tmp_path)
    config = write_config(root, teacher, "run", total_steps=6)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", DISTILL, "--config", str(config), "--profile", "3,4",
                           "run.eval_every=0"], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    rows = [json.loads(ln) for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert 0.0 <= r["data_wait_s"] <= r["step_time_s"], r
        assert r["data_tokens_per_s"] > 0, r
    traces = list((root / "run" / "profile").rglob("*.xplane.pb"))
    assert traces and all(t.stat().st_size > 0 for t in traces), sorted((root / "run").rglob("*"))
    assert "profile of steps 3..4 written to" in out
    later = sum(r["data_wait_s"] for r in steps[1:]) / sum(r["step_time_s"] for r in steps[1:])
    print(f"data-wait share of steps 2..6: {later:.1%}")  # the first step's time is mostly compilation


def test_profile_steps_are_validated_naming_the_key():
    from boomerang_jax.distill.config import RunConfigError, RunSettings

    assert RunSettings(profile_steps="3,5").profile_range() == (3, 5)
    assert RunSettings(profile_steps=[2, 2]).profile_range() == (2, 2)
    assert RunSettings(profile_steps=4).profile_range() == (4, 4)
    assert RunSettings().profile_range() is None
    for bad in ("5,3", "0,2", "a", [1, 2, 3]):
        with pytest.raises(RunConfigError, match=r"run.profile_steps=.*expected FIRST,LAST"):
            RunSettings(profile_steps=bad)

"""SIGTERM on ONE host of a multi-process run: every host checkpoints the same step and stops; a rerun resumes.

Two local processes joined by jax.distributed (CPU, gloo), one CPU device each, run the tiny distillation of
tests/test_distill_run.py with its batch split over both. Only process 1 gets SIGTERM. A per-host decision
would leave process 1 saving while process 0 waits in the next step's collectives (a hang); the decision must
be collective: JAX's preemption sync point ("jax"), or, with jax_enable_preemption_service off, our all-gather
of the flag ("allgather"). Every wait has a timeout, so a hang fails the test instead of blocking it.

Run a worker by hand: python -m tests.test_preemption CONFIG PROCESS_ID PORT OUT_DIR MAX_STEPS SERVICE
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_distill_run import losses, make_teacher_and_data, write_config
from tests.test_multihost import REPO

RUN_TIMEOUT_S = 120  # one multi-process run, start-up and compile included (25-40 s on 2 shared cores)


def worker(config: str, process_id: int, port: int, out_dir: str, max_steps: int, service: str) -> None:
    """One process of the run: start jax.distributed, distill, write this process's summary, exit like the CLI."""
    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_preemption_service", service == "jax")
    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.distill.loop import Preemption
    from boomerang_jax.distill.train import run_distillation
    from boomerang_jax.infra import parallel

    assert parallel.initialize_distributed(f"127.0.0.1:{port}", 2, process_id, timeout_s=60)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(msg, flush=True)

    summary = run_distillation(load_run_config(config), log=log, max_steps=max_steps or None)
    out = {"status": summary["status"], "step": summary["step"], "mode": Preemption().mode, "log": lines}
    Path(out_dir, f"summary{process_id}.json").write_text(json.dumps(out))
    jax.distributed.shutdown()
    sys.exit(143 if summary["status"] == "preempted" else 0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_teacher_and_data(tmp_path_factory.mktemp("preempt"))


def _start(config: Path, out: Path, max_steps: int, service: str, tag: str) -> list[subprocess.Popen]:
    from boomerang_jax.infra import parallel

    port = parallel.free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    procs = []
    for i in range(2):
        with open(out / f"{tag}-worker{i}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tests.test_preemption", str(config), str(i), str(port), str(out),
                 str(max_steps), service], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _logs(out: Path, tag: str) -> str:
    return "\n".join(f"--- {tag} worker {i}\n" + (out / f"{tag}-worker{i}.log").read_text()[-3000:] for i in range(2))


def _finish(procs: list[subprocess.Popen], deadline: float) -> list[int]:
    """Wait for both workers until `deadline`; kill any still running (a hang) and return the exit codes."""
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _summaries(out: Path) -> list[dict]:
    return [json.loads((out / f"summary{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("service", ["jax", "allgather"])
def test_sigterm_on_one_host_checkpoints_the_same_step_on_every_host_and_resumes(setup, tmp_path, service):
    from boomerang_jax.distill.checkpoint import Checkpointer

    root, teacher = setup
    run = f"pre-{service}"
    config = write_config(root, teacher, run, total_steps=10_000)
    cfg = yaml.safe_load(config.read_text())
    cfg["run"].update(checkpoint_every=10_000, eval_every=3)  # the only checkpoint will be the preemption's
    config.write_text(yaml.safe_dump(cfg))
    run_dir = root / run

    procs = _start(config, tmp_path, 0, service, "first")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 4):
            assert all(p.poll() is None for p in procs), "a worker exited early:\n" + _logs(tmp_path, "first")
            assert time.monotonic() < deadline, "no training steps in time:\n" + _logs(tmp_path, "first")
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # process 1 only: process 0 never gets a signal
    finally:
        codes = _finish(procs, deadline)
    assert codes == [143, 143], _logs(tmp_path, "first")
    first = _summaries(tmp_path)
    assert [s["mode"] for s in first] == [service, service]
    assert [s["status"] for s in first] == ["preempted", "preempted"]
    step = first[0]["step"]
    assert first[1]["step"] == step and 4 <= step < 10_000
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        assert ckpt.all_steps() == [step]  # one checkpoint, of the step both stopped at
    finally:
        ckpt.close()
    assert max(losses(run_dir)) == step
    if service != "jax":
        return  # the resume is the same for both; once is enough

    for f in tmp_path.glob("summary*.json"):
        f.unlink()
    procs = _start(config, tmp_path, 2, service, "rerun")
    codes = _finish(procs, time.monotonic() + RUN_TIMEOUT_S)
    assert codes == [0, 0], _logs(tmp_path, "rerun")
    rerun = _summaries(tmp_path)
    assert [(s["status"], s["step"]) for s in rerun] == [("finished", step + 2)] * 2
    for s in rerun:
        assert any(ln.startswith("resumed from") and ln.endswith(f"step {step}") for ln in s["log"]), s["log"]
    assert sorted(losses(run_dir))[-3:] == [step, step + 1, step + 2]


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), sys.argv[6])

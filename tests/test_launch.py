"""launch/tpu.py and launch/gpu.py in --dry-run: the exact gcloud command lines per topology, the worker shell
scripts (bash syntax, shellcheck when installed), gcloud's own argument parser on every command (when gcloud is
installed; offline, with no credentials and every API endpoint pointed at a closed port), and lint."""

from __future__ import annotations

import http.server
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/paper-qwen3-8b-base.yaml"


def dry_run(script: str, *argv: str, ok: bool = True) -> list[str]:
    """The command lines a launcher prints (each `+ ` line, shell-split), run from the repo root."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), "--dry-run", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    if not ok:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        return [proc.stderr]
    assert proc.returncode == 0, proc.stderr
    lines, current = [], None
    for line in proc.stdout.splitlines(keepends=True):  # commands may span lines (scripts in --command=...)
        if line.startswith("+ "):
            current = line[2:]
            lines.append(current)
        elif line.startswith("# "):
            current = None
        elif current is not None:
            lines[-1] += line
    return [shlex.split(cmd) for cmd in lines]


def gcloud_only(cmds: list[list[str]]) -> list[list[str]]:
    return [c for c in cmds if c[0] == "gcloud"]


def strip_command(cmd: list[str]) -> list[str]:
    """A command with its --command=SCRIPT replaced by --command=... (scripts are checked separately)."""
    return [a if not a.startswith("--command=") else "--command=..." for a in cmd]


def test_v5p_128_up_creates_installs_runs_on_all_workers_streams_and_tears_down():
    cmds = dry_run("tpu.py", "--zone", "us-east5-a", "--project", "my-proj", "--topology", "v5p-128", "--name", "bd",
                   "up", "--spot", "--config", CONFIG, "--preset", "v5p-128", "--delete-after", "--",
                   "run.dir=gs://my-bucket/runs/q8")
    where = ["--zone=us-east5-a", "--project=my-proj"]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert [strip_command(c) for c in gcloud_only(cmds)] == [
        tpu + ["create", "bd", *where, "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5", "--spot"],
        tpu + ["scp", str(Path(tempfile.gettempdir()) / "boomerang-jax.tar.gz"), "bd:~/boomerang-jax.tar.gz", *where,
               "--worker=all"],
        tpu + ["ssh", "bd", *where, "--worker=all", "--command=..."],  # install
        tpu + ["ssh", "bd", *where, "--worker=all", "--command=..."],  # start distill everywhere
        tpu + ["ssh", "bd", *where, "--worker=0", "--command=..."],  # stream worker 0's log
        tpu + ["delete", "bd", *where, "--quiet"],
    ]
    start = gcloud_only(cmds)[3][-1]
    assert (f'"$HOME/boomerang-venv/bin/boomerang" distill --config {CONFIG} --preset=v5p-128 --distributed=on '
            "run.dir=gs://my-bucket/runs/q8") in start
    assert "gs://my-bucket/runs/q8/logs/" in start and "nohup setsid" in start
    assert [c[3] for c in cmds if c[0] == "git"] == ["stash", "archive"]  # packed with git (tracked files + edits)


def test_v5e_16_through_a_queued_resource_waits_for_capacity():
    cmds = gcloud_only(dry_run("tpu.py", "--zone", "us-west4-a", "--topology", "v5e-16", "create", "--queued",
                               "--spot", "--valid-until", "6h"))
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert cmds == [
        qr + ["create", "boomerang-v5e-16-qr", "--zone=us-west4-a", "--accelerator-type=v5litepod-16",
              "--runtime-version=v2-alpha-tpuv5-lite", "--node-id=boomerang-v5e-16", "--spot",
              "--valid-until-duration=6h"],
        qr + ["describe", "boomerang-v5e-16-qr", "--zone=us-west4-a", "--format=value(state.state)"],
    ]
    assert gcloud_only(dry_run("tpu.py", "--zone", "z", "--topology", "v5e-16", "delete", "--queued")) == [
        qr + ["delete", "boomerang-v5e-16-qr", "--zone=z", "--force", "--quiet"]]


def test_multislice_uses_node_count_and_starts_every_slice():
    cmds = gcloud_only(dry_run("tpu.py", "--zone", "z", "--topology", "2xv5p-128", "--name", "ms", "up", "--config",
                               CONFIG, "--preset", "2xv5p-128", "--no-follow", "--", "run.dir=gs://b/r"))
    create = cmds[0]
    assert create[4:7] == ["create", "ms-qr", "--zone=z"] and "--node-count=2" in create and (
        "--node-prefix=ms" in create) and "--accelerator-type=v5p-128" in create
    ssh_nodes = [c[5] for c in cmds if c[4] == "ssh"]
    assert ssh_nodes == ["ms-0", "ms-1", "ms-0", "ms-1"]  # install on both slices, then start on both


def test_v4_8_and_launch_errors():
    create = gcloud_only(dry_run("tpu.py", "--zone", "us-central2-b", "--topology", "v4-8", "create"))[0]
    assert "--version=tpu-ubuntu2204-base" in create and "--accelerator-type=v4-8" in create
    err = dry_run("tpu.py", "--zone", "z", "--topology", "v5p-7", "create", ok=False)[0]
    assert "v5p-7" in err and "multiple of 2" in err
    err = dry_run("tpu.py", "--zone", "z", "--topology", "v5p-8", "distill", "--config", CONFIG, ok=False)[0]
    assert "run.dir=gs://BUCKET" in err
    err = dry_run("tpu.py", "--zone", "z", "--topology", "v5p-8", "distill", "--config", "/etc/hosts", "--",
                  "run.dir=gs://b/r", ok=False)[0]
    assert "/etc/hosts: the config must be inside" in err
    err = dry_run("tpu.py", "--zone", "z", "--topology", "h100x8", "create", ok=False)[0]
    assert "use launch/gpu.py" in err


def test_gpu_vm_and_local_dry_runs():
    cmds = gcloud_only(dry_run("gpu.py", "--zone", "us-central1-a", "--project", "p", "--name", "g", "up", "--spot",
                               "--config", CONFIG, "--preset", "h100x8", "--", "run.dir=gs://b/r"))
    assert cmds[0] == ["gcloud", "compute", "instances", "create", "g", "--zone=us-central1-a", "--project=p",
                       "--machine-type=a3-highgpu-8g", "--image-family=common-cu128-ubuntu-2204-nvidia-570",
                       "--image-project=deeplearning-platform-release", "--boot-disk-size=500GB",
                       "--maintenance-policy=TERMINATE", "--scopes=cloud-platform",
                       "--metadata=install-nvidia-driver=True", "--provisioning-model=SPOT",
                       "--instance-termination-action=STOP"]
    assert [c[2] for c in cmds] == ["instances", "scp", "ssh", "ssh", "ssh"]
    assert "--distributed=off" in cmds[3][-1]
    local = dry_run("gpu.py", "--local", "up", "--config", "configs/tiny-cpu.yaml")
    assert local[0][:2] == ["uv", "venv"] and local[-1][1:] == ["distill", "--config", "configs/tiny-cpu.yaml",
                                                               "--distributed=off"]


def worker_scripts() -> dict[str, str]:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import common
    finally:
        sys.path.pop(0)
    return {
        "install": common.install_script("3.11", "jax[tpu]>=0.10", ["extra-pkg"]),
        "distill": common.distill_script(CONFIG, ["--preset=v5p-128", "run.dir=gs://b/r"], ["HF_TOKEN=x"],
                                         log_to="gs://b/r/logs"),
        "follow": common.follow_script(),
    }


def test_worker_scripts_are_valid_bash_and_pass_shellcheck():
    for name, script in worker_scripts().items():
        proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)
        if shutil.which("shellcheck"):
            proc = subprocess.run(["shellcheck", "--shell=bash", "-"], input=script, capture_output=True, text=True)
            assert proc.returncode == 0, (name, proc.stdout)


class _NoApi(http.server.BaseHTTPRequestHandler):
    """Answers every request with HTTP 418 at once (a refused port makes gcloud retry for ~15 s)."""

    def _answer(self) -> None:
        body = b'{"error": {"code": 418, "message": "boomerang launch test: no API here"}}'
        self.send_response(418)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_gcloud_itself_accepts_every_generated_command(tmp_path):
    """gcloud parses each command line for real: with no credentials and the TPU/Compute APIs pointed at a local
    server that answers 418, a well-formed command fails only at its first API call; a bad flag fails earlier."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path), CLOUDSDK_CORE_DISABLE_PROMPTS="1",
               CLOUDSDK_AUTH_DISABLE_CREDENTIALS="true", CLOUDSDK_CORE_CHECK_GCE_METADATA="false",
               CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU=url, CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE=url + "compute/v1/")
    cmds = gcloud_only(dry_run("tpu.py", "--zone", "us-east5-a", "--project", "p", "--topology", "2xv5p-128", "up",
                               "--spot", "--config", CONFIG, "--", "run.dir=gs://b/r"))
    cmds += gcloud_only(dry_run("tpu.py", "--zone", "us-east5-a", "--project", "p", "--topology", "v5p-128",
                                "up", "--config", CONFIG, "--delete-after", "--", "run.dir=gs://b/r"))
    cmds += gcloud_only(dry_run("gpu.py", "--zone", "z", "--project", "p", "up", "--spot", "--config", CONFIG,
                                "--delete-after", "--", "run.dir=gs://b/r"))
    seen = set()
    try:
        for cmd in cmds:
            key = tuple(cmd[:5])
            if key in seen:
                continue
            seen.add(key)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert "no API here" in proc.stderr and "unrecognized" not in proc.stderr, (shlex.join(cmd)[:300],
                                                                               proc.stderr[-1500:])
    finally:
        server.shutdown()
    assert len(seen) >= 9
    bad = subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "create", "x", "--zone=z", "--versionn=1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert "unrecognized arguments" in bad.stderr  # the check can fail


def test_launch_scripts_are_lint_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (dev extra)")
    proc = subprocess.run([ruff, "check", "--line-length", "120", "launch/"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout

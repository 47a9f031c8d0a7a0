"""launch/tpu.py and launch/gpu.py in --dry-run: the exact gcloud command lines per topology and of every
subcommand, what the tarball ships (a temporary git repo), the pinned install (launch/constraints.txt equals this
venv), the compile check before `up` creates anything, the worker shell scripts (bash syntax, shellcheck when
installed), gcloud's own argument parser on every command (when gcloud is installed; offline, with no
credentials and every API endpoint pointed at a closed port), and lint."""

from __future__ import annotations

import http.server
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/paper-qwen3-8b-base.yaml"
TARBALL = str(Path(tempfile.gettempdir()) / "boomerang-jax.tar.gz")
PINNED = ["jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "tensorstore", "grain", "array-record",
          "transformers", "tokenizers", "safetensors", "numpy", "ml-dtypes"]


def dry_run(script: str, *argv: str, ok: bool = True) -> list[str]:
    """The command lines a launcher prints (each `+ ` line, shell-split), run from the repo root."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / script), "--dry-run", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
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
        tpu + ["scp", TARBALL, "bd:~/boomerang-jax.tar.gz", *where, "--worker=all"],
        tpu + ["ssh", "bd", *where, "--worker=all", "--command=..."],  # install
        tpu + ["ssh", "bd", *where, "--worker=all", "--command=..."],  # start distill everywhere
        tpu + ["ssh", "bd", *where, "--worker=0", "--command=..."],  # stream worker 0's log
        tpu + ["delete", "bd", *where, "--quiet"],
    ]
    start = gcloud_only(cmds)[3][-1]
    assert (f'"$HOME/boomerang-venv/bin/boomerang" distill --config {CONFIG} --preset=v5p-128 --distributed=on '
            "run.dir=gs://my-bucket/runs/q8") in start
    assert "gs://my-bucket/runs/q8/logs/" in start and "nohup setsid" in start
    assert [c[3:] for c in cmds if c[0] == "git"] == [["ls-files", "-z", "--cached", "--others",
                                                       "--exclude-standard"]]  # tracked + untracked, not ignored


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
    assert "--config /etc/hosts: must be inside" in err
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


def launch_common():
    """launch/common.py, imported the way the launchers import it (module `common`)."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import common
    finally:
        sys.path.pop(0)
    return common


def launch_module(name: str):
    """launch/NAME.py imported as a module, for calling its classes in-process."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jax_pin() -> str:
    return launch_common().read_constraints(REPO / "launch" / "constraints.txt")["jax"]


def tpu_cases() -> dict[str, tuple[list[str], object]]:
    """Per subcommand of launch/tpu.py: its arguments and a check of the commands it prints."""
    tpu, where = ["gcloud", "compute", "tpus", "tpu-vm"], ["--zone=z"]
    follow = launch_common().follow_script()

    def install(cmds):
        assert [strip_command(c) for c in gcloud_only(cmds)] == [
            tpu + ["scp", TARBALL, "n:~/boomerang-jax.tar.gz", *where, "--worker=all"],
            tpu + ["ssh", "n", *where, "--worker=all", "--command=..."]]
        script = cmds[-1][-1]
        assert (f'-c "$HOME/boomerang-jax/launch/constraints.txt" \'jax[tpu]=={jax_pin()}\' -e "$HOME/boomerang-jax"'
                in script)

    def distill(cmds):
        assert [strip_command(cmds[0]), cmds[1]] == [tpu + ["ssh", "n", *where, "--worker=all", "--command=..."],
                                                     tpu + ["ssh", "n", *where, "--worker=0", f"--command={follow}"]]
        assert f"distill --config {CONFIG} --preset=v5p-8 --distributed=on run.dir=gs://b/r" in cmds[0][-1]

    def up(cmds):
        assert cmds[0] == [sys.executable, "-m", "boomerang_jax.cli", "compile", "--config", CONFIG, "--preset",
                           "v5p-8", "--topology", "v5p-8", "run.dir=gs://b/r"]
        assert [c[4] for c in gcloud_only(cmds)] == ["create", "scp", "ssh", "ssh", "ssh"]

    run_dir = ["--config", CONFIG, "--preset", "v5p-8", "--", "run.dir=gs://b/r"]
    return {
        "create": (["create"], lambda cmds: cmds == [
            tpu + ["create", "n", *where, "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"]]),
        "install": (["install"], install),
        "distill": (["distill", *run_dir], distill),
        "logs": (["logs", "--worker", "3"], lambda cmds: cmds == [
            tpu + ["ssh", "n", *where, "--worker=3", f"--command={follow}"]]),
        "exec": (["exec", "--worker", "0", "--", "echo", "hi"], lambda cmds: cmds == [
            tpu + ["ssh", "n", *where, "--worker=0", "--command=echo hi"]]),
        "delete": (["delete"], lambda cmds: cmds == [tpu + ["delete", "n", *where, "--quiet"]]),
        "up": (["up", *run_dir], up),
    }


def gpu_cases() -> dict[str, tuple[list[str], object]]:
    """Per subcommand of launch/gpu.py: its arguments and a check of the commands it prints."""
    where = ["--zone=z"]
    ssh = ["gcloud", "compute", "ssh", "g", *where]
    follow = launch_common().follow_script()

    def install(cmds):
        assert [strip_command(c) for c in gcloud_only(cmds)] == [
            ["gcloud", "compute", "scp", TARBALL, "g:~/boomerang-jax.tar.gz", *where], ssh + ["--command=..."]]
        assert (f'-c "$HOME/boomerang-jax/launch/constraints.txt" \'jax[cuda12]=={jax_pin()}\' '
                '-e "$HOME/boomerang-jax"') in cmds[-1][-1]

    def distill(cmds):
        assert [strip_command(cmds[0]), cmds[1]] == [ssh + ["--command=..."], ssh + [f"--command={follow}"]]
        assert f"distill --config {CONFIG} --preset=h100x8 --distributed=off run.dir=gs://b/r" in cmds[0][-1]

    run_dir = ["--config", CONFIG, "--preset", "h100x8", "--", "run.dir=gs://b/r"]
    return {
        "create": (["create"], lambda cmds: cmds[0][:6] == ["gcloud", "compute", "instances", "create", "g", *where]
                   and len(cmds) == 1),
        "install": (["install"], install),
        "distill": (["distill", *run_dir], distill),
        "logs": (["logs"], lambda cmds: cmds == [ssh + [f"--command={follow}"]]),
        "exec": (["exec", "--", "echo", "hi"], lambda cmds: cmds == [ssh + ["--command=echo hi"]]),
        "delete": (["delete"], lambda cmds: cmds == [["gcloud", "compute", "instances", "delete", "g", *where,
                                                      "--quiet"]]),
        "up": (["up", *run_dir], lambda cmds: [c[2] for c in cmds] == ["instances", "scp", "ssh", "ssh", "ssh"]),
    }


def subcommands(script: str) -> set[str]:
    parser = launch_module(script).build_parser()
    return {name for action in parser._actions if action.__class__.__name__ == "_SubParsersAction"
            for name in action.choices}


def test_every_subcommand_of_both_launchers_has_a_dry_run_case():
    assert subcommands("tpu") == set(tpu_cases()) and subcommands("gpu") == set(gpu_cases())


@pytest.mark.parametrize("sub", sorted(tpu_cases()))
def test_tpu_subcommand_dry_run(sub):
    argv, check = tpu_cases()[sub]
    cmds = dry_run("tpu.py", "--zone", "z", "--topology", "v5p-8", "--name", "n", *argv)
    result = check(cmds if sub in ("install", "up") else gcloud_only(cmds))
    assert result is None or result is True, cmds


@pytest.mark.parametrize("sub", sorted(gpu_cases()))
def test_gpu_subcommand_dry_run(sub):
    argv, check = gpu_cases()[sub]
    cmds = dry_run("gpu.py", "--zone", "z", "--name", "g", *argv)
    result = check(cmds if sub == "install" else gcloud_only(cmds))
    assert result is None or result is True, cmds


def test_exec_runs_the_command_on_every_worker_or_one_and_locally():
    cmds = dry_run("tpu.py", "--zone", "z", "--topology", "2xv5p-128", "--name", "ms", "exec", "--", "ls", "-la")
    assert [(c[5], c[7], c[8]) for c in cmds] == [("ms-0", "--worker=all", "--command=ls -la"),
                                                  ("ms-1", "--worker=all", "--command=ls -la")]
    cmds = dry_run("tpu.py", "--zone", "z", "--topology", "2xv5p-128", "--name", "ms", "exec", "--worker", "0",
                   "cd $HOME && nproc")
    assert [(c[5], c[7], c[8]) for c in cmds] == [("ms-0", "--worker=0", "--command=cd $HOME && nproc")]
    assert dry_run("gpu.py", "--local", "exec", "--", "echo", "hi") == [["bash", "-c", "echo hi"]]


def git_repo(tmp_path: Path) -> Path:
    """A git checkout with a committed file edited since, a committed file deleted since, an untracked config,
    and two git-ignored files."""
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / ".gitignore").write_text("runs/\n*.secret\n")
    (repo / "tracked.yaml").write_text("a: 1\n")
    (repo / "gone.yaml").write_text("b: 1\n")
    subprocess.run([*git, "add", ".gitignore", "tracked.yaml", "gone.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (repo / "tracked.yaml").write_text("a: 2\n")
    (repo / "gone.yaml").unlink()
    (repo / "configs" / "new.yaml").write_text("c: 1\n")
    (repo / "runs").mkdir()
    (repo / "runs" / "out.yaml").write_text("d: 1\n")
    (repo / "key.secret").write_text("e\n")
    return repo


def test_the_tarball_ships_edits_and_untracked_files_but_not_ignored_ones(tmp_path):
    common = launch_common()
    repo, echoed = git_repo(tmp_path), []
    tarball = common.pack_repo(common.Runner(dry_run=False, echo=echoed.append), str(tmp_path), repo=repo)
    with tarfile.open(tarball) as tar:
        assert sorted(tar.getnames()) == [".gitignore", "configs/new.yaml", "tracked.yaml"]
    out = tmp_path / "worker"
    out.mkdir()
    subprocess.run(["tar", "-xzf", tarball, "-C", str(out)], check=True)  # as the install script unpacks it
    assert (out / "tracked.yaml").read_text() == "a: 2\n" and (out / "configs" / "new.yaml").read_text() == "c: 1\n"
    assert echoed[0] == "+ " + shlex.join(["git", "-C", str(repo), *common.SHIPPED])
    assert "packed 3 files" in echoed[1]


def test_a_config_the_workers_would_not_get_is_refused(tmp_path, monkeypatch):
    common = launch_common()
    repo = git_repo(tmp_path)
    monkeypatch.chdir(repo)
    assert common.repo_config("configs/new.yaml", repo) == "configs/new.yaml"  # untracked, not ignored: shipped
    assert common.repo_config(str(repo / "tracked.yaml"), repo) == "tracked.yaml"
    assert common.repo_config("gs://b/c.yaml", repo) == "gs://b/c.yaml"
    with pytest.raises(common.LaunchError, match=re.escape(
            "--config runs/out.yaml: git ignores runs/out.yaml (rule .gitignore:1:runs/), so it would not be copied "
            "to the workers")):
        common.repo_config("runs/out.yaml", repo)
    with pytest.raises(common.LaunchError, match=re.escape("--config key.secret: git ignores key.secret (rule "
                                                           ".gitignore:2:*.secret)")):
        common.repo_config("key.secret", repo)
    outside = tmp_path / "outside.yaml"
    outside.write_text("a: 1\n")
    with pytest.raises(common.LaunchError, match=f"--config {re.escape(str(outside))}: must be inside .* or on gs://"):
        common.repo_config(str(outside), repo)
    with pytest.raises(common.LaunchError, match="--config configs/missing.yaml: no such file"):
        common.repo_config("configs/missing.yaml", repo)
    (repo / "runs" / "pins.txt").write_text("jax==0.10.2\n")
    with pytest.raises(common.LaunchError, match="--constraints runs/pins.txt: git ignores runs/pins.txt"):
        common.pinned_install(None, "tpu", "runs/pins.txt", False, repo)
    err = dry_run("tpu.py", "--zone", "z", "--topology", "v5p-8", "up", "--config", str(outside), "--",
                  "run.dir=gs://b/r", ok=False)[0]
    assert "must be inside" in err and "gcloud" not in err  # `up` checks the config before anything runs


def test_constraints_pin_exactly_the_versions_this_venv_tests():
    pins = {}
    for number, line in enumerate((REPO / "launch" / "constraints.txt").read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text)
            assert match, f"launch/constraints.txt:{number}: {text!r} is not NAME==VERSION"
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    assert set(PINNED) <= set(pins), set(PINNED) - set(pins)

    def installed(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    assert pins == {name: installed(name) for name in pins}
    assert launch_common().read_constraints(REPO / "launch" / "constraints.txt") == pins
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "--",
                             "launch/constraints.txt"], capture_output=True, text=True, check=True).stdout
    assert listed.split() == ["launch/constraints.txt"]  # the tarball carries it to the workers


def test_installs_use_the_constraints_file_and_its_jax_pin(tmp_path):
    pin = jax_pin()
    local = dry_run("gpu.py", "--local", "install")
    assert local[1] == ["uv", "pip", "install", "--python", f"{REPO}/.venv-gpu/bin/python", "-c",
                        str(REPO / "launch" / "constraints.txt"), f"jax[cuda12]=={pin}", "-e", str(REPO)]
    script = dry_run("tpu.py", "--zone", "z", "--topology", "v5p-8", "install", "--unpinned")[-1][-1]
    assert "constraints" not in script and "install --python \"$HOME/boomerang-venv/bin/python\" 'jax[tpu]>=0.10' -e" in script
    err = dry_run("tpu.py", "--zone", "z", "--topology", "v5p-8", "install", "--jax", "jax[tpu]==0.9.1", ok=False)[0]
    assert f"--jax jax[tpu]==0.9.1: launch/constraints.txt pins jax=={pin}" in err and "--unpinned" in err
    common = launch_common()
    bad = tmp_path / "c.txt"
    bad.write_text("# pins\njax==0.10.2\nflax>=0.12\n")
    with pytest.raises(common.LaunchError, match=re.escape(f"{bad}:3: 'flax>=0.12' is not an exact pin")):
        common.read_constraints(bad)


def test_up_compiles_for_the_topology_before_creating_anything():
    compile_ = [sys.executable, "-m", "boomerang_jax.cli", "compile", "--config", CONFIG, "--preset", "v5e-16",
                "--topology", "v5e-16", "run.dir=gs://b/smoke", "train.total_steps=5"]
    for queued in ([], ["--queued"]):
        cmds = dry_run("tpu.py", "--zone", "z", "--topology", "v5e-16", "up", *queued, "--config", CONFIG,
                       "--preset", "v5e-16", "--", "run.dir=gs://b/smoke", "train.total_steps=5")
        create = next(i for i, c in enumerate(cmds) if c[:3] == ["gcloud", "compute", "tpus"] and c[4] == "create")
        assert cmds.index(compile_) == 0 < create
        assert cmds[create][3] == ("queued-resources" if queued else "tpu-vm")
    cmds = dry_run("tpu.py", "--zone", "z", "--topology", "v5e-16", "up", "--skip-compile", "--config", CONFIG, "--",
                   "run.dir=gs://b/r")
    assert cmds[0][3:5] == ["tpu-vm", "create"] and not any("compile" in c for c in cmds)


class Recorder:
    """Stands in for gcloud/git: records the command lines a real (not dry) run would start."""

    def __init__(self, common) -> None:
        self.runner = common.Runner(dry_run=False, echo=lambda line: None)
        self.ran: list[list[str]] = []
        self.runner.run = lambda argv, capture=False, check=True: self.ran.append(list(argv)) or ""


@pytest.mark.parametrize("status", [0, 3])
def test_a_failing_compile_stops_up_before_any_tpu_is_created(status, tmp_path, monkeypatch):
    tpu = launch_module("tpu")
    seen = tmp_path / "argv"
    fake = [sys.executable, "-c", (f"import sys; open({str(seen)!r}, 'w').write(' '.join(sys.argv[1:])); "
                                   f"sys.exit({status})")]
    monkeypatch.setattr(tpu, "local_boomerang", lambda: fake)  # a real process with a chosen exit status
    monkeypatch.setattr(tpu, "pack_repo", lambda runner: TARBALL)
    monkeypatch.chdir(REPO)
    rec = Recorder(sys.modules["common"])
    args = tpu.build_parser().parse_args(["--zone", "z", "--topology", "v5p-8", "--name", "n", "up", "--config",
                                          CONFIG, "--preset", "v5p-8", "--no-follow", "--", "run.dir=gs://b/r"])
    if status:
        with pytest.raises(tpu.LaunchError, match="exited with status 3: this run would not fit in .*v5p-8.*"
                                                  "nothing was created.*--skip-compile"):
            tpu.TPU(args, rec.runner).up()
        assert rec.ran == []
    else:
        tpu.TPU(args, rec.runner).up()
        assert [c[4] for c in rec.ran] == ["create", "scp", "ssh", "ssh"]
    assert seen.read_text() == f"compile --config {CONFIG} --preset v5p-8 --topology v5p-8 run.dir=gs://b/r"


def test_without_boomerang_locally_the_compile_check_says_how_to_install_or_skip(tmp_path, monkeypatch):
    common = launch_common()
    assert common.local_boomerang() == [sys.executable, "-m", "boomerang_jax.cli"]  # this venv has it
    monkeypatch.setattr(common, "find_spec", lambda name: None)
    monkeypatch.setattr(common, "which", lambda name: None)
    with pytest.raises(common.LaunchError, match=r"pip install -e '\.\[tpu\]'.*--skip-compile"):
        common.local_boomerang(tmp_path)
    exe = tmp_path / ".venv" / "bin" / "boomerang"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert common.local_boomerang(tmp_path) == [str(exe)]  # the checkout's venv (`make test-fast`)


def worker_scripts() -> dict[str, str]:
    common = launch_common()
    return {
        "install": common.install_script("3.11", "jax[tpu]==0.10.2", ["extra-pkg"], "launch/constraints.txt"),
        "distill": common.distill_script(CONFIG, ["--preset=v5p-128", "run.dir=gs://b/r"], ["HF_TOKEN=x"],
                                         log_to="gs://b/r/logs"),
        "follow": common.follow_script(),
        "status": common.status_script(),
        "distill-no-logs": common.distill_script(CONFIG, ["run.dir=/r"]),
    }


def test_worker_scripts_are_valid_bash_and_pass_shellcheck():
    for name, script in worker_scripts().items():
        proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, (name, proc.stderr)
        if shutil.which("shellcheck"):
            proc = subprocess.run(["shellcheck", "--shell=bash", "-"], input=script, capture_output=True, text=True,
                                  check=False)
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
    for topo in ("v5p-8", "v5e-16"):  # up --retries: describe of a TPU VM, of a queued resource
        cmds += gcloud_only(dry_run("tpu.py", "--zone", "us-east5-a", "--project", "p", "--topology", topo, "up",
                                    "--skip-compile", "--retries", "1", *(["--queued"] if topo == "v5e-16" else []),
                                    "--config", CONFIG, "--", "run.dir=gs://b/r"))
    cmds += gcloud_only(dry_run("gpu.py", "--zone", "z", "--project", "p", "up", "--spot", "--config", CONFIG,
                                "--delete-after", "--", "run.dir=gs://b/r"))
    seen = set()
    try:
        for cmd in cmds:
            key = tuple(cmd[:5])
            if key in seen:
                continue
            seen.add(key)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
            assert "no API here" in proc.stderr and "unrecognized" not in proc.stderr, (shlex.join(cmd)[:300],
                                                                               proc.stderr[-1500:])
    finally:
        server.shutdown()
    assert len(seen) >= 10 and ("gcloud", "compute", "tpus", "tpu-vm", "describe") in seen
    bad = subprocess.run(["gcloud", "compute", "tpus", "tpu-vm", "create", "x", "--zone=z", "--versionn=1"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert "unrecognized arguments" in bad.stderr  # the check can fail


def test_launch_scripts_are_lint_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (dev extra)")
    proc = subprocess.run([ruff, "check", "--line-length", "120", "launch/"], cwd=REPO, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout

"""Shared pieces of the launch scripts: running (or, with --dry-run, printing) commands, packing this checkout,
the pinned install, and the shell scripts that run on the workers. Standard library only (a workstation needs
gcloud + Python)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from shutil import which

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "launch" / "constraints.txt"  # exact versions every worker installs (what CI tests)
REMOTE_DIR = "$HOME/boomerang-jax"  # the project on each worker
VENV = "$HOME/boomerang-venv"
LOG = "$HOME/boomerang-distill.log"
RC = "$HOME/boomerang-distill.rc"  # the exit status of the last `boomerang distill`, written when it ends
TARBALL = "boomerang-jax.tar.gz"
DEFAULT_PYTHON = "3.11"


class LaunchError(RuntimeError):
    """A command failed or the request cannot be carried out; the message says which and why."""


def load_topology():
    """boomerang_jax/infra/topology.py, loaded by path (no JAX, no package import on a workstation)."""
    spec = importlib.util.spec_from_file_location("boomerang_topology", REPO / "boomerang_jax" / "infra" / "topology.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the classes
    spec.loader.exec_module(module)
    return module


class StateError(LaunchError):
    """A polled resource reached a failed state (e.g. a queued resource FAILED or SUSPENDED); `state` says which."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


class Runner:
    """Runs commands, echoing each one as a shell line first; with dry_run it only echoes."""

    def __init__(self, dry_run: bool, echo: Callable[[str], None] = print) -> None:
        self.dry_run = dry_run
        self.echo = echo

    def note(self, text: str) -> None:
        self.echo(f"# {text}")

    def run(self, argv: Sequence[str], *, capture: bool = False, check: bool = True) -> str:
        """Run `argv` (echoed as `+ cmd`); returns its stdout when `capture`. Dry run: echo only, return ''."""
        self.echo("+ " + shlex.join(argv))
        if self.dry_run:
            return ""
        proc = subprocess.run(list(argv), check=False, text=True, stdout=subprocess.PIPE if capture else None)
        if check and proc.returncode != 0:
            raise LaunchError(f"command failed with exit code {proc.returncode}: {shlex.join(argv)}")
        return proc.stdout or ""

    def call(self, argv: Sequence[str]) -> int:
        """Run `argv` (echoed as `+ cmd`), its output going to the terminal; returns its exit status (0 in a
        dry run)."""
        self.echo("+ " + shlex.join(argv))
        if self.dry_run:
            return 0
        return subprocess.run(list(argv), check=False).returncode

    def wait_for(self, argv: Sequence[str], ready: str, failed: Sequence[str], *, every_s: float = 30.0,
                 timeout_s: float = 24 * 3600) -> None:
        """Poll `argv` (which prints a state) until it prints `ready`; a state in `failed` is an error."""
        if self.dry_run:
            self.note(f"poll every {every_s:.0f}s until it prints {ready}:")
            self.run(argv)
            return
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.run(argv, capture=True, check=False).strip()
            if state == ready:
                return
            if state in failed:
                raise StateError(f"{shlex.join(argv)} reports {state}", state)
            if time.monotonic() > deadline:
                raise LaunchError(f"still {state or 'unknown'} after {timeout_s:.0f}s: {shlex.join(argv)}")
            self.note(f"state {state or 'unknown'}; waiting")
            time.sleep(every_s)


SHIPPED = ("ls-files", "-z", "--cached", "--others", "--exclude-standard")  # what pack_repo ships


def _git(repo: Path, *argv: str, literal: bool = True) -> subprocess.CompletedProcess:
    """A read-only git query in `repo` (run even in a dry run: it decides what is shipped); pathspecs literal
    (a `*` in a file name is not a glob) unless the command refuses that (check-ignore)."""
    try:
        return subprocess.run(["git", *(["--literal-pathspecs"] if literal else []), "-C", str(repo), *argv],
                              check=False, text=True, capture_output=True)
    except FileNotFoundError:
        raise LaunchError("git is not installed: the launcher packs the checkout with git") from None


def pack_repo(runner: Runner, out_dir: str | None = None, repo: Path = REPO) -> str:
    """A .tar.gz of the files the workers get: tracked files as they are on disk (uncommitted edits included)
    and untracked files that git does not ignore (a new config); returns its path."""
    out = str(Path(out_dir or tempfile.gettempdir()) / TARBALL)
    argv = ["git", "-C", str(repo), *SHIPPED]
    if runner.dry_run:
        runner.run(argv)
        runner.note(f"pack the files it lists (tracked incl. uncommitted edits, untracked not ignored) into {out}")
        return out
    runner.echo("+ " + shlex.join(argv))
    proc = _git(repo, *SHIPPED)
    if proc.returncode != 0:
        raise LaunchError(f"{repo}: cannot list the files to ship (is it a git checkout?): {proc.stderr.strip()}")
    names = sorted({n for n in proc.stdout.split("\0") if n and os.path.lexists(repo / n)})  # minus deleted files
    with tarfile.open(out, "w:gz") as tar:
        for name in names:
            tar.add(repo / name, arcname=name, recursive=False)
    largest = max(names, key=lambda n: (repo / n).lstat().st_size, default="")
    runner.note(f"packed {len(names)} files into {out} ({Path(out).stat().st_size / 2**20:.1f} MiB; largest: "
                f"{largest})")
    return out


def repo_file(path: str | Path, flag: str, repo: Path = REPO) -> str:
    """`path` (relative to the current directory) as a path relative to `repo`, checked to be a file that
    pack_repo ships to the workers; LaunchError naming `flag` and the path otherwise."""
    full = (Path.cwd() / path).resolve()
    try:
        rel = full.relative_to(repo.resolve()).as_posix()
    except ValueError:
        raise LaunchError(f"{flag} {path}: must be inside {repo} (only the checkout is copied to the workers)"
                          + (" or on gs://" if flag == "--config" else "")) from None
    if not full.is_file():
        raise LaunchError(f"{flag} {path}: no such file")
    listed = _git(repo, *SHIPPED, "--", rel)
    if listed.returncode != 0:
        raise LaunchError(f"{repo}: cannot list the files to ship (is it a git checkout?): {listed.stderr.strip()}")
    if rel in listed.stdout.split("\0"):
        return rel
    ignored = _git(repo, "check-ignore", "-v", "--", rel, literal=False)
    reason = (f"git ignores {rel} (rule {ignored.stdout.strip().split(chr(9))[0]})" if ignored.returncode == 0
              else f"git does not list {rel}")
    raise LaunchError(f"{flag} {path}: {reason}, so it would not be copied to the workers; move it, `git add -f` "
                      "it" + (", or put it on gs://" if flag == "--config" else ""))


def repo_config(config: str, repo: Path = REPO) -> str:
    """A run config as the workers see it: gs:// as is; a local file must be one the launcher ships (inside the
    repo, not git-ignored) and becomes relative to the repo root."""
    if config.startswith("gs://"):
        return config
    return repo_file(config, "--config", repo)


_PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")
_JAX_PIN = re.compile(r"\s*jax\s*(\[[^\]]*\])?\s*==\s*([^\s,;]+)")


def normalize(name: str) -> str:
    """A distribution name in PEP 503 normal form (`Array_Record` -> `array-record`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path) -> dict[str, str]:
    """The pins of a constraints file, {normalized name: version}: every line `name==version` (blank lines and
    `#` comments allowed); LaunchError naming the file and line otherwise."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise LaunchError(f"constraints file {path}: {e.strerror}") from None
    pins: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _PIN.fullmatch(text)
        if not match:
            raise LaunchError(f"{path}:{number}: {text!r} is not an exact pin NAME==VERSION")
        name = normalize(match[1])
        if name in pins:
            raise LaunchError(f"{path}:{number}: {match[1]} is pinned twice")
        pins[name] = match[2]
    return pins


def pinned_install(jax_arg: str | None, extra: str, constraints: str | None, unpinned: bool,
                   repo: Path = REPO) -> tuple[str, str | None]:
    """The JAX requirement and the constraints file (relative to `repo`) for an install: by default
    `jax[EXTRA]==` the file's jax pin; a --jax pinning another version is an error; `unpinned`: no file."""
    if unpinned:
        return jax_arg or f"jax[{extra}]>=0.10", None
    rel = repo_file(constraints or CONSTRAINTS, "--constraints", repo)
    pins = read_constraints(repo / rel)
    if "jax" not in pins:
        raise LaunchError(f"{rel}: no jax==VERSION pin")
    spec = jax_arg or f"jax[{extra}]=={pins['jax']}"
    asked = _JAX_PIN.match(spec)
    if asked and asked[2] != pins["jax"]:
        raise LaunchError(f"--jax {spec}: {rel} pins jax=={pins['jax']}; change the file (and the venv CI tests "
                          "with) or pass --unpinned")
    return spec, rel


def install_script(python: str, jax_spec: str, extra_pip: Sequence[str] = (), constraints: str | None = None) -> str:
    """Shell run on every worker: unpack the project, make a Python `python` venv with uv (TPU VM images ship
    Python 3.10; the project needs >= 3.11), install JAX for the accelerator and the project, every package
    held to the versions of `constraints` (a file relative to the project root) when given."""
    pins = f'-c "{REMOTE_DIR}/{constraints}" ' if constraints else ""
    pip = shlex.join([jax_spec, *extra_pip])
    return "\n".join([
        "set -euo pipefail",
        f'rm -rf "{REMOTE_DIR}" && mkdir -p "{REMOTE_DIR}" && tar -xzf "$HOME/{TARBALL}" -C "{REMOTE_DIR}"',
        'export PATH="$HOME/.local/bin:$PATH"',
        "command -v uv >/dev/null || python3 -m pip install --user --quiet uv",
        f'uv venv --allow-existing --python {shlex.quote(python)} "{VENV}"',
        f'uv pip install --python "{VENV}/bin/python" {pins}{pip} -e "{REMOTE_DIR}"',
        # No device query here: on a multi-host slice JAX starts only with every host together (in distill).
        f'"{VENV}/bin/python" -c "import jax, boomerang_jax; print(\'installed: jax\', jax.__version__)"',
    ])


def distill_script(config: str, args: Sequence[str], env: Sequence[str] = (), log_to: str | None = None,
                   log_every_s: int = 60) -> str:
    """Shell run on every worker: start `boomerang distill` detached (it survives the ssh session), logging to
    ~/boomerang-distill.log, and write its exit status to ~/boomerang-distill.rc when it ends (what
    `status_script` reports). With `log_to` (a gs:// directory) the log is copied there as HOSTNAME.log every
    `log_every_s` seconds while training runs, and once more when it ends."""
    exports = "".join(f"export {shlex.quote(e)}\n" for e in env)
    run = f'cd "{REMOTE_DIR}" && "{VENV}/bin/boomerang" distill --config {shlex.quote(config)} {shlex.join(args)}'
    inner = f'rm -f "{RC}"; '
    if log_to:
        copy = f'gcloud storage cp "{LOG}" {shlex.quote(log_to.rstrip("/"))}/"$(hostname)".log'
        inner += (f"( while sleep {int(log_every_s)}; do {copy} >/dev/null 2>&1 || true; done ) & copier=$!; "
                  f'{run}; rc=$?; kill "$copier" 2>/dev/null; echo "$rc" > "{RC}"; {copy} || true; exit $rc')
    else:
        inner += f'{run}; rc=$?; echo "$rc" > "{RC}"; exit $rc'
    return (f"{exports}# shellcheck disable=SC2016  # $HOME etc. expand in the inner bash, on purpose\n"
            f"nohup setsid bash -c {shlex.quote(inner)} > \"{LOG}\" 2>&1 < /dev/null &\n"
            'echo "boomerang distill started on $(hostname)"')


def status_script() -> str:
    """Shell that prints one word for this worker's training: `exit=N` (it ended with status N), `running`, or
    `gone` (no process and no status: the VM restarted under it)."""
    return (f'if [ -f "{RC}" ]; then echo "exit=$(cat "{RC}")"; '
            'elif pgrep -f "[b]oomerang distill" >/dev/null; then echo running; else echo gone; fi')


def follow_script() -> str:
    """Shell that prints the training log from the start and follows it until the training process exits."""
    return (f'pid=$(pgrep -o -f "[b]oomerang distill" || true); '
            f'if [ -n "$pid" ]; then tail --pid="$pid" -n +1 -F "{LOG}"; else cat "{LOG}"; fi')


def env_pairs(values: list[str] | None) -> list[str]:
    """--env KEY=VALUE values, checked."""
    out = []
    for item in values or []:
        key, sep, _ = item.partition("=")
        if not sep or not key.isidentifier():
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
        out.append(item)
    return out


def local_boomerang(repo: Path = REPO) -> list[str]:
    """How to run the `boomerang` CLI on this workstation: this Python when it imports boomerang_jax and JAX,
    else `boomerang` on PATH, else the checkout's .venv; LaunchError saying how to install it otherwise."""
    if find_spec("boomerang_jax") is not None and find_spec("jax") is not None:
        return [sys.executable, "-m", "boomerang_jax.cli"]
    for exe in (which("boomerang"), repo / ".venv" / "bin" / "boomerang"):
        if exe and Path(exe).is_file() and os.access(exe, os.X_OK):
            return [str(exe)]
    raise LaunchError(f"boomerang_jax is not installed here ({sys.executable} cannot import it and there is no "
                      "`boomerang` on PATH): `pip install -e '.[tpu]'` in this checkout (or `make test-fast`), "
                      "or pass --skip-compile to create the TPU without the compile check")


def main_guard(fn: Callable[[], int]) -> None:
    """Run a launcher's main, turning LaunchError into a one-line message and exit code 2."""
    try:
        sys.exit(fn())
    except LaunchError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

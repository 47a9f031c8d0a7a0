"""Shared pieces of the launch scripts: running (or, with --dry-run, printing) commands, packing this checkout,
and the shell scripts that run on the workers. Standard library only (a workstation needs gcloud + Python)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REMOTE_DIR = "$HOME/boomerang-jax"  # the project on each worker
VENV = "$HOME/boomerang-venv"
LOG = "$HOME/boomerang-distill.log"
TARBALL = "boomerang-jax.tar.gz"
DEFAULT_PYTHON = "3.11"


class LaunchError(RuntimeError):
    """A command failed or the request cannot be carried out; the message says which and why."""


def load_topology():
    """boomerang_jax/topology.py, loaded by path (no JAX, no package import on a workstation)."""
    spec = importlib.util.spec_from_file_location("boomerang_topology", REPO / "boomerang_jax" / "topology.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while building the classes
    spec.loader.exec_module(module)
    return module


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
                raise LaunchError(f"{shlex.join(argv)} reports {state}")
            if time.monotonic() > deadline:
                raise LaunchError(f"still {state or 'unknown'} after {timeout_s:.0f}s: {shlex.join(argv)}")
            self.note(f"state {state or 'unknown'}; waiting")
            time.sleep(every_s)


def pack_repo(runner: Runner, out_dir: str | None = None) -> str:
    """A .tar.gz of this checkout's tracked files, including uncommitted edits to them (e.g. your bucket in a
    config): `git stash create` makes a commit of the working tree without touching it; `git archive` packs it."""
    out = str(Path(out_dir or tempfile.gettempdir()) / TARBALL)
    ref = runner.run(["git", "-C", str(REPO), "stash", "create"], capture=True).strip() or "HEAD"
    if runner.dry_run:
        runner.note("archive the commit `git stash create` printed (HEAD when there are no uncommitted edits)")
    runner.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", out, ref])
    return out


def repo_config(config: str) -> str:
    """A run config as the workers see it: gs:// as is; a local file must be inside this repo (it ships with
    the project) and becomes relative to the repo root."""
    if config.startswith("gs://"):
        return config
    path = (Path.cwd() / config).resolve()
    try:
        rel = path.relative_to(REPO)
    except ValueError:
        raise LaunchError(f"{config}: the config must be inside {REPO} (it is copied with the project) or on "
                          "gs://") from None
    if not path.is_file():
        raise LaunchError(f"{config}: no such file")
    return rel.as_posix()


def install_script(python: str, jax_spec: str, extra_pip: Sequence[str] = ()) -> str:
    """Shell run on every worker: unpack the project, make a Python `python` venv with uv (TPU VM images ship
    Python 3.10; the project needs >= 3.11), install JAX for the accelerator and the project."""
    pip = shlex.join([jax_spec, *extra_pip])
    return "\n".join([
        "set -euo pipefail",
        f'rm -rf "{REMOTE_DIR}" && mkdir -p "{REMOTE_DIR}" && tar -xzf "$HOME/{TARBALL}" -C "{REMOTE_DIR}"',
        'export PATH="$HOME/.local/bin:$PATH"',
        "command -v uv >/dev/null || python3 -m pip install --user --quiet uv",
        f'uv venv --allow-existing --python {shlex.quote(python)} "{VENV}"',
        f'uv pip install --python "{VENV}/bin/python" {pip} -e "{REMOTE_DIR}"',
        # No device query here: on a multi-host slice JAX starts only with every host together (in distill).
        f'"{VENV}/bin/python" -c "import jax, boomerang_jax; print(\'installed: jax\', jax.__version__)"',
    ])


def distill_script(config: str, args: Sequence[str], env: Sequence[str] = (), log_to: str | None = None) -> str:
    """Shell run on every worker: start `boomerang distill` detached (it survives the ssh session), logging to
    ~/boomerang-distill.log; when it ends the log is copied to `log_to` (a gs:// directory) if given."""
    exports = "".join(f"export {shlex.quote(e)}\n" for e in env)
    inner = f'cd "{REMOTE_DIR}" && "{VENV}/bin/boomerang" distill --config {shlex.quote(config)} {shlex.join(args)}'
    if log_to:
        inner += (f'; rc=$?; gcloud storage cp "{LOG}" {shlex.quote(log_to.rstrip("/"))}/"$(hostname)".log'
                  " || true; exit $rc")
    return (f"{exports}# shellcheck disable=SC2016  # $HOME etc. expand in the inner bash, on purpose\n"
            f"nohup setsid bash -c {shlex.quote(inner)} > \"{LOG}\" 2>&1 < /dev/null &\n"
            'echo "boomerang distill started on $(hostname)"')


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


def main_guard(fn: Callable[[], int]) -> None:
    """Run a launcher's main, turning LaunchError into a one-line message and exit code 2."""
    try:
        sys.exit(fn())
    except LaunchError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

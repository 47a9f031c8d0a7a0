#!/usr/bin/env python3
"""Run boomerang distillation on one GPU host: a Compute Engine GPU VM made with `gcloud`, or this machine.

    launch/gpu.py --zone us-central1-a --project my-proj --machine-type a3-highgpu-8g --name bd-gpu up \\
        --config configs/paper-qwen3-4b-base.yaml --preset h100x8 -- run.dir=gs://my-bucket/runs/qwen3-4b
    launch/gpu.py --local distill --config configs/tiny-cpu.yaml          # on this machine, no gcloud

Commands (each prints every command it runs; `--dry-run` only prints them): create, install, distill, logs,
exec, delete, up -- as in launch/tpu.py, for one VM (`gcloud compute instances ...`). With --local, install
makes ./.venv-gpu with jax[cuda12] + the project, and distill runs in the foreground here. Installs hold every
package to launch/constraints.txt (the versions CI tests, the same JAX as on TPU: jax[cuda12]==its jax pin, in
a fresh venv, whatever JAX the VM image ships); --unpinned (with --jax ...) for another JAX.
Machine types with GPUs built in: a3-highgpu-8g (8x H100 80GB), a2-ultragpu-8g (8x A100 80GB),
a2-highgpu-8g (8x A100 40GB), g2-standard-96 (8x L4); others need --accelerator type=...,count=N.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_PYTHON,
    REPO,
    TARBALL,
    LaunchError,
    Runner,
    distill_script,
    env_pairs,
    follow_script,
    install_script,
    main_guard,
    pack_repo,
    pinned_install,
    repo_config,
)

DEFAULT_IMAGE_FAMILY = "common-cu128-ubuntu-2204-nvidia-570"  # Deep Learning VM with the NVIDIA driver
IMAGE_PROJECT = "deeplearning-platform-release"
LOCAL_VENV = REPO / ".venv-gpu"


class GPU:
    """gcloud command lines for one GPU VM named `name` (or, with --local, commands on this machine)."""

    def __init__(self, args: argparse.Namespace, runner: Runner) -> None:
        self.args, self.runner = args, runner
        self.name = args.name or "boomerang-gpu"
        if not args.local and not args.zone:
            raise LaunchError("--zone is required (or --local to run on this machine)")

    @property
    def where(self) -> list[str]:
        return [f"--zone={self.args.zone}"] + ([f"--project={self.args.project}"] if self.args.project else [])

    def ssh(self, command: str) -> list[str]:
        return ["gcloud", "compute", "ssh", self.name, *self.where, f"--command={command}"]

    def create(self) -> None:
        a = self.args
        if a.local:
            raise LaunchError("create: nothing to create with --local")
        flags = [f"--machine-type={a.machine_type}", f"--image-family={a.image_family}",
                 f"--image-project={IMAGE_PROJECT}", f"--boot-disk-size={a.disk_gb}GB",
                 "--maintenance-policy=TERMINATE", "--scopes=cloud-platform",
                 "--metadata=install-nvidia-driver=True"]
        if a.accelerator:
            flags.append(f"--accelerator={a.accelerator}")
        if a.spot:
            flags += ["--provisioning-model=SPOT", "--instance-termination-action=STOP"]
        self.runner.run(["gcloud", "compute", "instances", "create", self.name, *self.where, *flags])

    def install(self) -> None:
        a = self.args
        jax_spec, constraints = pinned_install(a.jax, "cuda12", a.constraints, a.unpinned)
        if a.local:
            venv = str(LOCAL_VENV)
            pins = ["-c", str(REPO / constraints)] if constraints else []
            self.runner.run(["uv", "venv", "--allow-existing", "--python", a.python, venv])
            self.runner.run(["uv", "pip", "install", "--python", f"{venv}/bin/python", *pins, jax_spec, *a.pip,
                             "-e", str(REPO)])
            return
        tarball = pack_repo(self.runner)
        self.runner.run(["gcloud", "compute", "scp", tarball, f"{self.name}:~/{TARBALL}", *self.where])
        self.runner.run(self.ssh(install_script(a.python, jax_spec, a.pip, constraints)))

    def distill_args(self) -> list[str]:
        """The arguments after `boomerang distill --config CFG`."""
        return ([f"--preset={self.args.preset}"] if self.args.preset else []) + ["--distributed=off",
                                                                                  *self.args.overrides]

    def start_script(self) -> str:
        """The script that starts distill on the VM; checks the config and --env first."""
        a = self.args
        run_dir = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("run.dir=")), "")
        logs = f"{run_dir.rstrip('/')}/logs" if run_dir.startswith("gs://") else None
        return distill_script(repo_config(a.config), self.distill_args(), env_pairs(a.env), log_to=logs)

    def distill(self) -> None:
        a = self.args
        if a.local:
            self.runner.run([str(LOCAL_VENV / "bin" / "boomerang"), "distill", "--config", a.config,
                             *self.distill_args()])
            return
        self.runner.run(self.ssh(self.start_script()))
        if not a.no_follow:
            self.logs()

    def logs(self) -> None:
        if self.args.local:
            raise LaunchError("logs: with --local, distill runs in the foreground")
        self.runner.run(self.ssh(follow_script()))

    def exec(self) -> None:
        command = " ".join(self.args.remote_command)
        self.runner.run(["bash", "-c", command] if self.args.local else self.ssh(command))

    def delete(self) -> None:
        if self.args.local:
            raise LaunchError("delete: nothing to delete with --local")
        self.runner.run(["gcloud", "compute", "instances", "delete", self.name, *self.where, "--quiet"])

    def up(self) -> None:
        pinned_install(self.args.jax, "cuda12", self.args.constraints, self.args.unpinned)
        if not self.args.local:
            self.start_script()  # a bad config or --env fails here, before the VM is paid for
            self.create()
        try:
            self.install()
            self.distill()
        finally:
            if self.args.delete_after and not self.args.local:
                self.delete()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zone", help="e.g. us-central1-a")
    p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    p.add_argument("--name", help="VM name (default: boomerang-gpu)")
    p.add_argument("--local", action="store_true", help="this machine instead of a VM (no gcloud)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run none")
    sub = p.add_subparsers(dest="action", metavar="COMMAND", required=True)

    def create_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--machine-type", default="a3-highgpu-8g")
        q.add_argument("--accelerator", help="for machine types without built-in GPUs: type=nvidia-l4,count=1")
        q.add_argument("--image-family", default=DEFAULT_IMAGE_FAMILY,
                       help=f"a Deep Learning VM family of {IMAGE_PROJECT} with the NVIDIA driver (list them with "
                            f"`gcloud compute images list --project={IMAGE_PROJECT} --filter=family~common-cu`)")
        q.add_argument("--disk-gb", type=int, default=500)
        q.add_argument("--spot", action="store_true", help="Spot VM (stopped on preemption; distill resumes)")

    def install_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--python", default=DEFAULT_PYTHON)
        q.add_argument("--jax", help="pip requirement for JAX on GPU (default: jax[cuda12]== the constraints' jax)")
        q.add_argument("--pip", action="append", default=[], help="extra pip requirement (repeatable)")
        q.add_argument("--constraints", help="pins for every package: a file in this checkout (default: "
                                             "launch/constraints.txt, the versions CI tests)")
        q.add_argument("--unpinned", action="store_true", help="no constraints file: the newest versions")

    def distill_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", required=True)
        q.add_argument("--preset", help="e.g. h100x8")
        q.add_argument("--env", action="append", help="KEY=VALUE exported for the run (repeatable)")
        q.add_argument("--no-follow", action="store_true")
        q.add_argument("overrides", nargs="*", help="section.key=value overrides after `--`")

    create_flags(sub.add_parser("create"))
    install_flags(sub.add_parser("install"))
    distill_flags(sub.add_parser("distill"))
    sub.add_parser("logs")
    sub.add_parser("exec").add_argument("remote_command", nargs="+", metavar="COMMAND",
                                        help="shell command (its words joined by spaces; after `--` if it has "
                                             "options)")
    sub.add_parser("delete")
    q = sub.add_parser("up")
    create_flags(q)
    install_flags(q)
    distill_flags(q)
    q.add_argument("--delete-after", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    getattr(GPU(args, Runner(args.dry_run)), args.action)()
    return 0


if __name__ == "__main__":
    main_guard(main)

#!/usr/bin/env python3
"""Run boomerang distillation on a Cloud TPU VM or pod slice, from a workstation that has only `gcloud`.

    launch/tpu.py --zone us-east5-a --project my-proj --topology v5p-128 --name bd-qwen3 up \\
        --config configs/paper-qwen3-8b-base.yaml --preset v5p-128 -- run.dir=gs://my-bucket/runs/qwen3-8b

Commands (each prints every gcloud command it runs; `--dry-run` only prints them):
  create    create the TPU VM (`tpu-vm create`), or a queued resource with --queued (waits until ACTIVE);
            multi-slice topologies (2xv5p-128) always use a queued resource with --node-count
  install   pack this checkout (tracked files incl. uncommitted edits, and untracked files git does not
            ignore), copy it to every worker, make a Python 3.11 venv with uv there and install jax[tpu] + the
            project at the exact versions of launch/constraints.txt (what CI tests; --unpinned: latest)
  distill   start `boomerang distill --distributed on` on all workers at once (--worker=all), detached,
            then stream worker 0's log until training ends (Ctrl-C stops streaming, not training)
  logs      stream a worker's training log
  exec      run a shell command on all workers (or on one: --worker 0), e.g. `exec --worker 0 -- nproc`
  delete    tear everything down (the TPU VM, or the queued resource with its nodes)
  up        `boomerang compile` here first (does the train step fit this topology's memory? CPU only, nothing
            is created when it does not; --skip-compile skips it), then create + install + distill
            (+ delete at the end with --delete-after). With --retries N it then watches the slice: when it is
            preempted or fails (or training is stopped by SIGTERM / vanishes on a healthy slice) it recreates the
            slice, reinstalls the pinned versions and starts distill again on the same run dir (which resumes
            from its newest checkpoint), up to N times; each attempt is logged with a UTC timestamp and reason

Topologies: v4-8 ... v4-4096, v5e-1 ... v5e-256 (v5litepod-N), v5p-8 ... , v6e-N, and KxNAME for K slices.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_PYTHON,
    TARBALL,
    LaunchError,
    Runner,
    StateError,
    distill_script,
    env_pairs,
    follow_script,
    install_script,
    load_topology,
    local_boomerang,
    main_guard,
    pack_repo,
    pinned_install,
    repo_config,
    status_script,
)

topology = load_topology()
HEALTHY = {"READY", "ACTIVE"}  # a TPU VM's state / a queued resource's state.state when it can train
LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "FAILED", "SUSPENDED", "SUSPENDING", "DELETING", "HIDDEN",
        "HIDING"}  # gone for good: delete and recreate (other states, e.g. REPAIRING, CREATING: wait)
UNKNOWN_POLLS = 3  # consecutive polls without a state (describe failed) before the slice counts as lost


class SliceLost(LaunchError):
    """The slice, or the training on it, is gone; `recreate`: delete and recreate the slice (else restart
    distill on the slice as it is)."""

    def __init__(self, reason: str, recreate: bool = True) -> None:
        super().__init__(reason)
        self.recreate = recreate


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second (what every recovery note starts with)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class TPU:
    """gcloud command lines for one TPU VM / pod slice (or several slices) named `name`."""

    def __init__(self, args: argparse.Namespace, runner: Runner) -> None:
        try:
            self.topo = topology.parse_topology(args.topology)
        except topology.TopologyError as e:
            raise LaunchError(str(e)) from None
        if self.topo.kind != "tpu":
            raise LaunchError(f"{args.topology} is not a TPU topology; use launch/gpu.py for GPUs")
        self.args, self.runner = args, runner
        self.name = args.name or f"boomerang-{self.topo.name.replace('x', '-')}"
        self.queued = args.queued or self.topo.slices > 1
        self.qr = f"{self.name}-qr"

    @property
    def where(self) -> list[str]:
        out = [f"--zone={self.args.zone}"]
        if self.args.project:
            out.append(f"--project={self.args.project}")
        return out

    @property
    def nodes(self) -> list[str]:
        """TPU VM names: one per slice (queued multi-slice nodes are named PREFIX-0, PREFIX-1, ...)."""
        if self.topo.slices == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(self.topo.slices)]

    def gcloud_tpu(self, *argv: str) -> list[str]:
        return ["gcloud", "compute", "tpus", *argv]

    # ---- commands
    def create(self) -> None:
        a, t = self.args, self.topo
        version = a.runtime_version or t.runtime_version
        common = [f"--accelerator-type={t.accelerator_type}"]
        flags = (["--spot"] if a.spot else []) + (["--reserved"] if a.reserved else [])
        if not self.queued:
            self.runner.run(self.gcloud_tpu("tpu-vm", "create", self.name, *self.where, *common,
                                            f"--version={version}", *flags))
            return
        nodes = ([f"--node-id={self.name}"] if t.slices == 1 else
                 [f"--node-count={t.slices}", f"--node-prefix={self.name}"])
        until = [f"--valid-until-duration={a.valid_until}"] if a.valid_until else []
        self.runner.run(self.gcloud_tpu("queued-resources", "create", self.qr, *self.where, *common,
                                        f"--runtime-version={version}", *nodes, *flags, *until))
        self.runner.wait_for(self.gcloud_tpu("queued-resources", "describe", self.qr, *self.where,
                                             "--format=value(state.state)"),
                             "ACTIVE", ("FAILED", "SUSPENDED"), every_s=a.poll_s)

    def ssh(self, node: str, command: str, worker: str = "all") -> list[str]:
        return self.gcloud_tpu("tpu-vm", "ssh", node, *self.where, f"--worker={worker}", f"--command={command}")

    def install(self) -> None:
        a = self.args
        jax_spec, constraints = pinned_install(a.jax, "tpu", a.constraints, a.unpinned)
        tarball = pack_repo(self.runner)
        script = install_script(a.python, jax_spec, a.pip, constraints)
        for node in self.nodes:
            self.runner.run(self.gcloud_tpu("tpu-vm", "scp", tarball, f"{node}:~/{TARBALL}", *self.where,
                                            "--worker=all"))
            self.runner.run(self.ssh(node, script))

    def start_script(self) -> str:
        """The script that starts distill on every worker; checks the config, run dir and --env first."""
        a = self.args
        extra = ([f"--preset={a.preset}"] if a.preset else []) + ["--distributed=on", *a.overrides]
        logs = None
        run_dir = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("run.dir=")), None)
        if run_dir and run_dir.startswith("gs://"):
            logs = f"{run_dir.rstrip('/')}/logs"
        elif not a.allow_local_run_dir:
            raise LaunchError("pass the run directory on a bucket, e.g. `-- run.dir=gs://BUCKET/runs/NAME` (every "
                              "worker must see the same checkpoints); --allow-local-run-dir if the config has one")
        return distill_script(repo_config(a.config), extra, env_pairs(a.env), log_to=logs,
                              log_every_s=a.log_every_s)

    def distill(self) -> None:
        a = self.args
        script = self.start_script()
        for node in self.nodes:  # all workers of all slices start together
            self.runner.run(self.ssh(node, script))
        if not a.no_follow:
            self.logs()

    def logs(self) -> None:
        self.runner.run(self.ssh(self.nodes[0], follow_script(), worker=str(self.args.worker)))

    def exec(self) -> None:
        nodes = self.nodes if self.args.worker == "all" else self.nodes[:1]
        for node in nodes:
            self.runner.run(self.ssh(node, " ".join(self.args.remote_command), worker=self.args.worker))

    def delete(self, check: bool = True) -> None:
        if self.queued:
            self.runner.run(self.gcloud_tpu("queued-resources", "delete", self.qr, *self.where, "--force", "--quiet"),
                            check=check)
        else:
            self.runner.run(self.gcloud_tpu("tpu-vm", "delete", self.name, *self.where, "--quiet"), check=check)

    # ---- unattended recovery (up --retries N)
    def state(self) -> str:
        """The slice's state as gcloud reports it (a queued resource's state.state); '' when describe fails."""
        if self.queued:
            argv = self.gcloud_tpu("queued-resources", "describe", self.qr, *self.where, "--format=value(state.state)")
        else:
            argv = self.gcloud_tpu("tpu-vm", "describe", self.name, *self.where, "--format=value(state)")
        return self.runner.run(argv, capture=True, check=False).strip()

    def worker_status(self) -> list[str]:
        """One word per worker of every slice (`exit=N`, `running`, `gone`; see common.status_script)."""
        words: list[str] = []
        for node in self.nodes:
            out = self.runner.run(self.ssh(node, status_script()), capture=True, check=False)
            words += [w for w in out.split() if w == "running" or w == "gone" or w.startswith("exit=")]
        return words

    def watch(self) -> None:
        """Follow (or poll) the training until it ends. Returns when every worker exited 0; SliceLost when the
        slice is lost or training stopped without finishing; LaunchError when training failed on a healthy slice
        (a bug or a config problem would fail again, so that is not retried)."""
        a, unknown = self.args, 0
        while True:
            if a.no_follow:
                self.runner.note(f"poll every {a.poll_s:.0f}s: the slice's state, then each worker's training")
                if not self.runner.dry_run:
                    time.sleep(a.poll_s)
            else:
                self.runner.run(self.ssh(self.nodes[0], follow_script(), worker=str(a.worker)), check=False)
            state = self.state()
            if self.runner.dry_run:
                self.worker_status()
                self.runner.note(f"repeat until every worker reports exit=0; a state in {sorted(LOST)} or training "
                                 "stopped without finishing: recover (delete, create, install, distill again)")
                return
            if state in LOST:
                raise SliceLost(f"the slice is {state}")
            if state not in HEALTHY:
                unknown = unknown + 1 if not state else 0
                if unknown >= UNKNOWN_POLLS:
                    raise SliceLost(f"describe reported no state {unknown} times in a row (the slice is gone?)")
                self.runner.note(f"{utc_now()} slice state {state or 'unknown'}; waiting")
                time.sleep(a.poll_s)
                continue
            unknown = 0
            words = self.worker_status()
            failed = sorted({w for w in words if w.startswith("exit=") and w not in ("exit=0", "exit=143")})
            if words and all(w == "exit=0" for w in words) and len(words) >= len(self.nodes):
                return
            if "running" in words or not words:  # still training (or ssh failed this time: look again)
                if not a.no_follow:  # the follow returned early (ssh dropped): pause before following again
                    time.sleep(a.poll_s)
                continue
            if failed:
                raise LaunchError(f"training failed on a {state} slice ({', '.join(failed)}); not retried (it would "
                                  f"fail again): see the worker logs (`launch/tpu.py ... logs`, or run.dir/logs/)")
            raise SliceLost("training stopped on a healthy slice (" + ", ".join(sorted(set(words))) +
                            "; exit=143 is SIGTERM, gone: the VM restarted)", recreate=False)

    def attempt(self, recreate: bool, first: bool) -> None:
        """(Re)create + install when `recreate`, then start distill and watch it. Any failure on a slice that is
        not healthy (a create that got no capacity, an ssh to a VM being preempted) is SliceLost."""
        try:
            if recreate:
                if not first:
                    self.delete(check=False)  # a preempted slice must be deleted before its name is free
                self.create()
                self.install()
            script = self.start_script()
            for node in self.nodes:
                self.runner.run(self.ssh(node, script))
        except SliceLost:
            raise
        except StateError as e:
            raise SliceLost(f"the queued resource is {e.state}") from None
        except LaunchError as e:
            state = "" if self.runner.dry_run else self.state()
            if state in HEALTHY or self.runner.dry_run:
                raise
            raise SliceLost(f"{e} (the slice is {state or 'not found'})") from None
        self.watch()

    def up_with_retries(self) -> None:
        """create + install + distill + watch; on SliceLost, log it and go again, at most --retries times."""
        a, history, recreate = self.args, [], True
        while True:
            try:
                self.attempt(recreate, first=not history)
                if not self.runner.dry_run:
                    self.runner.note(f"{utc_now()} training finished on every worker"
                                     + (f" after {len(history)} recoveries" if history else ""))
                return
            except SliceLost as e:
                history.append(f"{utc_now()} {e}")
                if len(history) > a.retries:
                    raise LaunchError(f"gave up after {a.retries} retries (--retries {a.retries}): " +
                                      "; ".join(f"attempt {i + 1}: {h}" for i, h in enumerate(history)) +
                                      ". The run dir keeps its checkpoints: the same `up` command resumes it") from None
                recreate = e.recreate
                self.runner.note(f"{history[-1]}: attempt {len(history) + 1} of {a.retries + 1}: "
                                 + ("delete and recreate the slice, reinstall, resume" if recreate
                                    else "start distill again on this slice (resumes)")
                                 + f" in {a.retry_wait_s:.0f}s")
                time.sleep(a.retry_wait_s)

    def compile_check(self) -> None:
        """`boomerang compile` on this machine for the run's topology; LaunchError when it does not fit/compile."""
        a = self.args
        argv = [*local_boomerang(), "compile", "--config", a.config, *(["--preset", a.preset] if a.preset else []),
                "--topology", a.topology, *a.overrides]
        self.runner.note(f"compile the train step for {a.topology} here first (CPU only): XLA's per-device memory")
        status = self.runner.call(argv)
        if status != 0:
            raise LaunchError(f"`boomerang compile` exited with status {status}: this run would not fit in (or not "
                              f"compile for) {a.topology}, see its output above; nothing was created. Change the "
                              "preset/overrides (e.g. train.micro_batches=) or the topology, or pass --skip-compile "
                              "to create the TPU anyway")

    def up(self) -> None:
        self.start_script()  # a bad config, run dir or --env fails here, before anything is paid for
        pinned_install(self.args.jax, "tpu", self.args.constraints, self.args.unpinned)
        if self.args.skip_compile:
            self.runner.note("no compile check (--skip-compile)")
        else:
            self.compile_check()
        if self.args.retries:
            try:
                self.up_with_retries()
            finally:
                if self.args.delete_after:
                    self.delete()
            return
        self.create()
        try:
            self.install()
            self.distill()
        finally:
            if self.args.delete_after:
                self.delete()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-east5-a (v5p), us-west4-a (v5e)")
    p.add_argument("--project", help="GCP project (default: gcloud's configured project)")
    p.add_argument("--topology", required=True, help="v4-32, v5e-16, v5p-128, 2xv5p-128, ...")
    p.add_argument("--name", help="TPU VM name / multi-slice node prefix (default: boomerang-TOPOLOGY)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run none")
    sub = p.add_subparsers(dest="action", metavar="COMMAND", required=True)

    def create_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted; distill resumes)")
        q.add_argument("--reserved", action="store_true", help="use a reservation")
        q.add_argument("--queued", action="store_true", help="create through a queued resource (waits for capacity)")
        q.add_argument("--valid-until", help="queued resource: give up after this long, e.g. 6h")
        q.add_argument("--runtime-version", help="override the TPU software version (default per generation)")
        q.add_argument("--poll-s", type=float, default=30.0, help="queued resource polling interval")

    def install_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--python", default=DEFAULT_PYTHON, help="Python for the workers' venv (via uv)")
        q.add_argument("--jax", help="pip requirement for JAX on TPU (default: jax[tpu]== the constraints' jax)")
        q.add_argument("--pip", action="append", default=[], help="extra pip requirement (repeatable)")
        q.add_argument("--constraints", help="pins for every package: a file in this checkout (default: "
                                             "launch/constraints.txt, the versions CI tests)")
        q.add_argument("--unpinned", action="store_true", help="no constraints file: the newest versions")

    def distill_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", required=True, help="run config: a path inside this repo, or gs://...")
        q.add_argument("--preset", help="the config's preset for this topology (e.g. v5p-128)")
        q.add_argument("--env", action="append", help="KEY=VALUE exported on the workers (repeatable)")
        q.add_argument("--no-follow", action="store_true", help="do not stream the log after starting")
        q.add_argument("--worker", default="0", help="worker whose log is streamed")
        q.add_argument("--allow-local-run-dir", action="store_true", help="do not insist on run.dir=gs://...")
        q.add_argument("--log-every-s", type=int, default=60,
                       help="copy each worker's log to run.dir/logs/HOSTNAME.log this often while training runs")
        q.add_argument("overrides", nargs="*", help="section.key=value overrides after `--`, e.g. run.dir=gs://...")

    create_flags(sub.add_parser("create", help="create the TPU VM / queued resource"))
    install_flags(sub.add_parser("install", help="copy and install the project on every worker"))
    distill_flags(sub.add_parser("distill", help="start boomerang distill on all workers and stream the log"))
    q = sub.add_parser("logs", help="stream a worker's training log")
    q.add_argument("--worker", default="0")
    q = sub.add_parser("exec", help="run a shell command on all workers (or one: --worker 0)")
    q.add_argument("--worker", default="all", help="all (default), or one worker index (of the first slice)")
    q.add_argument("remote_command", nargs="+", metavar="COMMAND",
                   help="shell command (its words joined by spaces; put it after `--` if it has options)")
    sub.add_parser("delete", help="tear down (TPU VM or queued resource with its nodes)").add_argument(
        "--queued", action="store_true", help="it was created as a queued resource")
    q = sub.add_parser("up", help="create + install + distill [+ delete]")
    create_flags(q)
    install_flags(q)
    distill_flags(q)
    q.add_argument("--delete-after", action="store_true", help="tear down when training ends or fails")
    q.add_argument("--skip-compile", action="store_true",
                   help="do not run `boomerang compile` here before creating the TPU")
    q.add_argument("--retries", type=int, default=0,
                   help="watch the slice and recover up to N times from preemption / failure: recreate, "
                        "reinstall, resume the same run dir (default 0: no watching)")
    q.add_argument("--retry-wait-s", type=float, default=60.0, help="pause before each recovery attempt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for key, default in (("queued", False), ("spot", False)):
        if not hasattr(args, key):
            setattr(args, key, default)
    tpu = TPU(args, Runner(args.dry_run))
    getattr(tpu, args.action)()
    return 0


if __name__ == "__main__":
    main_guard(main)

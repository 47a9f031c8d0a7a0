"""`boomerang distill`: train (or resume) a student from its teacher as a run config describes (distill/config.py).

Imports of the package are lazy (the command layer), so `boomerang --help` stays fast.
"""

from __future__ import annotations

import argparse


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang distill`."""
    parser.add_argument("--config", help="run config YAML (configs/*.yaml); defaults fill what it leaves out")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value, e.g. train.lr=1e-3 data.train.batch_size=4")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps of this invocation")
    parser.add_argument("--preset",
                        help="apply the config's presets[NAME] (mesh/micro-batches for a topology, e.g. v5p-128)")
    parser.add_argument("--profile", metavar="FIRST,LAST",
                        help="write a jax.profiler trace of these steps to RUN_DIR/profile (TensorBoard / xprof), "
                             "e.g. 3,5; the same as run.profile_steps=3,5")
    parser.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                        help="jax.distributed start-up: auto-detect (default), on (every worker of a multi-host TPU "
                             "slice; the launch scripts pass this), off")


def distill_command(args: argparse.Namespace) -> int:
    """`boomerang distill --config X.yaml [--preset TOPOLOGY] [section.key=value ...]`: train (or resume).
    Exit 0 when finished (or stopped by --max-steps), 143 when preempted (SIGTERM; rerun to resume)."""
    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.infra import parallel

    overrides = [*args.overrides, *([f"run.profile_steps={args.profile}"] if getattr(args, "profile", None) else [])]
    cfg = load_run_config(args.config, overrides, preset=args.preset)  # config errors before any start-up
    if args.distributed != "off":
        parallel.initialize_distributed(force=args.distributed == "on")
    from boomerang_jax.distill.train import run_distillation

    summary = run_distillation(cfg, max_steps=args.max_steps)
    parallel.main_print(f"{summary['status']} at step {summary['step']}/{summary['total_steps']} "
                        f"(run dir {summary['run_dir']})")
    return 143 if summary["status"] == "preempted" else 0

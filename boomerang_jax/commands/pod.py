"""`boomerang plan-memory` and `boomerang compile`: a run's per-device memory, FLOPs and time on a topology,
estimated (pod/planning.py) or compiled by XLA for a TPU slice on this host (pod/aot.py).

Imports of the package are lazy (the command layer), so `boomerang --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_plan_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang plan-memory`."""
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for distill")
    parser.add_argument("--topology", action="append",
                        help="e.g. v5p-128, v5e-16, 2xv5p-128, h100x8 (repeatable; default: every preset of the "
                             "config)")
    parser.add_argument("--preset", help="use presets[NAME] (default: the preset named like the topology, if any)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for time estimates")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def plan_memory_command(args: argparse.Namespace) -> int:
    """`boomerang plan-memory`: per-device memory of a run on each topology, the run's FLOPs and time.
    Exit 0 when every topology can run the config, 2 when one cannot (it says why)."""
    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.pod.planning import accelerator_hours, describe_run, estimate_memory, run_flops, run_shape

    base = load_run_config(args.config, args.overrides)
    topologies = args.topology or list(base.presets) or ["v5p-8"]
    results = []
    for topo in topologies:
        preset = args.preset or (topo if topo in base.presets else None)
        cfg = load_run_config(args.config, args.overrides, preset=preset)
        shape = run_shape(cfg)
        try:
            plan: Any = estimate_memory(shape, topo, cfg.mesh)
        except ValueError as e:  # this topology cannot run the config as is: say why, go on with the others
            plan = e
        results.append((topo, preset, shape, plan))
    shape = results[0][2]
    flops = run_flops(shape)
    if args.json:
        print(json.dumps({"run": describe_run(shape), "flops": flops, "mfu": args.mfu, "topologies": [
            {"topology": topo, "preset": preset, "error": str(plan)} if isinstance(plan, Exception) else
            {**plan.to_dict(), "preset": preset, **accelerator_hours(flops["ours"], plan.topology, args.mfu)}
            for topo, preset, _, plan in results]}, indent=1))
        return 0 if not any(isinstance(p, Exception) for *_, p in results) else 2
    print(describe_run(shape))
    print(f"FLOPs: {flops['ours']:.3g} (ours: matmuls incl. LM heads and attention; student 3x + teacher 1x), "
          f"{flops['6ND+2ND']:.3g} (6 N_student D + 2 N_teacher D)")
    for topo, preset, _, plan in results:
        print(f"\n[{topo}]" + (f" preset {preset}" if preset else " (config mesh)"))
        if isinstance(plan, Exception):
            print(f"  cannot run as configured: {plan}")
            continue
        hours = accelerator_hours(flops["ours"], plan.topology, args.mfu)
        print(plan.table())
        if plan.topology.peak_flops:
            print(f"  time at {args.mfu:.0%} MFU: {hours['wall_hours']:.1f} h wall-clock, "
                  f"{hours['chip_hours']:.0f} chip-hours")
    return 0 if not any(isinstance(p, Exception) for *_, p in results) else 2


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang compile`."""
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for distill")
    parser.add_argument("--preset",
                        help="apply the config's presets[NAME]; also the topology when --topology is not given")
    parser.add_argument("--topology",
                        help="TPU slice, e.g. v5p-128, v5e-16, v4-32, 2xv5p-128 (default: the preset's name)")
    parser.add_argument("--programs", default="train-step,eval-step,teacher-forward",
                        help="which programs to compile (comma-separated; default all three)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def compile_command(args: argparse.Namespace) -> int:
    """`boomerang compile`: compile a run's programs for a TPU topology on this host; XLA's memory per device.
    Exit 0 when the run fits the chip's HBM, 1 when it does not, 2 when it cannot be compiled as configured."""
    from boomerang_jax.distill.config import load_run_config

    cfg = load_run_config(args.config, args.overrides, preset=args.preset)
    topology = args.topology or args.preset
    if not topology:
        raise ValueError("--topology NAME is needed (e.g. v5p-128, v5e-16, 2xv5p-128), or a --preset named like one")
    from boomerang_jax.pod.aot import CompileError, compile_config

    log = (lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr, flush=True))
    programs = [p.strip().replace("-", " ") for p in args.programs.split(",") if p.strip()]
    try:
        report = compile_config(cfg, topology, log=log, programs=programs)
    except CompileError as e:
        print(f"boomerang compile: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict() | {"config": args.config, "preset": args.preset}, indent=1) if args.json
          else report.table())
    return 0 if report.fits else 1

"""The `boomerang` command: one subcommand per stage of hf -> surgery -> distill -> eval -> export."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from boomerang_jax.hf.sources import EMBEDDED_TEACHER


def _count_params(params) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def _load_tokenizer(files: dict[str, bytes]):
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False)


def info_command(args: argparse.Namespace) -> int:
    """Load a model, print its architecture and size, and greedily continue a prompt."""
    from boomerang_jax.hf.sources import load_model
    from boomerang_jax.models.generate import greedy_generate

    t0 = time.perf_counter()
    ck = load_model(args.model)
    c = ck.config
    print(f"model      {args.model} ({c.model_type}, loaded in {time.perf_counter() - t0:.1f}s)")
    print(f"layers     {c.num_layers}, hidden {c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads} (q/kv), "
          f"head_dim {c.head_dim}, mlp {c.intermediate_size}, vocab {c.vocab_size}, "
          f"tied embeddings: {c.tie_word_embeddings}")
    print(f"parameters {_count_params(ck.params) / 1e6:.1f}M")
    if args.prompt and ck.tokenizer_files:
        tok = _load_tokenizer(ck.tokenizer_files)
        ids = tok(args.prompt)["input_ids"]
        stops = tuple(i for i in [tok.eos_token_id] if i is not None)
        t0 = time.perf_counter()
        out = greedy_generate(ck.params, c, ids, args.max_new_tokens, stop_ids=stops)
        print(f"generated  ({time.perf_counter() - t0:.1f}s, greedy) {tok.decode(out, skip_special_tokens=True)!r}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Convert any supported source (GGUF, HF dir, embedded teacher) into an HF directory."""
    from boomerang_jax.hf.export import save_hf
    from boomerang_jax.hf.sources import load_model

    ck = load_model(args.model, to_device=False)
    out = save_hf(args.out, ck.config, ck.params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files,
                  generation_config=ck.generation_config, dtype=args.dtype,
                  max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from boomerang_jax.hf.verify import verify_main

    return verify_main(args)


def distill_command(args: argparse.Namespace) -> int:
    """`boomerang distill --config X.yaml [--preset TOPOLOGY] [section.key=value ...]`: train (or resume)."""
    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.infra import parallel

    cfg = load_run_config(args.config, args.overrides, preset=args.preset)  # config errors before any start-up
    if args.distributed != "off":
        parallel.initialize_distributed(force=args.distributed == "on")
    from boomerang_jax.distill.train import run_distillation

    summary = run_distillation(cfg, max_steps=args.max_steps)
    parallel.main_print(f"{summary['status']} at step {summary['step']}/{summary['total_steps']} "
                        f"(run dir {summary['run_dir']})")
    return 143 if summary["status"] == "preempted" else 0


def plan_memory_command(args: argparse.Namespace) -> int:
    """`boomerang plan-memory`: per-device memory of a run on each topology, the run's FLOPs and time."""
    import json

    from boomerang_jax.distill.config import load_run_config
    from boomerang_jax.pod.planning import (
        accelerator_hours,
        describe_run,
        plan_memory,
        run_flops,
        run_shape,
    )

    base = load_run_config(args.config, args.overrides)
    topologies = args.topology or list(base.get("presets") or {}) or ["v5p-8"]
    results = []
    for topo in topologies:
        preset = args.preset or (topo if topo in (base.get("presets") or {}) else None)
        cfg = load_run_config(args.config, args.overrides, preset=preset)
        shape = run_shape(cfg)
        try:
            plan: Any = plan_memory(shape, topo, cfg["mesh"])
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


def compile_command(args: argparse.Namespace) -> int:
    """`boomerang compile`: compile a run's programs for a TPU topology on this host; XLA's memory per device.
    Exit 0 when the run fits the chip's HBM, 1 when it does not, 2 when it cannot be compiled as configured."""
    import json

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boomerang", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model, show its size and a greedy continuation")
    p.add_argument("model", nargs="?", default=EMBEDDED_TEACHER,
                   help=f"HF dir, hub id, .gguf file, or {EMBEDDED_TEACHER} (default: the embedded teacher)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(func=info_command)

    from boomerang_jax.demo.run import add_demo_arguments, demo_command

    p = sub.add_parser("demo", help="the main job, offline: distill the embedded SmolLM2-135M, evaluate its family")
    add_demo_arguments(p)
    p.set_defaults(func=demo_command)

    p = sub.add_parser("export", help="write a model (GGUF, HF dir, embedded teacher) as an HF directory")
    p.add_argument("model", help=f"HF dir, hub id, .gguf file, or {EMBEDDED_TEACHER}")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory (atomically)")
    p.set_defaults(func=export_command)

    p = sub.add_parser("verify", help="reload an HF export with transformers and compare logits with JAX")
    p.add_argument("path")
    p.add_argument("--num-sequences", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--atol", type=float, default=1e-3)
    p.set_defaults(func=verify_command)

    p = sub.add_parser("distill", help="distill a student from its teacher (resumes from the run's checkpoints)")
    p.add_argument("--config", help="run config YAML (configs/*.yaml); defaults fill what it leaves out")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3 data.train.batch_size=4")
    p.add_argument("--max-steps", type=int, help="stop after this many steps of this invocation")
    p.add_argument("--preset", help="apply the config's presets[NAME] (mesh/micro-batches for a topology, e.g. v5p-128)")
    p.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="jax.distributed start-up: auto-detect (default), on (every worker of a multi-host TPU "
                        "slice; the launch scripts pass this), off")
    p.set_defaults(func=distill_command)

    p = sub.add_parser("plan-memory", help="per-device memory, FLOPs and accelerator-hours of a run on a topology")
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for distill")
    p.add_argument("--topology", action="append",
                   help="e.g. v5p-128, v5e-16, 2xv5p-128, h100x8 (repeatable; default: every preset of the config)")
    p.add_argument("--preset", help="use presets[NAME] (default: the preset named like the topology, if any)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for time estimates")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=plan_memory_command)

    p = sub.add_parser("compile", help="compile a run for a TPU topology on this CPU host: XLA's memory per device")
    p.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, as for distill")
    p.add_argument("--preset", help="apply the config's presets[NAME]; also the topology when --topology is not given")
    p.add_argument("--topology", help="TPU slice, e.g. v5p-128, v5e-16, v4-32, 2xv5p-128 (default: the preset's name)")
    p.add_argument("--programs", default="train-step,eval-step,teacher-forward",
                   help="which programs to compile (comma-separated; default all three)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=compile_command)

    from boomerang_jax.commands.eval import add_eval_arguments, eval_command
    from boomerang_jax.data.prepare import add_prepare_arguments, prepare_command
    from boomerang_jax.data.teacher_text import add_teacher_text_arguments, teacher_text_command
    from boomerang_jax.eval.harness import add_lm_eval_arguments, lm_eval_command
    from boomerang_jax.surgery.family_export import (
        add_interpolate_arguments,
        add_prune_arguments,
        interpolate_command,
        prune_command,
    )

    for name, help_, add, func in [
        ("prepare-data", "tokenise a text source into ArrayRecord shards for training/evaluation",
         add_prepare_arguments, prepare_command),
        ("teacher-text", "sample training text from the teacher itself, as jsonl (mix it into the training data)",
         add_teacher_text_arguments, teacher_text_command),
        ("prune", "write the (undistilled) student of a teacher for a layer plan, as an HF dir with its plan",
         add_prune_arguments, prune_command),
        ("interpolate", "export the zero-shot family of sizes from a student and its teacher",
         add_interpolate_arguments, interpolate_command),
        ("eval", "perplexity of an HF dir, a whole family or a training checkpoint on text or prepared data",
         add_eval_arguments, eval_command),
        ("lm-eval", "run lm-evaluation-harness on every size of a family and add the scores to a CSV",
         add_lm_eval_arguments, lm_eval_command),
    ]:
        p = sub.add_parser(name, help=help_)
        add(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # our errors name the file/key/value: show them plainly
        print(f"boomerang {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

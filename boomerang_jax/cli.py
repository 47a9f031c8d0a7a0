"""The `boomerang` command: one subcommand per stage of hf -> surgery -> distill -> eval -> export."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

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
    from boomerang_jax.commands.verify import verify_main

    return verify_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boomerang", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model, show its size and a greedy continuation")
    p.add_argument("model", nargs="?", default=EMBEDDED_TEACHER,
                   help=f"HF dir, hub id, .gguf file, or {EMBEDDED_TEACHER} (default: the embedded teacher)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(func=info_command)

    from boomerang_jax.commands.demo import add_demo_arguments, demo_command

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

    from boomerang_jax.commands.data import (
        add_prepare_arguments,
        add_teacher_text_arguments,
        prepare_command,
        teacher_text_command,
    )
    from boomerang_jax.commands.distill import add_distill_arguments, distill_command
    from boomerang_jax.commands.eval import add_eval_arguments, eval_command
    from boomerang_jax.commands.family import (
        add_interpolate_arguments,
        add_prune_arguments,
        interpolate_command,
        prune_command,
    )
    from boomerang_jax.commands.lm_eval import add_lm_eval_arguments, lm_eval_command
    from boomerang_jax.commands.pod import (
        add_compile_arguments,
        add_plan_memory_arguments,
        compile_command,
        plan_memory_command,
    )

    for name, help_, add, func in [
        ("distill", "distill a student from its teacher (resumes from the run's checkpoints)",
         add_distill_arguments, distill_command),
        ("plan-memory", "per-device memory, FLOPs and accelerator-hours of a run on a topology",
         add_plan_memory_arguments, plan_memory_command),
        ("compile", "compile a run for a TPU topology on this CPU host: XLA's memory per device",
         add_compile_arguments, compile_command),
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

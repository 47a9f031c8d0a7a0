"""The `boomerang` command: one subcommand per stage of hf -> surgery -> distill -> eval -> export."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Sequence


def verify_command(args: argparse.Namespace) -> int:
    from boomerang_jax.commands.verify import verify_main

    return verify_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boomerang", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="reload an HF export with transformers and compare logits with JAX")
    p.add_argument("path")
    p.add_argument("--num-sequences", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--rtol", type=float, default=1e-4, help="largest difference relative to the largest |logit|")
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
        add_materialise_arguments,
        add_pick_arguments,
        add_prune_arguments,
        interpolate_command,
        materialise_command,
        pick_command,
        prune_command,
    )
    from boomerang_jax.commands.lm_eval import add_lm_eval_arguments, lm_eval_command
    from boomerang_jax.commands.pod import (
        add_compile_arguments,
        add_plan_memory_arguments,
        compile_command,
        plan_memory_command,
    )

    from boomerang_jax.commands.demo import add_demo_arguments, demo_command
    from boomerang_jax.commands.model import add_export_arguments, add_info_arguments, export_command, info_command
    from boomerang_jax.commands.upload import add_upload_arguments, upload_command

    for name, help_, add, func in [
        ("demo", "the main job, offline: distill the embedded SmolLM2-135M, evaluate its family", add_demo_arguments,
         demo_command),
        ("info", "load a model, show its size and a greedy continuation", add_info_arguments, info_command),
        ("export", "write a model (GGUF, HF dir, embedded teacher) as an HF directory", add_export_arguments,
         export_command),
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
        ("interpolate", "export the zero-shot family of sizes from a student and its teacher (--compact: "
         "store teacher + student only)", add_interpolate_arguments, interpolate_command),
        ("materialise", "write one size of a family (any patched set) as a plain HF directory with its model card",
         add_materialise_arguments, materialise_command),
        ("pick", "choose the family size that fits a parameter or memory budget (the best one when results exist)",
         add_pick_arguments, pick_command),
        ("upload", "push a size or a family to the Hugging Face hub (--dry-run shows what goes where)",
         add_upload_arguments, upload_command),
        ("eval", "perplexity of an HF dir, a whole family or a training checkpoint on text or prepared data",
         add_eval_arguments, eval_command),
        ("lm-eval", "run lm-evaluation-harness on every size of a family and add the scores to a CSV",
         add_lm_eval_arguments, lm_eval_command),
    ]:
        p = sub.add_parser(name, help=help_)
        add(p)
        p.set_defaults(func=func)
    return parser


# what to add to an OSError's own message (which names the file) so the user knows what to do
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space and rerun (a run resumes from its last checkpoint; an export or "
                  "dataset that was being replaced is left as it was)",
    errno.EDQUOT: "the disk quota is exhausted: free space and rerun",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "permission denied: write somewhere you may write, or fix the permissions",
    errno.EPERM: "operation not permitted: write somewhere else, or fix the permissions",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. Errors a user can act on (bad input, a full or read-only disk, a stopped run) end in
    one line naming the file, key or value, with exit status 2; BOOMERANG_TRACEBACK=1 shows the traceback."""
    args = build_parser().parse_args(argv)
    from boomerang_jax.distill.checkpoint import RunStopped

    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RunStopped) as e:  # errors name the file/key/value
        if os.environ.get("BOOMERANG_TRACEBACK"):
            raise
        message = str(e).strip() or type(e).__name__
        if isinstance(e, OSError) and e.errno in _OS_HINTS:
            message = f"{message} ({_OS_HINTS[e.errno]})"
        print(f"boomerang {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

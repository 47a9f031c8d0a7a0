"""`boomerang lm-eval`: lm-evaluation-harness (boomerang_jax.eval.harness) on every size of a family, or on one
HF directory, with the scores added to a CSV."""

from __future__ import annotations

import argparse

from boomerang_jax.eval.harness import harness_over_family, merge_into_csv, run_harness
from boomerang_jax.infra import storage
from boomerang_jax.surgery.family_export import FAMILY_FILE


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang lm-eval`."""
    parser.add_argument("family_dir", help="a family directory (family.json) or a single HF directory; local or gs://")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", help="directory of local task YAMLs (offline tasks)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=float, help="examples per task (for a quick look)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the harness loads each model in (bfloat16 halves GPU memory)")
    parser.add_argument("--results-csv", help="CSV to add the scores to (default: FAMILY_DIR/lm_eval.csv)")


def lm_eval_command(args: argparse.Namespace) -> int:
    """`boomerang lm-eval`: run the harness on every size and add the scores to a CSV."""
    tasks = [t for t in args.tasks.split(",") if t]
    kwargs = dict(include_path=args.include_path, batch_size=args.batch_size, device=args.device,
                  dtype=getattr(args, "dtype", "float32"),
                  limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit)
    family_dir = str(args.family_dir)
    if storage.exists(storage.join(family_dir, FAMILY_FILE)):
        rows = harness_over_family(family_dir, tasks, **kwargs)
    else:
        scores = run_harness(family_dir, tasks, **kwargs)
        rows = [{"dir": storage.name(family_dir), **{f"{t}/{m}": v for t, ms in scores.items() for m, v in ms.items()}}]
    out = args.results_csv or storage.join(family_dir, "lm_eval.csv")
    merge_into_csv(out, rows)
    for row in rows:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"scores added to {out}")
    return 0

"""`boomerang lm-eval`: lm-evaluation-harness on every size of a family (compact or full), or on one HF
directory, resumable: each (size, task) is recorded as it finishes (boomerang_jax.eval.lm_runs)."""

from __future__ import annotations

import argparse


def add_lm_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang lm-eval`."""
    parser.add_argument("family_dir", help="a family directory (family.json; compact or full) or a single HF "
                                           "directory; local or gs://")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", help="directory of local task YAMLs (offline tasks)")
    parser.add_argument("--backend", default="boomerang", choices=["boomerang", "hf"],
                        help="boomerang: our JAX forward, each size built in memory (default); hf: the harness's "
                             "PyTorch `hf` model on each size's directory")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=float, help="examples per task (for a quick look)")
    parser.add_argument("--device", default="cpu", help="hf backend: cpu, cuda, cuda:0, ... (boomerang uses "
                                                        "JAX's local devices)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute dtype (bfloat16 halves memory)")
    parser.add_argument("--results-csv", help="CSV to add the scores to (default: FAMILY_DIR/lm_eval.csv); the "
                                              "rows go to its .jsonl, the harness's full output per size to its "
                                              "stem directory")


def lm_eval_command(args: argparse.Namespace) -> int:
    """`boomerang lm-eval`: evaluate every unfinished (size, task) and record each as it finishes."""
    from boomerang_jax.eval.lm_runs import Settings, harness_over_family
    from boomerang_jax.infra import storage

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    settings = Settings(backend=getattr(args, "backend", "boomerang"), num_fewshot=getattr(args, "num_fewshot", None),
                        limit=limit, batch_size=args.batch_size, dtype=getattr(args, "dtype", "float32"),
                        include_path=args.include_path, device=getattr(args, "device", "cpu"))
    family_dir = str(args.family_dir)
    out = args.results_csv or storage.join(family_dir, "lm_eval.csv")
    tasks = [t for t in args.tasks.split(",") if t]
    added = harness_over_family(family_dir, tasks, results_csv=out, settings=settings)
    print(f"{len(added)} (size, task) rows added to {out}")
    return 0

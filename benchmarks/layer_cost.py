#!/usr/bin/env python3
"""One decoder layer's forward + backward, xla vs splash attention, by XLA's cost model of a TPU chip.

    .venv/bin/python benchmarks/layer_cost.py                     # Qwen3-4B layer, 16 x 2048 tokens, one v5p chip
    .venv/bin/python benchmarks/layer_cost.py --json benchmarks/results/layer_cost.json

THIS IS XLA'S COST MODEL OF A v5p CHIP, NOT A MEASUREMENT: the layer is compiled ahead of time for one chip of a
libtpu-described topology on a CPU-only host, and `compiled.cost_analysis()` gives XLA's estimate of its `flops`,
`bytes accessed` and (where libtpu reports it) `optimal_seconds`; `memory_analysis()` its temporaries. A loop body
is counted once by that model, so the layer is compiled alone (no layer scan): one `Block` of the model
(models/transformer.py) at the paper's Qwen3-4B shapes (hidden 2560, 32 query / 8 key-value heads of 128, MLP
9728, q/k norm), T = 2048, the per-device micro-batch of the v5p-128 preset (2048 rows / 2 micro-batches / 64
chips = 16 rows), bf16 compute, float32 parameters, the vector-Jacobian product for a cotangent of the output
(gradients of the layer's parameters and input). The splash kernel is a Mosaic custom call: XLA's model may
count it differently from the einsums it replaces (its flops and bytes are the kernel's own cost estimate).
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

from boomerang_jax.hf.known_configs import KNOWN_CONFIGS  # noqa: E402
from boomerang_jax.infra.topology import GIB, parse_topology  # noqa: E402
from boomerang_jax.models.config import ModelConfig  # noqa: E402
from boomerang_jax.models.attention import attend  # noqa: E402
from boomerang_jax.models.transformer import Block, attention_inputs, rope_tables  # noqa: E402
from boomerang_jax.pod.aot import topology_devices  # noqa: E402

NOTE = "XLA's cost model of one {kind} chip (libtpu AOT compile on a CPU host), not a measurement"


def compile_layer(config: ModelConfig, implementation: str, device, rows: int, seq: int) -> dict:
    """Forward + backward of one Block with `implementation` attention, compiled for `device`."""
    mesh = Mesh([device], ("x",))
    one = NamedSharding(mesh, P())
    block = Block(config, jnp.bfloat16, jnp.float32, implementation=implementation)
    positions = jnp.broadcast_to(jnp.arange(seq), (rows, seq))

    def vjp(params, h, segment_ids, ct):
        cos, sin = rope_tables(config, positions)
        mask = attention_inputs(implementation, segment_ids)

        def f(params, h):
            out, _ = block.apply(params, h, cos, sin, mask, jnp.zeros((), jnp.int32))
            return out

        _, pull = jax.vjp(f, params, h)
        return pull(ct)

    h = jax.ShapeDtypeStruct((rows, seq, config.hidden_size), jnp.bfloat16, sharding=one)
    seg = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=one)

    def init(h, seg):
        cos, sin = rope_tables(config, positions)
        reference = Block(config, jnp.bfloat16, jnp.float32)  # the same parameters for any attention
        return reference.init(jax.random.key(0), h, cos, sin, attention_inputs("xla", seg), jnp.zeros((), jnp.int32))

    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                          jax.eval_shape(init, jnp.zeros(h.shape, h.dtype), jnp.ones(seg.shape, seg.dtype)))
    # Mosaic refuses float32-precision dots on bf16 operands; the step lifts a "highest" precision the same way
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(vjp).lower(params, h, seg, h).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
            "optimal_seconds": float(cost["optimal_seconds"]) if "optimal_seconds" in cost else None,
            "temp": int(compiled.memory_analysis().temp_size_in_bytes)}


def compile_attention(config: ModelConfig, implementation: str, device, rows: int, seq: int) -> dict:
    """Forward + backward of the attention alone (q, k, v -> output), to see what the cost model counts for it."""
    mesh = Mesh([device], ("x",))
    one = NamedSharding(mesh, P())
    c = config
    q = jax.ShapeDtypeStruct((rows, seq, c.num_heads, c.head_dim), jnp.bfloat16, sharding=one)
    kv = jax.ShapeDtypeStruct((rows, seq, c.num_kv_heads, c.head_dim), jnp.bfloat16, sharding=one)
    seg = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=one)

    def vjp(q, k, v, s, ct):
        _, pull = jax.vjp(lambda *a: attend(*a, implementation=implementation, dtype=jnp.bfloat16, segment_ids=s),
                          q, k, v)
        return pull(ct)

    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(vjp).lower(q, kv, kv, seg, q).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes": float(cost.get("bytes accessed", 0.0)),
            "optimal_seconds": float(cost["optimal_seconds"]) if "optimal_seconds" in cost else None,
            "temp": int(compiled.memory_analysis().temp_size_in_bytes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen3-4B-Base", choices=sorted(KNOWN_CONFIGS))
    ap.add_argument("--topology", default="v5p-8", help="a v5p (or other TPU) slice; one chip of it is compiled for")
    ap.add_argument("--rows", type=int, default=16, help="rows per device (Qwen3-4B v5p-128: 2048 / 2 / 64)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    config = ModelConfig.from_hf(KNOWN_CONFIGS[args.model])
    device = topology_devices(args.topology)[0]
    note = NOTE.format(kind=device.device_kind)
    print(f"{note}.")
    print(f"one {args.model} decoder layer, forward + backward, {args.rows} rows x {args.seq} tokens, bf16 compute")
    out = {}
    for impl in ("xla", "splash"):
        out[impl] = compile_layer(config, impl, device, args.rows, args.seq)
        r = out[impl]
        opt = "n/a" if r["optimal_seconds"] is None else f"{1e3 * r['optimal_seconds']:.2f} ms"
        print(f"  {impl:<7} flops {r['flops']:.4g}  bytes accessed {r['bytes']:.4g}  optimal_seconds {opt}  "
              f"temporaries {r['temp'] / GIB:.2f} GiB", flush=True)
    causal = 2 * 2 * args.rows * args.seq * args.seq * config.num_heads * config.head_dim / 2 * 3.5
    print(f"attention alone, forward + backward (causal work by hand: ~{causal:.3g} flops: QK^T and PV over half "
          "the T x T scores, backward ~2.5x forward)")
    alone = {}
    for impl in ("xla", "splash"):
        alone[impl] = r = compile_attention(config, impl, device, args.rows, args.seq)
        opt = "n/a" if r["optimal_seconds"] is None else f"{1e3 * r['optimal_seconds']:.2f} ms"
        print(f"  {impl:<7} flops {r['flops']:.4g}  bytes accessed {r['bytes']:.4g}  optimal_seconds {opt}  "
              f"temporaries {r['temp'] / GIB:.2f} GiB", flush=True)
    x, s = out["xla"], out["splash"]
    ratios = {k: (s[k] / x[k] if x[k] and s[k] is not None else None)
              for k in ("flops", "bytes", "optimal_seconds", "temp")}
    print("  splash / xla: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items() if v is not None)
          + f"  ({note})")
    # The Mosaic kernel is nearly invisible to the model (compare the two attention-alone rows): add its causal
    # work back at the chip's peak bf16 rate, a lower bound on its time, for a fairer ratio of estimated seconds.
    peak = parse_topology(args.topology).generation.peak_tflops * 1e12
    adjusted = None
    if s["optimal_seconds"] is not None and alone["splash"]["optimal_seconds"] is not None:
        adjusted = s["optimal_seconds"] - alone["splash"]["optimal_seconds"] + causal / peak
        print(f"  splash with the kernel's causal flops counted at the {peak / 1e12:.0f} TFLOP/s peak: "
              f"{1e3 * adjusted:.2f} ms, {adjusted / x['optimal_seconds']:.3f} x xla's estimate (at half the peak: "
              f"{(adjusted + causal / peak) / x['optimal_seconds']:.3f})")
    if args.json:
        args.json.write_text(json.dumps({"note": note, "model": args.model, "topology": args.topology,
                                         "device_kind": device.device_kind, "rows": args.rows, "seq": args.seq,
                                         "jax": jax.__version__, **out, "splash_over_xla": ratios,
                                         "attention_alone": alone, "causal_attention_flops_by_hand": causal,
                                         "peak_flops": peak, "splash_optimal_seconds_kernel_at_peak": adjusted}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

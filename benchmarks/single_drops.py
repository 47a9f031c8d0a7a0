"""What does each teacher layer cost when it is dropped alone, and which of them does a plan drop?

A plan's student layer i starts as teacher layer kept[i] and stands in for its whole block, so before any
training a 2-layer block's stand-in is the teacher without the block's second layer. Near the teacher the
family is one such block short of it (teacher - 1 layers), against ShortGPT's teacher without its least
influential layer. This script measures, on the demo's held-out texts, the teacher with each single layer
dropped, next to ShortGPT's block influence on the calibration text, and marks the layers each plan given
drops: the plan whose dropped layers are cheap to lose starts its stand-ins closer to the teacher.

    .venv/bin/python benchmarks/single_drops.py --run runs/demo [--plan every=2,first=2,last=1 ...] [--json F]

Needs the run's teacher and data stages only. One model per layer, evaluated with shared prefixes (each agrees
with the teacher up to its dropped layer): about half of 30 teacher evaluations per text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from boomerang_jax.demo.run import eval_batches
from boomerang_jax.demo.settings import DemoSettings
from boomerang_jax.eval.perplexity import summarise
from boomerang_jax.eval.shared_prefix import SharedPrefixEval
from boomerang_jax.hf.load import load_hf
from boomerang_jax.surgery import LayerPlan
from boomerang_jax.surgery.baselines import block_influence, drop_layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a demo run directory with its teacher and data stages")
    ap.add_argument("--eval-tokens", type=int, default=DemoSettings().eval_tokens)
    ap.add_argument("--plan", action="append", help="plan specs whose dropped layers to mark (repeatable; "
                                                    "default: the demo's and every=2,first=2,last=1)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    out = Path(args.run)
    s = DemoSettings(out=str(out), eval_tokens=args.eval_tokens)
    teacher = load_hf(out / "teacher", to_device=False)
    n = teacher.config.num_layers
    plans = {spec: LayerPlan.parse(spec, n) for spec in (args.plan or [s.plan, "every=2,first=2,last=1"])}
    influence = block_influence(teacher.params, teacher.config,
                                eval_batches(s, out / "data" / "sotu", "validation", s.calib_tokens))
    texts = {t: eval_batches(s, out / "data" / t, "test", s.eval_tokens) for t in s.heldout}
    shared = SharedPrefixEval(texts, chunk=128)
    shared.add(None, teacher.config, teacher.params)
    for layer in range(1, n):
        shared.add(layer, *drop_layers(teacher.params, teacher.config, [layer]))
    ppl: dict[str, dict[int | None, float]] = {t: {} for t in texts}
    for ident, text, sums, counts, seconds in shared.run({m: list(texts) for m in shared.members}):
        ppl[text][ident] = summarise(sums, counts).perplexity
        print(f"{text:12s} without layer {ident}: perplexity {ppl[text][ident]:8.2f} ({seconds:.0f} s)", flush=True)
    rows = [{"layer": layer, "influence": float(influence[layer]),
             **{f"ppl_{t}": ppl[t][layer] for t in texts},
             "dropped_by": [spec for spec, p in plans.items() if layer not in p.kept]} for layer in range(1, n)]
    summary = {"teacher": {t: ppl[t][None] for t in texts}, "shortgpt_first_drop": int(np.argmin(influence)),
               "plans": {}}
    for spec, p in plans.items():
        dropped = [layer for layer in range(n) if layer not in p.kept]
        # summed log-perplexity increase of its dropped layers, each dropped alone (not additive: a guide only)
        cost = {t: float(sum(np.log(ppl[t][layer] / ppl[t][None]) for layer in dropped)) for t in texts}
        summary["plans"][spec] = {"dropped": dropped, "summed_log_ppl_increase": cost}
        print(f"plan {spec}: drops {dropped}; summed single-drop log-ppl increase "
              + ", ".join(f"{t} {c:.2f}" for t, c in cost.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

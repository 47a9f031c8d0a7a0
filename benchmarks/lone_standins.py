"""How good is each student layer as a stand-in for its block, one block from the teacher?

The demo's family is one block short of the teacher at teacher - 1 layers: every block is the teacher's but
one, which is the student's layer (with the single-layer blocks next to it, as the family has them). Which
block that is depends on the patch order; this script evaluates all of them (one model per block) on the demo's
held-out texts and compares each with ShortGPT at the same depth, read from the run's own eval rows, by the
same paired bootstrap the report uses. If no block beats ShortGPT on a text, no patch order can make the
family win there at that size: the limit is the student's layers, not the order.

    .venv/bin/python benchmarks/lone_standins.py --run runs/demo [--eval-tokens 8192]

Needs a finished demo run (teacher, data, distill, eval stages). Evaluates one model per block with shared
prefixes (the models agree with the teacher up to their block), so it costs about a third of the demo's eval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from boomerang_jax.demo.report import paired
from boomerang_jax.demo.run import eval_batches, read_rows
from boomerang_jax.demo.settings import DemoSettings
from boomerang_jax.distill.checkpoint import read_student_checkpoint
from boomerang_jax.eval.perplexity import summarise
from boomerang_jax.eval.shared_prefix import SharedPrefixEval
from boomerang_jax.hf.load import load_hf
from boomerang_jax.surgery import LayerPlan, interpolate
from boomerang_jax.surgery.family_export import read_family
from boomerang_jax.surgery.plan import patched_first
from boomerang_jax.surgery.tensors import materialise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/demo", help="a finished demo run directory")
    ap.add_argument("--eval-tokens", type=int, default=DemoSettings().eval_tokens)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    out = Path(args.run)
    s = DemoSettings(out=str(out), eval_tokens=args.eval_tokens)
    family = read_family(out / "family")
    plan = LayerPlan.from_dict(family["plan"])
    teacher = load_hf(out / "teacher", to_device=False)
    student = read_student_checkpoint(out / "distill")
    student_model = (student.config, materialise(student))
    teacher_model = (teacher.config, teacher.params)
    blocks = list(plan.multi_layer_blocks)
    texts = {t: eval_batches(s, out / "data" / t, "test", s.eval_tokens) for t in s.heldout}
    shared = SharedPrefixEval(texts, chunk=128)
    depth = plan.num_layers(patched_first(plan, blocks[1:]))  # the same for every block left the student's
    for b in blocks:
        shared.add(b, *interpolate(student_model, teacher_model, plan,
                                   patched_first(plan, [x for x in blocks if x != b])))
    shortgpt = {r["text"]: r for r in read_rows(s, out) if r["method"] == "shortgpt" and r["num_layers"] == depth}
    rows = []
    for b, text, sums, counts, seconds in shared.run({b: list(texts) for b in blocks}):
        res = summarise(sums, counts)
        row = {"block": b, "text": text, "num_layers": depth, "perplexity": res.perplexity,
               "row_nll": [float(x) for x in sums], "row_tokens": [int(x) for x in counts]}
        base = shortgpt.get(text)
        diff = paired(row, base) if base else None
        vs = (f"ShortGPT {base['perplexity']:.2f}: log-ppl difference {diff.diff:+.4f} "
              f"[{diff.ci_low:+.4f}, {diff.ci_high:+.4f}]" if diff else "no ShortGPT row")
        print(f"{text:12s} block {b:2d} ({depth} layers): perplexity {res.perplexity:7.2f}  vs {vs}  "
              f"({seconds:.0f} s)", flush=True)
        rows.append({**row, "shortgpt": base["perplexity"] if base else None,
                     "diff": None if diff is None else [diff.diff, diff.ci_low, diff.ci_high]})
    for text in texts:
        mine = [r for r in rows if r["text"] == text]
        best = min(mine, key=lambda r: r["perplexity"])
        wins = [r["block"] for r in mine if r["diff"] and r["diff"][2] < 0]
        print(f"{text}: best lone stand-in block {best['block']} ({best['perplexity']:.2f}); "
              f"significantly better than ShortGPT: {wins or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

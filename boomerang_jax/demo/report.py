"""The demo's outputs from its evaluation rows: results.csv, results.md and family.png.

Rows are eval.jsonl records, one per (held-out text, method, layer count), each with its perplexity, 95%
bootstrap interval and per-row NLL sums and token counts (`row_nll`, `row_tokens`). The family is compared
with each baseline at each size by a PAIRED bootstrap over the same evaluation rows (eval.perplexity's
`paired_bootstrap`) of the log-perplexity difference: the claim "boomerang beats X at N layers" holds with 95%
confidence where that interval lies below 0.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

from boomerang_jax.eval.perplexity import PairedDifference, paired_bootstrap

METHOD_ORDER = ("boomerang", "naive-pruning", "shortgpt", "boomerang-last-to-first", "boomerang-first-to-last")
BASELINES = ("naive-pruning", "shortgpt")
LABELS = {"boomerang": "boomerang (distilled student, patched)", "naive-pruning": "naive pruning (no distillation)",
          "shortgpt": "ShortGPT layer dropping (no training)",
          "boomerang-last-to-first": "boomerang, paper's last-to-first order",
          "boomerang-first-to-last": "boomerang, paper's first-to-last order"}
DEFAULT_TEXT = "heldout"  # the text of rows written before rows named theirs


def split_texts(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by held-out text, texts in order of first appearance (rows without `text`: DEFAULT_TEXT)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r.get("text") or DEFAULT_TEXT, []).append(r)
    return out


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[int], dict[tuple[str, int], dict[str, Any]]]:
    by = {(r["method"], r["num_layers"]): r for r in rows}  # a later row of the same key wins (re-evaluated)
    layers = sorted({r["num_layers"] for r in rows})
    return layers, by


def paired(a: dict[str, Any], b: dict[str, Any], *, bootstrap: int = 1000, seed: int = 0) -> PairedDifference | None:
    """A's minus B's log-perplexity on their shared rows with a paired 95% interval; None without row stats."""
    if not a.get("row_nll") or not b.get("row_nll"):
        return None
    return paired_bootstrap(a["row_nll"], a["row_tokens"], b["row_nll"], b["row_tokens"], bootstrap=bootstrap,
                            seed=seed)


def comparisons(rows: Sequence[dict[str, Any]], baselines: Sequence[str] = BASELINES) -> list[dict[str, Any]]:
    """For one text's rows: boomerang vs each baseline at every intermediate size (not the student's, not the
    teacher's depth): both perplexities and the paired difference (None when the rows lack row stats)."""
    layers, by = _table(rows)
    out = []
    for m in baselines:
        for n in layers[1:-1]:
            a, b = by.get(("boomerang", n)), by.get((m, n))
            if a and b:
                out.append({"baseline": m, "num_layers": n, "boomerang": a["perplexity"], "other": b["perplexity"],
                            "better": a["perplexity"] < b["perplexity"], "paired": paired(a, b)})
    return out


def describe(c: dict[str, Any]) -> str:
    """One comparison in words: who is better, by how much, and whether the paired interval excludes 0."""
    d: PairedDifference | None = c["paired"]
    side = "better" if c["better"] else "worse"
    if d is None:
        return f"boomerang {side} ({c['boomerang']:.2f} vs {c['other']:.2f}); no paired interval (no row stats)"
    sig = ("significant: the 95% interval excludes 0" if d.significant
           else "NOT significant: the 95% interval includes 0")
    return (f"boomerang {side} ({c['boomerang']:.2f} vs {c['other']:.2f}), log-ppl difference {d.diff:+.4f} "
            f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}], {sig}")


def _sizes(ns: Sequence[int]) -> str:
    return ", ".join(map(str, ns)) + (" layers" if ns else "")


def verdict(rows: Sequence[dict[str, Any]], text: str | None = None) -> str:
    """Plain-language check of the paper's claim on one text's rows: the family falls from student to teacher,
    and beats each baseline at every intermediate size; where it does, whether the paired interval excludes 0."""
    layers, by = _table(rows)
    fam = [by[("boomerang", n)] for n in layers if ("boomerang", n) in by]
    notes = [f"On {text}:"] if text else []
    bumps = [f"{a['num_layers']}->{b['num_layers']} layers" for a, b in zip(fam, fam[1:])
             if b["ci_low"] > a["ci_high"]]
    notes.append("Boomerang perplexity decreases from student to teacher within the intervals."
                 if not bumps else f"Boomerang perplexity rises beyond the intervals at {', '.join(bumps)}.")
    cmp = comparisons(rows)
    for m in BASELINES:
        mine = [c for c in cmp if c["baseline"] == m]
        if not mine:
            continue
        worse = [c["num_layers"] for c in mine if not c["better"]]
        head = (f"Boomerang beats {m} at every intermediate size." if not worse
                else f"Boomerang does NOT beat {m} at every intermediate size: it is worse at {_sizes(worse)}.")
        if all(c["paired"] is None for c in mine):
            notes.append(head)
            continue
        groups: dict[str, list[int]] = {}
        for label, better, sig in (("significantly better", True, True), ("better, not significantly,", True, False),
                                   ("worse, not significantly,", False, False), ("significantly worse", False, True)):
            ns = [c["num_layers"] for c in mine if c["paired"] is not None and c["better"] == better
                  and c["paired"].significant == sig]
            if ns:
                groups[label] = ns
        if list(groups) == ["significantly better"]:
            notes.append(f"{head[:-1]}, significantly at every one (paired 95% interval of the difference below 0).")
        else:
            parts = [f"{label} at {_sizes(ns)}" for label, ns in groups.items()]
            notes.append(f"{head} Paired 95% intervals: {'; '.join(parts)}.")
    return " ".join(notes)


def _methods(by: dict[tuple[str, int], Any]) -> list[str]:
    return [m for m in METHOD_ORDER if any(k[0] == m for k in by)]


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per size: layers, parameters, and for each text each method's perplexity with its 95% interval
    and each baseline's paired log-perplexity difference (boomerang - baseline) with its interval. The first
    text's columns have no prefix (`boomerang/perplexity`), the others' are prefixed `TEXT:`."""
    texts = split_texts(rows)
    tables = {t: _table(rs) for t, rs in texts.items()}
    layers = sorted({n for ls, _ in tables.values() for n in ls})
    cols = ["dir", "k", "num_layers", "params", "non_embedding_params"]
    cells: dict[int, dict[str, Any]] = {n: {} for n in layers}
    for i, (t, (_, by)) in enumerate(tables.items()):
        pre = "" if i == 0 else f"{t}:"
        methods = _methods(by)
        for m in methods:
            cols += [f"{pre}{m}/perplexity", f"{pre}{m}/ci_low", f"{pre}{m}/ci_high", f"{pre}{m}/params"]
        for m in (b for b in BASELINES if b in methods):
            cols += [f"{pre}vs-{m}/logppl_diff", f"{pre}vs-{m}/diff_low", f"{pre}vs-{m}/diff_high",
                     f"{pre}vs-{m}/significant"]
        for n in layers:
            for m in methods:
                r = by.get((m, n))
                if r:
                    cells[n].update({f"{pre}{m}/perplexity": f"{r['perplexity']:.4f}",
                                     f"{pre}{m}/ci_low": f"{r['ci_low']:.4f}",
                                     f"{pre}{m}/ci_high": f"{r['ci_high']:.4f}", f"{pre}{m}/params": r["params"]})
        for c in comparisons(texts[t]):
            d = c["paired"]
            if d is not None:
                m = c["baseline"]
                cells[c["num_layers"]].update({f"{pre}vs-{m}/logppl_diff": f"{d.diff:.5f}",
                                               f"{pre}vs-{m}/diff_low": f"{d.ci_low:.5f}",
                                               f"{pre}vs-{m}/diff_high": f"{d.ci_high:.5f}",
                                               f"{pre}vs-{m}/significant": str(d.significant).lower()})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for n in layers:
            base = next(by.get(("boomerang", n)) or next((v for k, v in by.items() if k[1] == n), None)
                        for _, by in tables.values() if any(k[1] == n for k in by))
            w.writerow({"dir": base.get("dir", ""), "k": base.get("k", ""), "num_layers": n, "params": base["params"],
                        "non_embedding_params": base["non_embedding_params"], **cells[n]})


def _text_section(rows: Sequence[dict[str, Any]], text: str, about: str) -> list[str]:
    layers, by = _table(rows)
    methods = _methods(by)
    tokens = rows[0]["tokens"] if rows else 0
    lines = [f"## Held-out text: {text}", "", f"{about}: perplexity on {tokens} tokens (95% bootstrap interval over "
             "rows); parameters are unique non-embedding parameters of the boomerang model of that depth.", "",
             "| layers | non-emb. params | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for n in layers:
        base = by.get(("boomerang", n)) or next(v for k, v in by.items() if k[1] == n)
        cells = []
        for m in methods:
            r = by.get((m, n))
            cells.append(f"{r['perplexity']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r else "")
        lines.append(f"| {n} | {base['non_embedding_params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    cmp = comparisons(rows)
    if cmp:
        lines += ["", f"Boomerang minus baseline on {text}, size by size: log-perplexity difference (mean NLL per "
                  "token, nats; below 0 = boomerang better) with a paired 95% bootstrap interval (the same resampled "
                  "rows for both models).", ""]
        lines += [f"- {c['num_layers']} layers vs {c['baseline']}: {describe(c)}" for c in cmp]
    lines += ["", verdict(rows, text), ""]
    return lines


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, title: str,
                   about: dict[str, str] | None = None) -> None:
    """results.md: per held-out text, the perplexity table, the paired comparisons in words, and the verdict."""
    texts = split_texts(rows)
    about = about or {}
    lines = [f"# {title}", ""]
    if len(texts) > 1:
        lines += ["Verdicts:", ""] + [f"- {verdict(rs, t)}" for t, rs in texts.items()] + [""]
    for t, rs in texts.items():
        lines += _text_section(rs, t, about.get(t, "Held-out text"))
    path.write_text("\n".join(lines))


def write_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """family.png: perplexity against non-embedding parameters, one panel per held-out text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = split_texts(rows)
    fig, axes = plt.subplots(1, len(texts), figsize=(7 * len(texts), 4.5), dpi=120, squeeze=False)
    for ax, (text, rs) in zip(axes[0], texts.items()):
        layers, by = _table(rs)
        for m, marker in zip(METHOD_ORDER, "osd^v"):
            pts = [(by[(m, n)]["non_embedding_params"] / 1e6, by[(m, n)]) for n in layers if (m, n) in by]
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1]["perplexity"] for p in pts]
            err = [[r["perplexity"] - r["ci_low"] for _, r in pts], [r["ci_high"] - r["perplexity"] for _, r in pts]]
            ax.errorbar(x, y, yerr=err, marker=marker, capsize=2, label=LABELS[m])
        ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters (M)")
        ax.set_ylabel(f"perplexity on {text} (log scale)")
        ax.set_title(f"{title}: {text}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: Sequence[dict[str, Any]], out: Path, title: str, about: dict[str, str] | None = None) -> None:
    """results.csv, results.md and family.png under `out`; `about`: a line on each held-out text."""
    write_csv(rows, out / "results.csv")
    write_markdown(rows, out / "results.md", title, about)
    write_plot(rows, out / "family.png", title)

"""The demo's outputs from its evaluation rows: results.csv, results.md and family.png."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

METHOD_ORDER = ("boomerang", "naive-pruning", "shortgpt", "boomerang-last-to-first", "boomerang-first-to-last")
LABELS = {"boomerang": "boomerang (distilled student, patched)", "naive-pruning": "naive pruning (no distillation)",
          "shortgpt": "ShortGPT layer dropping (no training)",
          "boomerang-last-to-first": "boomerang, paper's last-to-first order",
          "boomerang-first-to-last": "boomerang, paper's first-to-last order"}


def _table(rows: Sequence[dict[str, Any]]) -> tuple[list[int], dict[tuple[str, int], dict[str, Any]]]:
    by = {(r["method"], r["num_layers"]): r for r in rows}
    layers = sorted({r["num_layers"] for r in rows})
    return layers, by


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per size: layers, parameters, and each method's perplexity with its 95% interval."""
    layers, by = _table(rows)
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in by)]
    cols = ["dir", "k", "num_layers", "params", "non_embedding_params"]
    for m in methods:
        cols += [f"{m}/perplexity", f"{m}/ci_low", f"{m}/ci_high", f"{m}/params"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for n in layers:
            base = by.get(("boomerang", n)) or next(v for k, v in by.items() if k[1] == n)
            out = {"dir": base.get("dir", ""), "k": base.get("k", ""), "num_layers": n, "params": base["params"],
                   "non_embedding_params": base["non_embedding_params"]}
            for m in methods:
                r = by.get((m, n))
                if r:
                    out.update({f"{m}/perplexity": f"{r['perplexity']:.4f}", f"{m}/ci_low": f"{r['ci_low']:.4f}",
                                f"{m}/ci_high": f"{r['ci_high']:.4f}", f"{m}/params": r["params"]})
            w.writerow(out)


def write_markdown(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    layers, by = _table(rows)
    methods = [m for m in METHOD_ORDER if any(k[0] == m for k in by)]
    tokens = rows[0]["tokens"] if rows else 0
    lines = [f"# {title}", "", f"Perplexity on {tokens} held-out tokens (95% bootstrap interval over rows); "
             "parameters are unique non-embedding parameters of the boomerang model of that depth.", "",
             "| layers | non-emb. params | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for n in layers:
        base = by.get(("boomerang", n)) or next(v for k, v in by.items() if k[1] == n)
        cells = []
        for m in methods:
            r = by.get((m, n))
            cells.append(f"{r['perplexity']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r else "")
        lines.append(f"| {n} | {base['non_embedding_params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    lines += ["", verdict(rows), ""]
    path.write_text("\n".join(lines))


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-language check of the paper's claim on these rows (monotone family, better than baselines)."""
    layers, by = _table(rows)
    fam = [by[("boomerang", n)] for n in layers if ("boomerang", n) in by]
    notes = []
    bumps = [f"{a['num_layers']}->{b['num_layers']} layers" for a, b in zip(fam, fam[1:])
             if b["ci_low"] > a["ci_high"]]
    notes.append("Boomerang perplexity decreases from student to teacher within the intervals."
                 if not bumps else f"Boomerang perplexity rises beyond the intervals at {', '.join(bumps)}.")
    inner = [n for n in layers[1:-1]]
    for m in ("naive-pruning", "shortgpt"):
        worse = [n for n in inner if (m, n) in by and ("boomerang", n) in by
                 and by[("boomerang", n)]["perplexity"] >= by[(m, n)]["perplexity"]]
        notes.append(f"Boomerang beats {m} at every intermediate size." if not worse
                     else f"Boomerang does NOT beat {m} at {worse} layers.")
    return " ".join(notes)


def write_plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, by = _table(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
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
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(rows: Sequence[dict[str, Any]], out: Path, title: str) -> None:
    """results.csv, results.md and family.png under `out`."""
    write_csv(rows, out / "results.csv")
    write_markdown(rows, out / "results.md", title)
    write_plot(rows, out / "family.png", title)

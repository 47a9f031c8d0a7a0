#!/usr/bin/env python3
"""Compile every paper config at each of its TPU presets ahead of time and tabulate XLA's memory per device.

    .venv/bin/python benchmarks/compile_presets.py                 # all configs/paper-*.yaml x their TPU presets
    .venv/bin/python benchmarks/compile_presets.py --configs configs/paper-qwen3-8b-base.yaml --presets v5p-128
    .venv/bin/python benchmarks/compile_presets.py --write-docs    # (re)write the table in docs/REPRODUCE.md
    .venv/bin/python benchmarks/compile_presets.py --attention splash --presets v5p-128 --programs train-step

Each (config, preset) runs `boomerang compile --json` in its own process (a CPU-only host with libtpu: no TPU
needed) and appends one JSON line to the results file; a rerun skips rows already measured with the same preset
settings, so an interrupted sweep resumes. The table lists, per row: XLA's per-device bytes of the largest
program (train step, eval step or teacher forward; the teacher forward alone can need more than the eval step,
e.g. llama-3.2-3b on v5e-256: 6.1 vs 3.8 GiB), the chip's HBM, whether it fits with the 10% margin the
presets keep, plan-memory's estimate and its ratio to XLA's, and the compile times.

`--attention` is passed as `train.attention=NAME` to every compile and recorded in each row (`attention`; rows
without the field were compiled with xla). The main table and tests/test_aot.py judge the presets with `xla`, the
larger figure (the [B, H, T, T] float32 scores), so a preset that fits there fits with splash too; rows compiled
with `--attention splash` fill a second table next to it (xla vs splash per config and preset, with the ratio).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from boomerang_jax.infra.topology import GIB, parse_topology  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "compile_presets.jsonl"
DOC = REPO / "docs" / "REPRODUCE.md"
START, END = "<!-- compile-table:start -->", "<!-- compile-table:end -->"
SPLASH_START, SPLASH_END = "<!-- splash-table:start -->", "<!-- splash-table:end -->"
MIN_MARGIN = 0.10


def tpu_presets(config: Path) -> dict[str, dict]:
    """The config's presets that name a TPU topology (GPU presets are checked on a GPU, not here)."""
    presets = (yaml.safe_load(config.read_text()) or {}).get("presets") or {}
    out = {}
    for name, value in presets.items():
        try:
            if parse_topology(name).kind == "tpu":
                out[name] = value or {}
        except ValueError:
            continue
    return out


ALL_PROGRAMS = "train-step,eval-step,teacher-forward"


def key(config: Path, preset: str, settings: dict, attention: str = "xla", programs: str = ALL_PROGRAMS) -> str:
    """The row's identity: config file name, preset, its settings and, when not the rows' original xla and all
    three programs, the attention implementation and the programs compiled."""
    extra = ([] if attention == "xla" else [attention]) + ([] if programs == ALL_PROGRAMS else [programs])
    blob = json.dumps([config.name, preset, settings] + extra, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_rows(path: Path) -> dict[str, dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["key"]] = row
    return rows


def compile_one(config: Path, preset: str, timeout_s: int, attention: str = "xla",
                programs: str = ALL_PROGRAMS) -> dict:
    cmd = [sys.executable, "-m", "boomerang_jax.cli", "compile", "--config", str(config), "--preset", preset, "--json",
           "--programs", programs, f"train.attention={attention}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        tail = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()][-3:] or proc.stderr.splitlines()[-3:]
        return {"error": " | ".join(tail)[:1000], "wall_s": wall}
    try:
        return {**json.loads(proc.stdout), "wall_s": wall}
    except json.JSONDecodeError:
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"error": f"no JSON report (exit {proc.returncode}): " + " | ".join(tail)[:1000], "wall_s": wall}


def markdown(rows: list[dict]) -> str:
    """The table for docs/REPRODUCE.md, one line per (config, preset)."""
    head = ("| config | preset | mesh (data, fsdp, tensor) | micro-batches | largest program | XLA GiB/device | "
            "HBM GiB | fits (>= 10% free) | plan-memory GiB | plan / XLA | compile s (train, eval, teacher) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        name = Path(r["config"]).stem
        micro = r["settings"].get("train", {}).get("micro_batches", "config")
        if r.get("pending"):
            lines.append(f"| {name} | {r['preset']} | | {micro} | not compiled yet | | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {name} | {r['preset']} | | {micro} | error: {r['error'][:120]} | | | no | | | |")
            continue
        m = r["mesh"]
        progs = {p["name"].split(" (")[0]: p for p in r["programs"]}
        peak = r["peak"] / GIB
        fits = "yes" if r["fits"] and r["margin"] >= MIN_MARGIN else ("tight" if r["fits"] else "NO")
        plan = r.get("plan_memory")
        train = progs.get("train step", {}).get("total")
        ratio = f"{plan / train:.2f}" if plan and train else ""
        times = ", ".join(f"{progs[n]['compile_s']:.0f}" for n in ("train step", "eval step", "teacher forward")
                          if n in progs)
        lines.append(f"| {name} | {r['preset']} | {m['data']}, {m['fsdp']}, {m['tensor']} | {micro} | "
                     f"{r['peak_program'].split(' (')[0]} | {peak:.1f} | {r['hbm'] / GIB:.0f} | "
                     f"{fits} ({100 * r['margin']:.0f}% free) | {plan / GIB if plan else float('nan'):.1f} | "
                     f"{ratio} | {times} |")
    return "\n".join(lines)


def splash_markdown(rows: list[dict]) -> str:
    """xla vs splash per (config, preset) compiled with both: each program's total and temporaries per device."""
    by: dict[tuple, dict] = {}  # the programs of every row of one (config, preset, settings, attention), merged
    for r in rows:
        if "error" not in r and not r.get("pending"):
            k = (Path(r["config"]).stem, r["preset"], json.dumps(r["settings"], sort_keys=True),
                 r.get("attention", "xla"))
            merged = {p["name"]: p for p in by.get(k, {}).get("programs", [])} | {p["name"]: p for p in r["programs"]}
            by[k] = {**r, "programs": list(merged.values())}
    lines = ["| config | preset | program | xla GiB/device (temps) | splash GiB/device (temps) | splash / xla | "
             "compile s xla, splash |", "|---|---|---|---|---|---|---|"]
    for (name, preset, settings, attention), s in sorted(by.items()):
        x = by.get((name, preset, settings, "xla"))
        if attention != "splash" or x is None:
            continue
        xp = {p["name"].split(" (")[0]: p for p in x["programs"]}
        for p in s["programs"]:
            q = xp.get(p["name"].split(" (")[0])
            if q is None:
                continue
            lines.append(f"| {name} | {preset} | {p['name'].split(' (')[0]} | {q['total'] / GIB:.2f} "
                         f"({q['temp'] / GIB:.2f}) | {p['total'] / GIB:.2f} ({p['temp'] / GIB:.2f}) | "
                         f"{p['total'] / q['total']:.2f} | {q['compile_s']:.0f}, {p['compile_s']:.0f} |")
    return "\n".join(lines)


def _replace_region(text: str, start: str, end: str, body: str) -> str:
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        return text[:a] + block + text[b:]
    return text.rstrip() + "\n\n" + block + "\n"


def write_docs(rows: list[dict], everything: list[dict] | None = None) -> None:
    """The main table (rows of one attention) and, when there are splash rows, the xla vs splash table."""
    text = DOC.read_text()
    if rows:
        text = _replace_region(text, START, END, markdown(rows))
    if everything and any(r.get("attention") == "splash" for r in everything):
        text = _replace_region(text, SPLASH_START, SPLASH_END, splash_markdown(everything))
    DOC.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", type=Path, default=sorted((REPO / "configs").glob("paper-*.yaml")))
    ap.add_argument("--presets", nargs="*", help="only these presets (default: every TPU preset of each config)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per (config, preset)")
    ap.add_argument("--first", nargs="*", help="compile these CONFIG_STEM:PRESET rows before the others")
    ap.add_argument("--skip", nargs="*", help="leave out these CONFIG_STEM:PRESET rows (e.g. compiled elsewhere)")
    ap.add_argument("--jobs", type=int, default=1, help="compiles run side by side (about one core each)")
    ap.add_argument("--redo", action="store_true", help="compile again rows already in the results file")
    ap.add_argument("--attention", default="xla", choices=("xla", "splash", "auto"),
                    help="train.attention of every compile (default xla: the figure the presets are judged by)")
    ap.add_argument("--programs", default=ALL_PROGRAMS,
                    help="programs to compile (boomerang compile --programs)")
    ap.add_argument("--write-docs", action="store_true", help="only rewrite the table in docs/REPRODUCE.md")
    args = ap.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = load_rows(args.results)
    todo = []
    for config in args.configs:
        config = config.resolve()
        for preset, settings in tpu_presets(config).items():
            if args.presets and preset not in args.presets:
                continue
            todo.append((config, preset, settings, key(config, preset, settings, args.attention, args.programs)))
    if not args.write_docs:
        skip = set(args.skip or ())
        pending = [(i, t) for i, t in enumerate(todo, 1) if (t[3] not in done or args.redo)
                   and f"{t[0].stem}:{t[1]}" not in skip]
        # cheap slices first (compile time grows with the number of devices): a cut-off sweep misses big ones only
        # (multi-slice last: per device it runs the program of one slice, with data over the slices)
        first = set(args.first or ())
        pending.sort(key=lambda it: (f"{it[1][0].stem}:{it[1][1]}" not in first, parse_topology(it[1][1]).slices,
                                     parse_topology(it[1][1]).chips, it[0]))

        def run(item: tuple[int, tuple]) -> dict:
            i, (config, preset, settings, k) = item
            print(f"[{i}/{len(todo)}] {config.name} {preset} ...", flush=True)
            settings = tpu_presets(config).get(preset, settings)  # as compiled, if the file changed meanwhile
            k = key(config, preset, settings, args.attention, args.programs)
            row = {**compile_one(config, preset, args.timeout, args.attention, args.programs), "key": k,
                   "config": str(config.relative_to(REPO)), "preset": preset, "settings": settings,
                   "attention": args.attention, "programs_compiled": args.programs}
            status = row.get("error") or (f"{row['peak'] / GIB:.1f} GiB of {row['hbm'] / GIB:.0f} "
                                          f"({100 * row['margin']:.0f}% free), {row['wall_s']:.0f} s")
            print(f"    [{i}] {config.name} {preset}: {status}", flush=True)
            return row

        # each compile is one process using about one core: --jobs N runs N side by side
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for future in concurrent.futures.as_completed([pool.submit(run, item) for item in pending]):
                row = future.result()
                done[row["key"]] = row
                with open(args.results, "a") as f:  # as each finishes: an interrupted sweep keeps every row
                    f.write(json.dumps(row) + "\n")
    rows = [done[k] if k in done else {"config": str(c.relative_to(REPO)), "preset": p, "settings": st, "pending": True}
            for c, p, st, k in todo]
    if args.write_docs or os.environ.get("WRITE_DOCS"):
        write_docs(rows if args.attention == "xla" else [], list(done.values()))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

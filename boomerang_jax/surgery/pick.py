"""Picking a family size for a budget: parameters, non-embedding parameters, or memory (weights + KV cache).

Memory of a size = its unique parameters x bytes per parameter of the dtype, plus the KV cache of `context`
tokens for `batch` sequences: 2 (keys and values) x layers x key/value heads x head_dim x context x batch x
bytes. GB are 10^9 bytes. Activations and framework overhead are not counted.

Scores come from evaluation files already written by the project, matched to sizes by directory name (and
layer count when the row has one): `boomerang eval --json-out` (rows with `model` = the size's path and
`perplexity`), the demo's `results.csv` (`dir`, `boomerang/perplexity`) or `eval.jsonl` (method `boomerang`),
and `boomerang lm-eval`'s CSV (`dir`, `task/metric` columns). Perplexity is lower-better, everything else
higher-better. With scores the best size that fits wins; without, the deepest that fits (a family gets closer to
the teacher with every patched block).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from boomerang_jax.hf.load import np_dtype
from boomerang_jax.infra import storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.surgery.family_export import FamilyError

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}
# files looked for inside a family directory when no --results is given (what lm-eval / eval write there)
RESULT_FILES = ("lm_eval.csv", "results.csv", "eval.json", "eval.jsonl")


def parse_count(text: str, what: str = "--max-params") -> int:
    """'80M', '1.5B', '250k', '80000000' -> an integer count."""
    m = _COUNT.match(str(text))
    if not m:
        raise FamilyError(f"{what} {text!r}: use a number with an optional K/M/B suffix, e.g. 80M or 1.5B")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])


def dtype_bytes(dtype: str) -> int:
    return np_dtype(DTYPE_ALIASES.get(dtype, dtype)).itemsize


@dataclasses.dataclass(frozen=True)
class Budget:
    """One limit: `kind` 'params' | 'non_embedding' | 'memory' (`limit` in parameters or bytes)."""

    kind: str
    limit: float
    dtype: str = "float32"
    context: int = 4096
    batch: int = 1

    def describe(self) -> str:
        if self.kind == "memory":
            return (f"{self.limit / 1e9:g} GB of weights + KV cache ({self.dtype}, context {self.context}, "
                    f"batch {self.batch})")
        return f"{self.limit / 1e6:g}M {'non-embedding ' if self.kind == 'non_embedding' else ''}parameters"


def memory_bytes(entry: dict[str, Any], config: ModelConfig, budget: Budget) -> int:
    """Weights + KV cache of a size (its family.json record) under `budget`'s dtype, context and batch."""
    b = dtype_bytes(budget.dtype)
    kv = 2 * entry["num_layers"] * config.num_kv_heads * config.head_dim * budget.context * budget.batch * b
    return entry["params"]["total"] * b + kv


def measure(entry: dict[str, Any], config: ModelConfig, budget: Budget) -> float:
    if budget.kind == "memory":
        return memory_bytes(entry, config, budget)
    return entry["params"]["total" if budget.kind == "params" else "non_embedding"]


# ------------------------------------------------------------------------------------------------ scores
@dataclasses.dataclass(frozen=True)
class Scores:
    """A score per size directory, the metric's name, its direction and the file it came from."""

    by_dir: dict[str, float]
    metric: str
    higher_is_better: bool
    source: str


def _rows(path: str) -> list[dict[str, Any]]:
    text = storage.read_text(path)
    if path.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if path.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    return data if isinstance(data, list) else [data]


def _number(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def _metric_of(rows: Sequence[dict[str, Any]], metric: str | None) -> str | None:
    cols = {c for r in rows for c, v in r.items() if _number(v) is not None}
    if metric:
        return metric if metric in cols or metric == "mean-acc" else None
    for c in ("boomerang/perplexity", "perplexity"):
        if c in cols:
            return c
    return "mean-acc" if any(c.endswith("/acc") for c in cols) else None


def read_scores(path: str | os.PathLike, sizes: Sequence[dict[str, Any]], metric: str | None = None) -> Scores | None:
    """Scores of the family's `sizes` in one results file; None when it holds none for them. `metric`: a
    column/field name, 'mean-acc' (the mean of every `task/acc` column) or None (perplexity, else mean-acc)."""
    path = str(path)
    try:
        rows = _rows(path)
    except json.JSONDecodeError as e:
        raise FamilyError(f"{path}: not valid JSON ({e})") from None
    rows = [r for r in rows if isinstance(r, dict) and r.get("method", "boomerang") == "boomerang"]
    name = _metric_of(rows, metric)
    if name is None:
        if metric:
            raise FamilyError(f"{path}: no numeric column {metric!r} (use a column of the file, or mean-acc)")
        return None
    layers = {s["dir"]: s["num_layers"] for s in sizes}
    by_dir: dict[str, float] = {}
    for r in rows:
        d = str(r.get("dir") or storage.name(str(r.get("model", "")).rstrip("/")))
        if d not in layers or (r.get("num_layers") not in (None, "") and int(r["num_layers"]) != layers[d]):
            continue
        if name == "mean-acc":
            accs = [_number(v) for c, v in r.items() if c.endswith("/acc") and _number(v) is not None]
            score = sum(accs) / len(accs) if accs else None
        else:
            score = _number(r.get(name))
        if score is not None:
            by_dir[d] = score
    if not by_dir:
        return None
    lower = "perplexity" in name or "loss" in name or "nll" in name
    return Scores(by_dir, name, not lower, path)


def find_scores(family_dir: str, sizes: Sequence[dict[str, Any]], results: Sequence[str] = (),
                metric: str | None = None) -> Scores | None:
    """Scores from the first of `results` (or of the family's own result files, then the demo run directory's
    results.csv next to a `family` directory) that holds any for these sizes."""
    candidates = list(results)
    if not candidates:
        candidates = [storage.join(family_dir, f) for f in RESULT_FILES]
        parent = os.path.dirname(os.path.abspath(family_dir)) if not storage.is_remote(family_dir) else None
        if parent and os.path.exists(os.path.join(parent, "eval.jsonl")):  # a demo run directory
            candidates.append(os.path.join(parent, "results.csv"))
    for path in candidates:
        if results and not storage.exists(path):
            raise FileNotFoundError(f"{path}: no such results file")
        if storage.exists(path):
            found = read_scores(path, sizes, metric)
            if found:
                return found
    return None


# -------------------------------------------------------------------------------------------------- pick
@dataclasses.dataclass(frozen=True)
class Choice:
    entry: dict[str, Any]
    measure: float
    score: float | None
    fits: list[dict[str, Any]]
    why: str


def pick(sizes: Sequence[dict[str, Any]], config: ModelConfig, budget: Budget, scores: Scores | None) -> Choice:
    """The best size within `budget` (by score when given, else the largest), with a one-line reason."""
    fits = [s for s in sizes if measure(s, config, budget) <= budget.limit]
    if not fits:
        small = min(sizes, key=lambda s: measure(s, config, budget))
        raise FamilyError(f"no size fits {budget.describe()}: the smallest, {small['dir']}, needs "
                          f"{_fmt(measure(small, config, budget), budget)}")
    scored = [s for s in fits if scores and s["dir"] in scores.by_dir]
    if scored:
        sign = 1 if scores.higher_is_better else -1
        best = max(scored, key=lambda s: (sign * scores.by_dir[s["dir"]], s["num_layers"]))
        why = (f"best {scores.metric} ({scores.by_dir[best['dir']]:.4g}, "
               f"{'higher' if scores.higher_is_better else 'lower'} is better) of the {len(scored)} evaluated "
               f"size(s) that fit, scores from {scores.source}")
        score = scores.by_dir[best["dir"]]
    else:
        best = max(fits, key=lambda s: (s["num_layers"], s["params"]["non_embedding"]))
        why = ("the deepest size that fits (no evaluation results for these sizes: pass --results; sizes get "
               "closer to the teacher with every patched block; a tied teacher can be smaller than untied sizes)")
        score = None
    return Choice(best, measure(best, config, budget), score, fits, why)


def _fmt(value: float, budget: Budget) -> str:
    return f"{value / 1e9:.3f} GB" if budget.kind == "memory" else f"{value / 1e6:.2f}M parameters"


def table(sizes: Sequence[dict[str, Any]], config: ModelConfig, budget: Budget, scores: Scores | None) -> list[str]:
    """One line per size: layers, parameters, memory under the budget's dtype/context, score, whether it fits."""
    memory_budget = dataclasses.replace(budget, kind="memory")
    out = [f"{'size':<14} {'layers':>6} {'params':>10} {'non-emb':>10} {'memory GB':>10} "
           f"{(scores.metric if scores else 'score'):>20}  fits"]
    for s in sizes:
        sc = scores.by_dir.get(s["dir"]) if scores else None
        out.append(f"{s['dir']:<14} {s['num_layers']:>6} {s['params']['total'] / 1e6:>9.2f}M "
                   f"{s['params']['non_embedding'] / 1e6:>9.2f}M {memory_bytes(s, config, memory_budget) / 1e9:>10.3f} "
                   f"{'' if sc is None else f'{sc:.4g}':>20}  "
                   f"{'yes' if measure(s, config, budget) <= budget.limit else 'no'}")
    return out

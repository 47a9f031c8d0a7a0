"""lm-evaluation-harness over every size of a family (or one HF directory), resumable, one (size, task) at a time.

Each finished (size, task) is recorded at once, in this order, every file written whole (temp file + rename,
fsynced; one upload on gs://), so a kill at any moment leaves complete records only:
1. `<csv stem>/<size>.json`: the harness's full output of every task done on that size (per-sample logs
   excluded), keyed by task label;
2. `<csv stem>.jsonl`: one row per (size, task, settings), the record of what is finished;
3. the CSV, regenerated from the jsonl: one row per size, a `task/metric` column per score (a task run with
   --num-fewshot N is labelled `task-Nshot`), merged into what the CSV already holds (e.g. perplexity columns).
A rerun with the same settings skips what the jsonl holds. With the `boomerang` backend a family's sizes are
built in memory from its student and teacher (compact or full: surgery.compact), so N sizes never write N
models; the `hf` backend reads each size's directory, materialising a compact family's sizes to a temporary
directory one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lm_eval.utils import handle_non_serializable

from boomerang_jax.eval.harness import harness_output, merge_into_csv, scores_of
from boomerang_jax.eval.lm_backend import BoomerangLM
from boomerang_jax.hf.load import load_model, read_model_dir
from boomerang_jax.infra import storage
from boomerang_jax.surgery.compact import build_size, materialise_size, open_family
from boomerang_jax.surgery.family_export import FAMILY_FILE, FamilyError, read_family

BACKENDS = ("boomerang", "hf")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How each (size, task) is evaluated; a finished row is reused only under equal settings."""

    backend: str = "boomerang"
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int = 8
    dtype: str = "float32"
    include_path: str | None = None
    device: str = "cpu"

    def key(self) -> dict[str, Any]:
        return {"backend": self.backend, "num_fewshot": self.num_fewshot, "limit": self.limit, "dtype": self.dtype}


def task_label(task: str, num_fewshot: int | None) -> str:
    """The name a task's scores get in the CSV: the task, with `-Nshot` when a shot count was given."""
    return task if num_fewshot is None else f"{task}-{num_fewshot}shot"


class ResultsLog:
    """The jsonl of finished (size, task) rows beside a CSV, the CSV regenerated from it, and per-size JSON."""

    def __init__(self, csv_path: str | os.PathLike) -> None:
        self.csv = str(csv_path)
        stem = self.csv[:-4] if self.csv.endswith(".csv") else self.csv
        self.jsonl, self.json_dir = stem + ".jsonl", stem
        self.rows: list[dict[str, Any]] = []
        if storage.exists(self.jsonl):
            self.rows = [json.loads(line) for line in storage.read_text(self.jsonl).splitlines() if line.strip()]

    @staticmethod
    def _key(row: dict[str, Any]) -> tuple[Any, ...]:
        return (row["dir"], row["task"], *sorted(row["settings"].items()))

    def done(self, size_dir: str, task: str, settings: Settings) -> bool:
        want = self._key({"dir": size_dir, "task": task, "settings": settings.key()})
        return any(self._key(r) == want for r in self.rows)

    def json_path(self, size_dir: str) -> str:
        return storage.join(self.json_dir, f"{size_dir}.json")

    def add(self, row: dict[str, Any], output: dict[str, Any]) -> None:
        """Record one finished (size, task): its full output, then its row, then the regenerated CSV."""
        path = self.json_path(row["dir"])
        full = json.loads(storage.read_text(path)) if storage.exists(path) else {}
        full[row["label"]] = {k: v for k, v in output.items() if k != "samples"}
        storage.write_text(path, json.dumps(full, indent=1, default=handle_non_serializable) + "\n")
        self.rows = [r for r in self.rows if self._key(r) != self._key(row)] + [row]
        storage.write_text(self.jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        self.write_csv()

    def wide_rows(self) -> list[dict[str, Any]]:
        """One row per size: dir, num_layers, params and every `label/metric` score (later rows win)."""
        by_dir: dict[str, dict[str, Any]] = {}
        for r in self.rows:
            wide = by_dir.setdefault(r["dir"], {"dir": r["dir"]})
            wide.update({k: r[k] for k in ("num_layers", "params") if r.get(k) is not None})
            wide.update(r["scores"])
        return list(by_dir.values())

    def write_csv(self) -> None:
        if self.rows:
            merge_into_csv(self.csv, self.wide_rows())


@dataclasses.dataclass
class Size:
    """One model to evaluate: its name (the family's size directory), depth, parameters and how to get it."""

    dir: str
    num_layers: int | None
    params: int | None
    model: Callable[[], Any]  # a Model (boomerang backend)
    hf_dir: Callable[[str], str]  # an HF directory, materialised under the given temp dir when needed


def family_units(target: str) -> list[Size]:
    """Every size of a family directory (compact or full), or the one model of an HF directory."""
    if not storage.exists(storage.join(target, FAMILY_FILE)):
        config = read_model_dir(target)[1]
        return [Size(storage.name(target.rstrip("/")), config.num_layers, None,
                     lambda: load_model(target, to_device=False), lambda tmp: target)]
    record = read_family(target)
    try:
        family = open_family(target)
    except FamilyError:  # a full family without its student and teacher sizes: read each size's directory
        if record.get("compact"):
            raise
        family = None
    units = []
    for s in record["sizes"]:
        where = storage.join(target, s["dir"])
        stored = storage.exists(storage.join(where, "config.json"))

        def model(s: dict[str, Any] = s, where: str = where) -> Any:
            if family is not None:
                return build_size(family, patched=s["patched"])
            return load_model(where, to_device=False)

        def hf_dir(tmp: str, s: dict[str, Any] = s, where: str = where, stored: bool = stored) -> str:
            if stored:
                return where
            out = os.path.join(tmp, s["dir"])
            materialise_size(family, out, s["patched"])
            return out

        units.append(Size(s["dir"], s["num_layers"], s["params"]["total"], model, hf_dir))
    return units


def harness_over_family(target: str | os.PathLike, tasks: Sequence[str], *, results_csv: str | os.PathLike,
                        settings: Settings = Settings(), log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Evaluate every (size, task) not finished yet under `settings`, recording each as it finishes (see the
    module docstring); returns the rows added now."""
    if settings.backend not in BACKENDS:
        raise ValueError(f"backend {settings.backend!r}: use one of {', '.join(BACKENDS)}")
    target = str(target)
    results = ResultsLog(results_csv)
    results.write_csv()  # a kill between the jsonl and the CSV left the CSV one row behind: catch up
    added = []
    for unit in family_units(target):
        todo = [t for t in tasks if not results.done(unit.dir, t, settings)]
        if not todo:
            log(f"{unit.dir}: {', '.join(tasks)} done already (skipped)")
            continue
        for row, output in _evaluate_unit(unit, todo, settings):
            results.add(row, output)
            added.append(row)
            scores = ", ".join(f"{k}={v:.4f}" for k, v in row["scores"].items() if not k.endswith("_stderr"))
            log(f"{unit.dir} {row['label']}: {scores} ({row['seconds']:.1f} s, {row['compiles']} compiles)")
    return added


def _evaluate_unit(unit: Size, tasks: Sequence[str], settings: Settings) -> Iterator[tuple[dict, dict]]:
    with tempfile.TemporaryDirectory(prefix="boomerang-lm-eval-") as tmp:
        if settings.backend == "boomerang":
            model: Any = BoomerangLM(model=unit.model(), batch_size=settings.batch_size, dtype=settings.dtype)
        else:
            model = unit.hf_dir(tmp)
        for task in tasks:
            start, compiles = time.time(), getattr(model, "compiles", 0)
            out = harness_output(model, [task], include_path=settings.include_path,
                                 num_fewshot=settings.num_fewshot, limit=settings.limit,
                                 batch_size=settings.batch_size, device=settings.device, dtype=settings.dtype)
            label = task_label(task, settings.num_fewshot)
            scores = {f"{task_label(name, settings.num_fewshot)}/{metric}": value
                      for name, metrics in scores_of(out).items() for metric, value in metrics.items()}
            row = {"dir": unit.dir, "num_layers": unit.num_layers, "params": unit.params, "task": task,
                   "label": label, "settings": settings.key(), "scores": scores,
                   "seconds": round(time.time() - start, 3),
                   "compiles": getattr(model, "compiles", 0) - compiles}
            yield row, out

"""lm-evaluation-harness on exported HF directories, offline: local tasks, and a whole family at once.

Exports are plain HF directories, so `lm_eval --model hf` runs on them unchanged. Offline, a task is a YAML
over a local jsonl file; `cloze_questions` makes a multiple-choice task from any held-out text (predict a
sentence's last word among distractors), so the harness path is exercised without a dataset hub. On a
networked machine the paper's tasks (arc_easy, piqa, ...) run through the same function.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from boomerang_jax.hf.load import resolve_dir
from boomerang_jax.infra import storage
from boomerang_jax.surgery.family_export import read_family

_WORD = re.compile(r"^[A-Za-z]{4,}$")


def cloze_questions(texts: Iterable[str], num_questions: int, *, num_choices: int = 4, seed: int = 0,
                    min_words: int = 8) -> list[dict[str, Any]]:
    """Multiple-choice items from text: context = a sentence minus its last word; choices = that word + others."""
    sentences = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", text):
            words = s.strip().rstrip(".!?").split()
            if len(words) >= min_words and _WORD.match(words[-1]):
                sentences.append(words)
    vocab = sorted({w[-1] for w in sentences})
    if len(vocab) < num_choices:
        raise ValueError(f"text too short for cloze questions: only {len(vocab)} distinct candidate words")
    rng = random.Random(seed)
    rng.shuffle(sentences)
    items = []
    for words in sentences[:num_questions]:
        answer = words[-1]
        choices = rng.sample([w for w in vocab if w != answer], num_choices - 1) + [answer]
        rng.shuffle(choices)
        items.append({"context": " ".join(words[:-1]), "choices": choices, "label": choices.index(answer)})
    return items


def write_multiple_choice_task(task_dir: str | os.PathLike, name: str, items: Sequence[dict[str, Any]]) -> Path:
    """Write `items` as jsonl plus an lm-eval task YAML named `name` in `task_dir`; returns the YAML path."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"task name {name!r}: use letters, digits and underscores")
    d = Path(task_dir)
    d.mkdir(parents=True, exist_ok=True)
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    yaml = d / f"{name}.yaml"
    yaml.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return yaml


def run_harness(model_dir: str | os.PathLike, tasks: Sequence[str], *, include_path: str | os.PathLike | None = None,
                batch_size: int = 4, limit: int | float | None = None, device: str = "cpu",
                dtype: str = "float32") -> dict[str, dict[str, float]]:
    """Run lm-eval's `hf` model on an exported directory (local, or gs:// through a cached local copy);
    returns {task: {metric: value}} (stderr included)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if storage.is_remote(model_dir):
        model_dir = resolve_dir(model_dir)
    manager = TaskManager(include_path=str(include_path)) if include_path else TaskManager()
    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={Path(model_dir).resolve()},dtype={dtype},trust_remote_code=False",
        tasks=list(tasks),
        task_manager=manager, device=device, batch_size=batch_size, limit=limit, log_samples=False,
        bootstrap_iters=1000,
    )
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        scores[task] = {k.replace(",none", ""): float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and "," in k}
    return scores


def family_sizes(family_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The size entries of a family.json (each has 'dir', 'num_layers', 'params', ...); local or gs://."""
    return read_family(family_dir)["sizes"]


def harness_over_family(family_dir: str | os.PathLike, tasks: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
    """Run the harness on every size of a family; one row per size: dir, layers, params, task/metric scores."""
    rows = []
    for size in family_sizes(family_dir):
        scores = run_harness(storage.join(family_dir, size["dir"]), tasks, **kwargs)
        row = {"dir": size["dir"], "num_layers": size["num_layers"], "params": size["params"]["total"]}
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                row[f"{task}/{metric}"] = value
        rows.append(row)
    return rows


def merge_into_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]], key: str = "dir") -> None:
    """Add the columns of `rows` to the CSV at `path` (local or gs://; matched on `key`), creating it if needed."""
    existing: list[dict[str, Any]] = []
    if storage.exists(path):
        existing = list(csv.DictReader(io.StringIO(storage.read_text(path), newline="")))
    by_key = {r[key]: r for r in existing}
    for row in rows:
        by_key.setdefault(str(row[key]), {key: str(row[key])}).update({k: v for k, v in row.items()})
    merged = list(by_key.values())
    columns: list[str] = []
    for r in merged:
        columns += [c for c in r if c not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(merged)
    storage.write_text(path, text.getvalue())

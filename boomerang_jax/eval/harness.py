"""lm-evaluation-harness on our models, offline: local tasks, our JAX backend or the harness's `hf` model.

Exports are plain HF directories, so `lm_eval --model hf` runs on them unchanged; `BoomerangLM`
(eval.lm_backend) runs the same requests on our JAX forward, on a size in memory. Offline, a task is a YAML
over a local jsonl file; `cloze_questions` makes a multiple-choice task from any held-out text (predict a
sentence's last word among distractors), so the harness path is exercised without a dataset hub. On a
networked machine the paper's tasks (arc_easy, piqa, ...) run through the same function.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from boomerang_jax.eval.lm_backend import BoomerangLM
from boomerang_jax.hf.load import resolve_dir
from boomerang_jax.infra import storage
from boomerang_jax.models.model import Model
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
    yaml, head = _task_files(task_dir, name, items)
    yaml.write_text(
        head +
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


def _task_files(task_dir: str | os.PathLike, name: str, items: Sequence[dict[str, Any]]) -> tuple[Path, str]:
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"task name {name!r}: use letters, digits and underscores")
    d = Path(task_dir)
    d.mkdir(parents=True, exist_ok=True)
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    head = (f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\ntest_split: test\n")
    return d / f"{name}.yaml", head


def write_perplexity_task(task_dir: str | os.PathLike, name: str, texts: Sequence[str]) -> Path:
    """A loglikelihood_rolling task over `texts` (word/byte perplexity, bits per byte); returns the YAML path."""
    yaml, head = _task_files(task_dir, name, [{"text": t} for t in texts])
    yaml.write_text(head + "output_type: loglikelihood_rolling\n" 'doc_to_text: ""\n' 'doc_to_target: "{{text}}"\n'
                    "metric_list:\n" + "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n"
                                                 for m, a in (("word_perplexity", "weighted_perplexity"),
                                                              ("byte_perplexity", "weighted_perplexity"),
                                                              ("bits_per_byte", "bits_per_byte")))
                    + "metadata:\n  version: 1.0\n")
    return yaml


def write_generation_task(task_dir: str | os.PathLike, name: str, items: Sequence[dict[str, Any]], *,
                          until: Sequence[str], max_gen_toks: int = 32) -> Path:
    """A generate_until task over items {'context', 'answer'} (greedy, stopped at `until`; exact match)."""
    yaml, head = _task_files(task_dir, name, items)
    yaml.write_text(head + "output_type: generate_until\n" 'doc_to_text: "{{context}}"\n'
                    'doc_to_target: "{{answer}}"\n'
                    f"generation_kwargs:\n  until: {json.dumps(list(until))}\n  max_gen_toks: {max_gen_toks}\n"
                    "  do_sample: false\n"
                    "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                    "metadata:\n  version: 1.0\n")
    return yaml


def hf_model_args(model_dir: str | os.PathLike, dtype: str = "float32", max_length: int | None = None) -> str:
    """The harness's `hf` model arguments for an exported directory (never remote code)."""
    args = f"pretrained={Path(model_dir).resolve()},dtype={dtype},trust_remote_code=False"
    return args + (f",max_length={max_length}" if max_length else "")


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path) if include_path else TaskManager()


def task_manager(include_path: str | os.PathLike | None = None) -> Any:
    """The harness's task index (with local task YAMLs from `include_path`), built once per path: indexing every
    task takes seconds."""
    return _task_manager(str(Path(include_path).resolve()) if include_path else None)


def harness_output(model: Any, tasks: Sequence[str], *, include_path: str | os.PathLike | None = None,
                   num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 4,
                   device: str = "cpu", dtype: str = "float32", log_samples: bool = False,
                   max_length: int | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate's whole output for `model`: an lm-eval model object (e.g. BoomerangLM) or an
    exported HF directory, run with the harness's `hf` model."""
    import lm_eval

    kwargs: dict[str, Any] = dict(tasks=list(tasks), task_manager=task_manager(include_path), num_fewshot=num_fewshot,
                                  limit=limit, log_samples=log_samples, bootstrap_iters=1000)
    if isinstance(model, (str, os.PathLike)):
        if storage.is_remote(model):
            model = resolve_dir(model)
        kwargs.update(model="hf", model_args=hf_model_args(model, dtype, max_length), device=device,
                      batch_size=batch_size)
    else:
        kwargs.update(model=model)
    return lm_eval.simple_evaluate(**kwargs)


def scores_of(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (stderr included; the default filter's name dropped) from a harness output."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        scores[task] = {k.replace(",none", ""): float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in k}
    return scores


def boomerang_model(model: Model | str | os.PathLike, *, batch_size: int = 8, dtype: str = "float32",
                    max_length: int | None = None) -> BoomerangLM:
    """Our JAX lm-eval model on a Model in memory or an HF directory."""
    kind = "model" if isinstance(model, Model) else "pretrained"
    return BoomerangLM(**{kind: model if kind == "model" else str(model)}, batch_size=batch_size, dtype=dtype,
                       max_length=max_length)


def run_harness(model_dir: str | os.PathLike | Model, tasks: Sequence[str], *,
                include_path: str | os.PathLike | None = None, batch_size: int = 4,
                limit: int | float | None = None, device: str = "cpu", dtype: str = "float32",
                num_fewshot: int | None = None, backend: str = "hf") -> dict[str, dict[str, float]]:
    """Run the harness on an exported directory (local, or gs:// through a cached local copy) with its `hf`
    model (backend 'hf') or ours ('boomerang', also on a Model in memory); returns {task: {metric: value}}."""
    if backend == "boomerang":
        model: Any = boomerang_model(resolve_dir(model_dir) if storage.is_remote(model_dir) else model_dir,
                                     batch_size=batch_size, dtype=dtype)
    elif backend == "hf":
        model = model_dir
    else:
        raise ValueError(f"backend {backend!r}: use boomerang or hf")
    return scores_of(harness_output(model, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                                    batch_size=batch_size, device=device, dtype=dtype))


def family_sizes(family_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The size entries of a family.json (each has 'dir', 'num_layers', 'params', ...); local or gs://."""
    return read_family(family_dir)["sizes"]


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

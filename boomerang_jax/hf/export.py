"""Write a model as an HF directory: sharded safetensors + index, config.json, generation config, tokenizer.

Local or `gs://` (boomerang_jax.infra.publish.publish_dir): locally the directory is assembled in a hidden
temporary sibling and renamed into place at the end, so a killed export never looks complete and an existing
good export is only replaced by a finished one. On a bucket every object is uploaded before `config.json`
(the marker readers require), so a killed upload leaves no directory that looks like a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import numpy as np

from boomerang_jax.hf import names
from boomerang_jax.hf.load import CheckpointError, LeafGetter, check_finite, np_dtype
from boomerang_jax.hf.safetensors_io import TensorSpec, dtype_name, write_safetensors
from boomerang_jax.infra import publish, storage
from boomerang_jax.models.config import ModelConfig, to_hf
from boomerang_jax.models.transformer import Params

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
COMMIT_ORDER = ("model.safetensors.index.json", "config.json")  # uploaded last, in this order
_TORCH_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class ExportError(ValueError):
    """An export that cannot be written (target exists, inconsistent inputs)."""


def tensor_specs(config: ModelConfig, dtype: np.dtype) -> list[TensorSpec]:
    """Names and shapes of every HF tensor of `config`, in write order."""
    return [TensorSpec(e.name(i), e.hf_shape, dtype) for e, i in names.export_order(config)]


def params_getter(params: Params) -> LeafGetter:
    """A LeafGetter over a stacked parameter tree (per-layer leaves are sliced on axis 0)."""

    def get(path: tuple[str, ...], layer: int | None) -> np.ndarray:
        node: Any = params if layer is None else params["layers"]
        for key in path:
            node = node[key]
        return np.asarray(jax.device_get(node if layer is None else node[layer]))

    return get


def hf_tensors(config: ModelConfig, get: LeafGetter) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensors one at a time, built from parameter leaves fetched on demand (streaming export)."""
    for e, layer in names.export_order(config):
        yield e.name(layer), e.join(*(get(t, layer) for t in e.targets))


def _shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def generation_config_for(config: ModelConfig, base: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(base or {})
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key)
        if key not in out and value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def save_hf(
    out_dir: str | os.PathLike,
    config: ModelConfig,
    params: Params | None = None,
    *,
    get: LeafGetter | None = None,
    hf_config: dict[str, Any] | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
    generation_config: dict[str, Any] | None = None,
    dtype: Any = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path | str:
    """Write an HF directory (local path or `gs://` URL) for `config` from `params` (or from a LeafGetter
    `get`, for lazy sources); returns it (a Path when local).

    `hf_config` is the source config.json whose unrelated keys are kept; layer count, tie flag and dtype
    come from `config`. Refuses to replace an existing export unless `overwrite`.
    """
    if (params is None) == (get is None):
        raise ExportError("save_hf needs exactly one of params= or get=")
    if not max_shard_bytes > 0:
        raise ExportError(f"max shard size must be positive, got {max_shard_bytes!r} bytes "
                          "(--max-shard-gb must be > 0)")
    get = get or params_getter(params)
    dt = np_dtype(dtype)
    specs = tensor_specs(config, dt)
    shards = _shard(specs, max_shard_bytes)
    with publish.publish_dir(out_dir, marker="config.json", overwrite=overwrite, last=COMMIT_ORDER,
                             error=ExportError) as pub:
        tmp = pub.path
        stream = _finite_after_cast(hf_tensors(config, get), dt)
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / fname, shard, _take(stream, len(shard)))
            weight_map.update({s.name: fname for s in shard})
        if len(shards) > 1:
            _write_json(tmp / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": weight_map,
            })
        cfg = to_hf(config, hf_config)
        cfg.pop("torch_dtype", None)
        cfg["dtype"] = _TORCH_DTYPE.get(dtype_name(dt), "float32")
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", generation_config_for(config, generation_config))
        for name, data in {**(tokenizer_files or {}), **(extra_files or {})}.items():
            (tmp / name).write_bytes(data)
    return str(out_dir) if storage.is_remote(out_dir) else Path(out_dir)


def _finite_after_cast(tensors: Iterator[tuple[str, np.ndarray]], dt: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Each tensor cast to `dt`; an ExportError naming the tensor when it holds NaN/inf, or when the cast made
    it overflow (float16 tops out at 65504)."""
    for name, arr in tensors:
        arr = np.asarray(arr)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, naming the tensor
            cast = np.ascontiguousarray(arr, dtype=dt)
        try:
            check_finite(arr, f"tensor {name!r}")
            if cast.dtype != arr.dtype:
                check_finite(cast, f"tensor {name!r} cast to {dt}", cast_from=arr)
        except CheckpointError as e:
            raise ExportError(f"{e}; export abandoned (nothing published as complete)") from None
        yield name, cast


def _take(it: Iterator[tuple[str, np.ndarray]], n: int) -> Iterable[tuple[str, np.ndarray]]:
    for _ in range(n):
        yield next(it)

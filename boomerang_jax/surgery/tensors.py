"""TensorSource: a model read lazily, leaf by leaf, with the HF files an export carries and its layer plan.

The family export (surgery.family_export) copies tensors from sources straight into each size's files, so
peak host memory stays about teacher + student whatever the number of sizes. A source is an HF directory
(memory-mapped safetensors), an in-memory parameter tree (a Model, a restored training checkpoint) or a GGUF
file / the embedded teacher (dequantised into memory).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from boomerang_jax.hf import names
from boomerang_jax.hf.export import params_getter
from boomerang_jax.hf.load import EMBEDDED_TEACHER, LeafGetter, lazy_tensors, load_model, read_model_dir
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.model import CarriesHFFiles, HFFiles
from boomerang_jax.models.transformer import Params
from boomerang_jax.surgery.plan import LayerPlan

PLAN_FILE = "boomerang_plan.json"  # the student's LayerPlan, inside its HF directory


@dataclasses.dataclass
class TensorSource(CarriesHFFiles):
    """A model to copy tensors from, read lazily through `get`, with what an HF export carries along."""

    config: ModelConfig
    get: LeafGetter  # (path under params root, layer or None) -> host array
    where: str
    dtype: np.dtype  # dtype the tensors are stored in
    files: HFFiles = dataclasses.field(default_factory=HFFiles)
    plan: LayerPlan | None = None


def source_from_params(
    config: ModelConfig,
    params: Params,
    *,
    where: str = "<memory>",
    files: HFFiles | None = None,
    plan: LayerPlan | None = None,
) -> TensorSource:
    """A TensorSource over an in-memory parameter tree (e.g. a student restored from a training checkpoint),
    carrying `files` (e.g. a Model's HF config and tokenizer) into its export."""
    files = files or HFFiles()
    dtype = np.dtype(params["embed"]["embedding"].dtype)
    return TensorSource(config, params_getter(params), where, dtype, files, plan)


def open_hf_source(path: str | os.PathLike, *, plan: LayerPlan | None = None) -> TensorSource:
    """An HF directory (local, or `gs://` through a cached local copy) as a lazy TensorSource: headers checked
    now, tensors memory-mapped and read on demand; its plan from its boomerang_plan.json unless given."""
    model_dir, config, files = read_model_dir(path)
    get, dtype = lazy_tensors(model_dir, config)
    if plan is None and (model_dir / PLAN_FILE).exists():
        plan = LayerPlan.from_json((model_dir / PLAN_FILE).read_text(), source=str(model_dir / PLAN_FILE))
    return TensorSource(config=config, get=get, where=str(path), dtype=dtype, files=files, plan=plan)


def open_tensor_source(spec: str | os.PathLike) -> TensorSource:
    """A TensorSource from an HF directory (local or `gs://`; lazy) or a .gguf file / the embedded teacher
    (dequantised into memory). Training checkpoints are opened by `boomerang_jax.commands.family.open_source`."""
    s = str(spec)
    if s.endswith(".gguf") or s == EMBEDDED_TEACHER:
        model = load_model(s, to_device=False)
        return source_from_params(model.config, model.params, where=s, files=model.files)
    return open_hf_source(spec)


def materialise(source: TensorSource) -> Params:
    """Parameters of a TensorSource as a plain nested dict of host arrays."""
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

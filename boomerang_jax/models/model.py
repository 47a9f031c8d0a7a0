"""The one in-memory model container: a config and its (stacked) parameter tree."""

from __future__ import annotations

from typing import NamedTuple

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params


class Model(NamedTuple):
    """A model as surgery sees it: its config and its (stacked) parameter tree."""

    config: ModelConfig
    params: Params

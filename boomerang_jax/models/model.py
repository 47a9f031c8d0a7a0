"""The one in-memory model container: a config, its (stacked) parameter tree and the HF files it carries."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params


@dataclasses.dataclass
class HFFiles:
    """What an HF directory carries besides its tensors, kept so a model can be written back as one: the
    source config.json (its unrelated keys survive an export), tokenizer files and generation config."""

    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    generation_config: dict[str, Any] | None = None


class CarriesHFFiles:
    """The HF files of anything with a `files: HFFiles` field, as attributes (`model.tokenizer_files`, ...)."""

    files: HFFiles

    @property
    def hf_config(self) -> dict[str, Any]:
        return self.files.hf_config

    @property
    def tokenizer_files(self) -> dict[str, bytes]:
        return self.files.tokenizer_files

    @property
    def generation_config(self) -> dict[str, Any] | None:
        return self.files.generation_config


@dataclasses.dataclass
class Model(CarriesHFFiles):
    """A model in memory: its config and (stacked) parameter tree, the HF files it came with (empty for a
    model made in memory) and where it came from. Behaves as the pair (config, params) for unpacking and
    indexing (`config, params = model`, `model[1]`), as surgery's (config, params) results always have."""

    config: ModelConfig
    params: Params
    files: HFFiles = dataclasses.field(default_factory=HFFiles)
    where: str = ""

    def __iter__(self) -> Iterator[Any]:
        return iter((self.config, self.params))

    def __getitem__(self, index: int | slice) -> Any:
        return (self.config, self.params)[index]

    def __len__(self) -> int:
        return 2

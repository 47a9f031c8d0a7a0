"""Training checkpoints with orbax: train state + data-iterator state + run metadata, async, keep-N.

One checkpoint = one step directory holding three items: `state` (student params, AdamW state, step;
sharded arrays, restored straight onto the mesh), `data` (the grain iterator state, JSON) and `meta` (plan,
configs, metrics; JSON). Orbax writes each step to a temporary directory and renames it when complete (on
gs://, where there is no rename, it writes `commit_success.txt` last), so `latest_step` only ever sees
finished checkpoints: a run killed mid-save resumes from the previous one. Directories may be local or
gs:// (tensorstore writes the arrays to the bucket directly).

Every checkpoint's meta records the package versions it was written under (`software_versions`); a run that
resumes under other versions gets a `VersionMismatchWarning` naming each package and both versions
(`check_versions`): a different jax/orbax/grain can change numerics or the data order, so an exact resume is
then no longer guaranteed, but the run goes on.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from boomerang_jax.distill.optim import TrainConfig, abstract_train_state
from boomerang_jax.infra import storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.model import HFFiles
from boomerang_jax.models.transformer import param_shapes
from boomerang_jax.surgery import LayerPlan
from boomerang_jax.surgery.tensors import TensorSource, source_from_params

ITEMS = ("state", "data", "meta")
# Distributions whose versions a checkpoint records (the packages that decide its numerics, layout and data order).
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "boomerang-jax")


class VersionMismatchWarning(UserWarning):
    """A checkpoint is resumed under package versions other than those it was written under."""


def software_versions() -> dict[str, str | None]:
    """{distribution: installed version (None if not installed)} for every VERSIONED_PACKAGES entry."""
    out: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_versions(recorded: Mapping[str, Any] | None, where: str) -> list[str]:
    """Warn (VersionMismatchWarning) about every package whose installed version differs from the one `recorded`
    in the checkpoint at `where`; returns the differences, one 'name: recorded -> installed' per package.
    A checkpoint that recorded no versions (written before they were recorded) is not checked."""
    if not recorded:
        return []
    now = software_versions()
    diffs = [f"{name}: {recorded.get(name)} -> {now.get(name)}" for name in sorted(set(recorded) | set(now))
             if recorded.get(name) != now.get(name)]
    if diffs:
        warnings.warn(f"{where} was written under other package versions (checkpoint -> installed): "
                      f"{'; '.join(diffs)}. Resuming anyway; the run may not repeat exactly what the old versions "
                      "would have done. Install the recorded versions for an exact resume.",
                      VersionMismatchWarning, stacklevel=2)
    return diffs


class Checkpointer:
    """A thin wrapper over orbax's CheckpointManager for the distillation loop."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> None:
        directory = str(directory)
        # orbax/tensorstore need absolute local paths; gs:// and other URLs pass through.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_names=ITEMS,
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any], *,
             force: bool = True) -> bool:
        """Start saving (async); returns whether a save was started. `meta` gets the package versions
        (`software_versions`) under "versions"."""
        meta = {**meta, "versions": software_versions()}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Restore (state, data_state, meta) of `step`; arrays land with the shardings of `abstract_state`."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["meta"]

    def restore_meta(self, step: int) -> dict[str, Any]:
        """Only the JSON metadata of a checkpoint (plan, configs), e.g. to export a student without a mesh."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with shardings attached: the restore target, allocated by orbax directly on the mesh."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _checkpoint_dir_and_step(path: str) -> tuple[str, int | None] | None:
    """Accept a run dir (with checkpoints/), a checkpoints dir, or one step's dir (local or gs://); None if
    none of these."""
    children = storage.listdir(path)
    if "checkpoints" in children:
        path = storage.join(path, "checkpoints")
        children = storage.listdir(path)
    if storage.name(path).isdigit() and "meta" in children:
        return storage.parent(path), int(storage.name(path))
    if any(c.isdigit() and storage.exists(storage.join(path, c, "meta")) for c in children):
        return path, None
    return None


def read_student_checkpoint(path: str | Path) -> TensorSource | None:
    """A `TensorSource` for the student of a distillation checkpoint (latest step unless a step dir is given).

    Restores on the host without a mesh; the plan, configs and teacher config come from the checkpoint's meta.
    Local or `gs://`. Returns None when `path` is not a distillation checkpoint (so other readers can try).
    """
    found = _checkpoint_dir_and_step(str(path) if storage.is_remote(path) else os.path.abspath(path))
    if found is None:
        return None
    directory, step = found
    ckpt = Checkpointer(directory, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{directory}: no complete checkpoint")
        meta = ckpt.restore_meta(step)
        sc = dict(meta["student_config"])
        if isinstance(sc.get("eos_token_id"), list):
            sc["eos_token_id"] = tuple(sc["eos_token_id"])
        config = ModelConfig(**sc)
        tcfg = TrainConfig(**meta["config"].get("train", {}))
        shapes = param_shapes(config, jnp.dtype(tcfg.param_dtype))
        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu),
                                abstract_train_state(shapes, tcfg))
        state, _, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    params = jax.tree.map(np.asarray, state.params)
    return source_from_params(config, params, where=f"{directory} step {step}",
                              files=HFFiles(hf_config=dict(meta.get("hf_config") or {})),
                              plan=LayerPlan.from_dict(meta["plan"], source=f"{directory} step {step} meta"))

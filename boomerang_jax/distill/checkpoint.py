"""Training checkpoints with orbax: train state + data-iterator state + run metadata, async, keep-N.

One checkpoint = one step directory holding three items: `state` (student params, AdamW state, step;
sharded arrays, restored straight onto the mesh), `data` (the grain iterator state, JSON) and `meta` (plan,
configs, metrics; JSON). Orbax writes each step to a temporary directory and renames it when complete (or a
commit marker on gs://), so `latest_step` only ever sees finished checkpoints: a run killed mid-save
resumes from the previous one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


class Checkpointer:
    """A thin wrapper over orbax's CheckpointManager for the distillation loop."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> None:
        self.directory = str(directory)
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
        """Start saving (async); returns whether a save was started."""
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

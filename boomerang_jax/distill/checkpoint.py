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
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

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


class SettingsChangedWarning(UserWarning):
    """A run resumes with settings (teacher, data, optimiser, loss) other than those its checkpoint was made with."""


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def check_settings(recorded: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> list[str]:
    """Warn (SettingsChangedWarning) about every setting of the run config that differs from the one `recorded`
    in the checkpoint at `where` (the `run.*` bookkeeping keys excepted: a new run.dir or log cadence changes
    nothing the model sees); returns 'key: recorded -> now' per setting."""
    if not recorded:
        return []
    old, new = _flatten(recorded), _flatten(current)
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if not k.startswith("run.") and old.get(k) != new.get(k)]
    if diffs:
        warnings.warn(f"{where} was made with other settings (checkpoint -> now): {'; '.join(diffs)}. Resuming "
                      "with the new ones; the optimiser state and data position come from the old run.",
                      SettingsChangedWarning, stacklevel=2)
    return diffs


class RunStopped(RuntimeError):
    """The run cannot go on (a failed checkpoint, a diverged loss); the message says why and how to resume."""


class CheckpointFailed(RunStopped):
    """A checkpoint could not be written (often: the disk is full). Raised as soon as the loop notices, so no
    training goes on past a save that will never be resumable."""


def _first_line(e: BaseException, limit: int = 400) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + " ..."


def _disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if getattr(e, "errno", None) == 28 or "No space left on device" in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _code_names(tb: Any) -> Iterator[tuple[str, str]]:
    """(file name, function name) of each frame of a traceback, outermost first."""
    while tb is not None:
        yield tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name
        tb = tb.tb_next


class _QuietOrbaxErrors(logging.Filter):
    """orbax logs a failed background save once per thread, each with a full traceback; keep one line each
    (CheckpointFailed carries the cause)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        message = record.getMessage()
        if record.name == "asyncio":  # orbax's writer tasks of a failed save, collected at exit
            unretrieved = message.startswith(("Task exception was never retrieved",
                                              "Future exception was never retrieved"))
            # the message names only the exception; where it was raised is in the traceback
            raised_in_orbax = record.exc_info and any("orbax" in f for f, _ in _code_names(record.exc_info[2]))
            return not (unretrieved and ("orbax" in message or raised_in_orbax))
        if "orbax" in (record.pathname or ""):
            if "raised an exception" in message:
                return False  # the same cause once per writer thread; CheckpointFailed reports it
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _closed_loop_callback(kind: type | None, value: BaseException | None, tb: Any) -> bool:
    """Whether an exception is a completion callback reaching orbax's event loop after it was closed."""
    return (kind is RuntimeError and str(value) == "Event loop is closed"
            and any(name == "call_soon_threadsafe" for _, name in _code_names(tb)))


def _quiet_closed_loop_callbacks() -> None:
    """After a failed save, tensorstore's completion callbacks still try to reach orbax's closed event loop, and
    each prints a `RuntimeError: Event loop is closed` traceback (as an unraisable exception, or through
    sys.excepthook); drop exactly those."""
    if getattr(sys.excepthook, "_boomerang", False):
        return
    previous_except, previous_unraisable = sys.excepthook, sys.unraisablehook

    def except_hook(kind, value, tb):  # noqa: ANN001 (the excepthook signature)
        if not _closed_loop_callback(kind, value, tb):
            previous_except(kind, value, tb)

    def unraisable_hook(u):  # noqa: ANN001 (sys.UnraisableHookArgs)
        if not _closed_loop_callback(u.exc_type, u.exc_value, u.exc_traceback):
            previous_unraisable(u)

    except_hook._boomerang = True  # type: ignore[attr-defined]
    sys.excepthook, sys.unraisablehook = except_hook, unraisable_hook


class Checkpointer:
    """A thin wrapper over orbax's CheckpointManager for the distillation loop."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True) -> None:
        directory = str(directory)
        # orbax/tensorstore need absolute local paths; gs:// and other URLs pass through.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        _quiet_closed_loop_callbacks()
        for name in ("absl", "asyncio"):
            if not any(isinstance(f, _QuietOrbaxErrors) for f in logging.getLogger(name).filters):
                logging.getLogger(name).addFilter(_QuietOrbaxErrors())
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
        try:  # orbax first waits for the previous save, and re-raises its error
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=force,
            )
        except Exception as e:
            raise self._failed(e, step) from e

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

    def check(self, step: int) -> None:
        """Raise CheckpointFailed if a save running in the background has failed (checked after every step)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # orbax re-raises the writer's error (ValueError, OSError, ...)
            raise self._failed(e, step) from e

    def wait(self, step: int | None = None) -> None:
        """Wait for the save in flight; CheckpointFailed if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(e, step) from e

    def _failed(self, e: BaseException, step: int | None) -> CheckpointFailed:
        complete = sorted(_complete_steps(self.directory))
        where = "" if step is None else f"; training stopped at step {step}"
        resume = (f"the last complete checkpoint is step {complete[-1]}, and rerunning the same command resumes "
                  "from it" if complete else "no checkpoint is complete yet, so a rerun starts from step 0")
        cause = "the disk is full" if _disk_full(e) else "it could not be written"
        return CheckpointFailed(f"{self.directory}: a checkpoint failed in the background ({cause}: {_first_line(e)})"
                                f"{where}; {resume}{'; free space first' if _disk_full(e) else ''}")

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _complete_steps(directory: str) -> list[int]:
    """Steps with a finished checkpoint directory (orbax renames a step's temporary dir when it completes; on
    a bucket it writes commit_success.txt last)."""
    remote = storage.is_remote(directory)
    steps = []
    for name in storage.listdir(directory) if storage.exists(directory) else []:
        name = name.rstrip("/").rsplit("/", 1)[-1]
        if name.isdigit() and (not remote or storage.exists(storage.join(directory, name, "commit_success.txt"))):
            steps.append(int(name))
    return steps


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

"""The parts the distillation loop calls (distill/train.py `run_distillation`): throughput, MFU and input wait,
the metrics log, periodic held-out evaluation, checkpoint cadence, the divergence guard, the progress bar,
preemption and the step profiler.

Each is small and owns one concern, so the loop reads as set-up -> step -> these parts -> finish. Behaviour is
the loop's: metrics.jsonl rows, checkpoint steps, resume and preemption are documented in distill/train.py.
"""

from __future__ import annotations

import dataclasses
import contextlib
import json
import math
import signal
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from boomerang_jax.data.pipeline import DataConfig, make_iterator
from boomerang_jax.distill.checkpoint import Checkpointer, RunStopped
from boomerang_jax.distill.optim import TrainState
from boomerang_jax.distill.step import Distiller
from boomerang_jax.infra import parallel, storage, topology
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.surgery import count_params

def flops_per_token(config: ModelConfig, seq_len: int, *, backward: bool) -> float:
    """Matmul FLOPs per token (PaLM-style: 2N forward + causal-free attention term; x3 with backward)."""
    n = count_params(config).non_embedding + config.hidden_size * config.vocab_size  # layers + LM head matmul
    attn = 4 * config.num_layers * config.num_heads * config.head_dim * seq_len
    fwd = 2 * n + attn
    return 3 * fwd if backward else fwd


def peak_flops(override_tflops: float | None) -> float | None:
    """Peak bf16 FLOP/s of all devices together, from the setting or the device kind (None when unknown)."""
    if override_tflops:
        return override_tflops * 1e12 * jax.device_count()
    generation = topology.generation_of(jax.devices()[0].device_kind)  # the spec sheets' dense bf16 figure
    return generation.peak_tflops * 1e12 * jax.device_count() if generation else None


def _jax_preemption_sync() -> bool:
    """Whether JAX's preemption sync manager is running (jax.distributed started with jax_enable_preemption_service,
    the default). It is only reachable through jax's private distributed state; if that ever moves, we fall back to
    our own agreement (`Preemption`), never to a per-host decision."""
    from jax._src import distributed

    state = getattr(distributed, "global_state", None)
    return getattr(state, "client", None) is not None and getattr(state, "preemption_sync_manager", None) is not None


class Preemption:
    """SIGTERM -> stop after a step (the step in flight finishes first), the same step on every process.

    One process ("local"): a Python SIGTERM handler sets a flag checked between steps. Several processes, where
    one host may be signalled alone and a per-host decision would leave it saving while the others wait in the
    next step's collectives: JAX's preemption sync manager ("jax"), whose C++ handler catches SIGTERM on any host
    and agrees with all hosts on a step (`multihost_utils.reached_preemption_sync_point`). No Python handler is
    installed then: it would replace the C++ one, and the manager would never hear of the signal. Without that
    manager ("allgather"), the Python flag is all-gathered after every step and all stop when any host has it.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None
        if jax.process_count() == 1:
            self.mode = "local"
        else:
            self.mode = "jax" if _jax_preemption_sync() else "allgather"

    def __enter__(self) -> "Preemption":
        if self.mode == "jax":
            return self
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to checkpoint `step` (just finished) and stop. Every process must call this after every step
        with the same `step`; on several processes it is collective, and returns the same answer on all."""
        if self.mode == "local":
            return self.requested
        from jax.experimental import multihost_utils

        if self.mode == "jax":
            return bool(multihost_utils.reached_preemption_sync_point(step))
        flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
        return bool(np.any(flags))

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class PartialLineWarning(UserWarning):
    """metrics.jsonl ended in a half-written line (the disk filled, or the process died mid-write): dropped."""


def _read_rows(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every metrics row in `path`. A last line that is not JSON was cut off mid-write: it is
    dropped with a warning naming the file (the run resumes); a broken line before it is an error naming it."""
    lines = [(i, ln) for i, ln in enumerate(storage.read_text(path).splitlines(), 1) if ln.strip()]
    rows = []
    for n, (i, ln) in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if n == len(lines) - 1:
                warnings.warn(f"{path}: line {i} is cut off ({e}); dropped, the run resumes from its checkpoint",
                              PartialLineWarning, stacklevel=3)
                break
            raise ValueError(f"{path}: line {i} is not a metrics row ({e}); fix or delete that line") from None
        rows.append((ln, row))
    return rows


class MetricsLog:
    """metrics.jsonl (and TensorBoard events when tensorboardX is installed), written by process 0 only.

    Local: appended line by line. On a bucket (no appends) the whole file is re-uploaded as one object at most
    every `flush_s` seconds and at every `flush()`; the loop flushes before each checkpoint, so the log always
    covers every step up to the newest checkpoint (and a resumed run continues it without gaps). TensorBoard
    writes gs:// itself (tensorboardX uses google-cloud-storage).
    """

    def __init__(self, run_dir: str, resume_step: int, *, flush_s: float = 30.0) -> None:
        self.enabled = parallel.is_main_process()
        self.path = storage.join(run_dir, "metrics.jsonl")
        self.remote = storage.is_remote(run_dir)
        self.flush_s = flush_s
        self.tb = None
        self._lines: list[str] = []
        self._dirty = False
        self._flushed_at = time.monotonic()
        if not self.enabled:
            return
        storage.makedirs(run_dir)
        if storage.exists(self.path):  # drop lines from steps after the checkpoint we resume from
            keep = [ln for ln, row in _read_rows(self.path) if row.get("step", 0) <= resume_step]
            self._lines = [ln + "\n" for ln in keep]
            storage.write_text(self.path, "".join(self._lines))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(storage.join(run_dir, "tensorboard"))
            _report_tensorboard_failures_in_one_line()
        except ImportError:
            self.tb = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one metrics row for `step` (and its scalars to TensorBoard)."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self._lines.append(line)
            self._dirty = True
            if time.monotonic() - self._flushed_at >= self.flush_s:
                self.flush()
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Make every line written so far durable (a no-op locally, where each line is appended at once)."""
        if self.enabled and self.remote and self._dirty:
            storage.write_text(self.path, "".join(self._lines))
            self._dirty = False
            self._flushed_at = time.monotonic()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        self.flush()
        if self.tb is not None:
            self.tb.close()

    def abandon(self) -> None:
        """Close after the run failed (e.g. the disk is full): best effort and silent, so that the error that
        stopped the run is the one the user sees (not a second one from a flush at exit)."""
        try:
            self.flush()
        except OSError:
            pass
        if self.tb is not None:
            try:
                self.tb.close()
            except OSError:  # tensorboardX would retry (and fail again) in its atexit hook
                writer = getattr(getattr(self.tb, "file_writer", None), "event_writer", None)
                if writer is not None:
                    writer._closed = True


def _report_tensorboard_failures_in_one_line() -> None:
    """tensorboardX writes events from a thread of its own, which dies with a traceback when the disk fills;
    say it in one line instead (metrics.jsonl keeps every row; the main thread reports the cause)."""
    previous = threading.excepthook
    if getattr(previous, "_boomerang", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        files, tb = [], args.exc_traceback
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if isinstance(args.exc_value, OSError) and any("tensorboardX" in f for f in files):
            if args.exc_value.errno is None:  # its queue closed under it after such a failure: nothing new
                return
            print(f"warning: TensorBoard events could not be written ({args.exc_value}); metrics.jsonl has every row",
                  file=sys.stderr)
            return
        previous(args)

    hook._boomerang = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """A step's metrics as host floats."""
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def _evaluate(distiller: Distiller, params: Any, teacher: Any, batches: Iterable[dict[str, np.ndarray]]
              ) -> dict[str, float]:
    """Token-weighted mean of each loss term over held-out batches."""
    sums: dict[str, float] = {}
    tokens = 0.0
    for batch in batches:
        m = host_metrics(distiller.evaluate(params, teacher, distiller.put_eval_batch(batch)))
        n = m.pop("tokens")
        tokens += n
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * n
    return {f"eval/{k}": v / max(tokens, 1.0) for k, v in sums.items()} | {"eval/tokens": tokens}


class TrainingDiverged(RunStopped):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Throughput:
    """Adds step time, tokens/s, (when the peak is known) MFU and the input pipeline's share to a step's metrics.

    `data_wait_s`: host time blocked in `next(iterator)` (part of `step_time_s`); `data_tokens_per_s`: this host's
    non-padding batch tokens / that wait, the rate the pipeline delivered at (large when it keeps up: only low
    values matter). Both are process 0's host figures; measuring them costs two clock reads and a count, no sync.
    """

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float | None) -> None:
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak

    def measure(self, host: dict[str, float], dt: float, data_wait: float | None = None,
                data_tokens: int | None = None) -> dict[str, float]:
        """`host` (a step's metrics, updated in place and returned) plus the step's time `dt` and rates, and the
        time `data_wait` the step waited for its batch of `data_tokens` real tokens when given."""
        host.update(step_time_s=dt, tokens_per_s=self.tokens_per_step / dt)
        if self.peak:
            host["mfu"] = self.flops_per_step / dt / self.peak
        if data_wait is not None:
            host["data_wait_s"] = data_wait
            if data_tokens is not None:
                host["data_tokens_per_s"] = data_tokens / max(data_wait, 1e-9)
        return host


def batch_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """The real (non-padding) tokens of a host batch: its nonzero segment ids (all of them for concat packing)."""
    return int(np.count_nonzero(batch["segment_ids"]))


class StepProfiler:
    """A jax.profiler trace of steps `first..last` (numbered as in metrics.jsonl) into `run_dir`/profile, for
    TensorBoard's profile plugin / xprof. On a bucket it traces to a local folder and uploads it when done. The
    loop calls `before(step)` before running step `step` and `after(step)` once its metrics are on the host."""

    def __init__(self, run_dir: str, steps: tuple[int, int] | None, log: Any = print) -> None:
        self.dest, self.steps, self.log = storage.join(run_dir, "profile"), steps, log
        self.remote = storage.is_remote(run_dir)
        self.local: str | None = None

    def before(self, step: int) -> None:
        """Start tracing when `step` is the first step to trace (or a later one of the range after a resume)."""
        if self.steps and self.local is None and self.steps[0] <= step <= self.steps[1]:
            self.local = tempfile.mkdtemp(prefix="boomerang-profile-") if self.remote else self.dest
            if not self.remote:
                storage.makedirs(self.dest)
            jax.profiler.start_trace(self.local)

    def annotation(self, step: int) -> Any:
        """A StepTraceAnnotation for `step` while tracing (xprof's step view), else a no-op context."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.local else contextlib.nullcontext()

    def after(self, step: int) -> None:
        """Stop (and upload) the trace after its last step."""
        if self.local is not None and step >= self.steps[1]:
            self.close()
            self.log(f"profile of steps {self.steps[0]}..{step} written to {self.dest} "
                     f"(tensorboard --logdir {self.dest}, or xprof)")
            self.steps = None

    def close(self) -> None:
        """Stop a trace in progress (the loop ended inside the range) and upload it."""
        if self.local is None:
            return
        jax.profiler.stop_trace()
        if self.remote:
            storage.upload_dir(self.local, self.dest)
        self.local = None


class Progress:
    """A tqdm bar of the run's steps on process 0 (none when `enabled` is false or on other processes)."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled and parallel.is_main_process():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="distill", unit="step", dynamic_ncols=True)

    def update(self, host: Mapping[str, float]) -> None:
        """One step done: advance the bar and show its loss, KL and tokens/s."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{host['loss']:.3f}", kl=f"{host.get('kl', 0):.3f}",
                                 tok_s=f"{host['tokens_per_s']:.0f}")

    def close(self) -> None:
        """Close the bar (if any)."""
        if self.bar is not None:
            self.bar.close()


class PeriodicEval:
    """Every `every` steps: the held-out loss terms over the first `batches` batches of one fresh pass of the
    eval data (`eval_cfg`; None or every=0: never)."""

    def __init__(self, distiller: Distiller, eval_cfg: DataConfig | None, every: int, batches: int) -> None:
        self.distiller, self.eval_cfg, self.every, self.batches = distiller, eval_cfg, every, batches

    def due(self, step: int) -> bool:
        """Whether to evaluate after `step`."""
        return self.eval_cfg is not None and bool(self.every) and step % self.every == 0

    def run(self, params: Any, teacher_params: Any) -> dict[str, float]:
        """The `eval/...` metrics of the student `params` against the teacher (token-weighted means)."""
        it = make_iterator(dataclasses.replace(self.eval_cfg, num_epochs=1, drop_remainder=False))
        batches = [b for _, b in zip(range(self.batches), it)]
        if hasattr(it, "close"):
            it.close()
        return _evaluate(self.distiller, params, teacher_params, batches)


class RunCheckpoints:
    """When and how the loop checkpoints: every `every` steps and at `total_steps`; each save first flushes the
    metrics log, so the log covers every step of a checkpoint before that checkpoint can commit."""

    def __init__(self, ckpt: Checkpointer, metrics_log: MetricsLog, meta: Mapping[str, Any], every: int,
                 total_steps: int) -> None:
        self.ckpt, self.metrics_log, self.meta = ckpt, metrics_log, dict(meta)
        self.every, self.total_steps = every, total_steps

    def due(self, step: int) -> bool:
        """Whether the cadence checkpoints `step` (every `every` steps and the last step of the schedule)."""
        return step % self.every == 0 or step == self.total_steps

    def save(self, step: int, state: TrainState, iterator: Any) -> None:
        """Checkpoint `state` and the data iterator's state at `step` (asynchronously when so configured)."""
        self.metrics_log.flush()
        self.ckpt.save(step, state, iterator.get_state(), {**self.meta, "step": step})

    def check_finite(self, host: Mapping[str, float], step: int) -> None:
        """Raise TrainingDiverged on a non-finite loss, after making the log and the last good checkpoint durable
        (the bad state is never saved)."""
        if math.isfinite(host["loss"]):
            return
        self.metrics_log.flush()
        self.ckpt.wait(step)
        raise TrainingDiverged(
            f"non-finite loss {host['loss']} at step {step} (ce {host.get('ce')}, kl {host.get('kl')}, "
            f"grad norm {host.get('grad_norm')}); the last good checkpoint "
            f"(step {self.ckpt.latest_step()}) in {self.ckpt.directory} is kept. Lower train.lr or check the data.")

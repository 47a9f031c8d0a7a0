"""The distillation loop behind `boomerang distill`: set up, resume, train, checkpoint, evaluate, export.

Every host runs the same program. Resume is automatic and exact: a checkpoint holds the train state and
the data-iterator state of the same step, so the loss sequence after a restart equals an uninterrupted
run. SIGTERM (preemption) checkpoints the current step and exits, at the same step on every host even when
only one host got the signal; a non-finite loss stops the run with a clear error and keeps the last good
checkpoint (the bad state is never saved). Batch sizes that do not fit the mesh are errors at start-up,
before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.data.pipeline import DataConfig, make_iterator
from boomerang_jax.distill.checkpoint import Checkpointer, abstract_like, check_versions
from boomerang_jax.distill.config import RunConfigError, loss_config, run_settings, train_config
from boomerang_jax.distill.step import Distiller, TrainState
from boomerang_jax.infra import parallel, storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import param_shapes
from boomerang_jax.surgery import LayerPlan, SurgeryError, check_compatible, count_params, prune

# bf16 peak TFLOP/s per device (public spec sheets), for the MFU estimate.
PEAK_TFLOPS = {"tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
               "tpu v6": 918.0, "h100": 989.0, "h200": 989.0, "a100": 312.0, "l4": 121.0}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def plan_from_config(spec: Any, num_teacher_layers: int) -> LayerPlan:
    """`plan:` as knobs {every, first, last}, {kept: [...]}, a full plan dict with blocks, or a spec string."""
    if isinstance(spec, str):
        return LayerPlan.parse(spec, num_teacher_layers)
    if isinstance(spec, Mapping) and "blocks" in spec:
        return LayerPlan.from_dict(dict(spec), source="plan")
    if isinstance(spec, Mapping) and "kept" in spec:
        return LayerPlan.from_kept(num_teacher_layers, spec["kept"])
    if isinstance(spec, Mapping):
        return LayerPlan.from_knobs(num_teacher_layers, **spec)
    raise ValueError(f"plan: cannot read {spec!r}")


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
    kind = jax.devices()[0].device_kind.lower()
    for key, tf in PEAK_TFLOPS.items():
        if key in kind:
            return tf * 1e12 * jax.device_count()
    return None


def _jax_preemption_sync() -> bool:
    """Whether JAX's preemption sync manager is running (jax.distributed started with jax_enable_preemption_service,
    the default). It is only reachable through jax's private distributed state; if that ever moves, we fall back to
    our own agreement (`_Preemption`), never to a per-host decision."""
    from jax._src import distributed

    state = getattr(distributed, "global_state", None)
    return getattr(state, "client", None) is not None and getattr(state, "preemption_sync_manager", None) is not None


class _Preemption:
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

    def __enter__(self) -> "_Preemption":
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
            keep = [ln for ln in storage.read_text(self.path).splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= resume_step]
            self._lines = [ln + "\n" for ln in keep]
            storage.write_text(self.path, "".join(self._lines))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(storage.join(run_dir, "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
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
        self.flush()
        if self.tb is not None:
            self.tb.close()


def _host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()}


def _evaluate(distiller: Distiller, params: Any, teacher: Any, batches: Iterable[dict[str, np.ndarray]]
              ) -> dict[str, float]:
    """Token-weighted mean of each loss term over held-out batches."""
    sums: dict[str, float] = {}
    tokens = 0.0
    for batch in batches:
        m = _host_metrics(distiller.evaluate(params, teacher, distiller.put_eval_batch(batch)))
        n = m.pop("tokens")
        tokens += n
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * n
    return {f"eval/{k}": v / max(tokens, 1.0) for k, v in sums.items()} | {"eval/tokens": tokens}


def _nearest_multiples(value: int, unit: int) -> list[int]:
    """The positive multiples of `unit` nearest to `value`: the one below (if any) and the one above."""
    return [m for m in dict.fromkeys((value // unit * unit, -(-value // unit) * unit)) if m > 0]


def _nearest_divisors(value: int, target: int) -> list[int]:
    """The divisors of `value` nearest to `target`: the largest below and the smallest above it."""
    divisors = [d for d in range(1, value + 1) if value % d == 0]
    below, above = [d for d in divisors if d < target], [d for d in divisors if d > target]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def _either(key: str, values: list[int]) -> str:
    return " or ".join(f"{key}={v}" for v in values)


def check_batch_config(cfg: Mapping[str, Any], mesh: Any) -> None:
    """Raise RunConfigError unless data.train.batch_size splits into train.micro_batches micro-batches that each
    divide over the mesh's data x fsdp, and data.eval.batch_size divides over data x fsdp (held-out batches are
    never micro-batched). The message names the keys and the nearest valid values. Cheap: run before loading."""
    n = parallel.batch_shards(mesh)
    where = f"data x fsdp = {n} devices (mesh {parallel.mesh_shape(mesh)})"
    k = train_config(cfg).micro_batches
    data = cfg.get("data") or {}
    problems = []
    b = int((data.get("train") or {}).get("batch_size", DataConfig.batch_size))
    if b % (k * n):
        if b % n == 0:  # the batch fits the mesh: the micro-batch count is the culprit
            problems.append(
                f"train.micro_batches={k} does not fit data.train.batch_size={b}: "
                + (f"{b} rows do not split into {k} micro-batches" if b % k else
                   f"a micro-batch of {b // k} rows does not split over {where}")
                + f"; set {_either('train.micro_batches', _nearest_divisors(b // n, k))}"
                + f" (or {_either('data.train.batch_size', _nearest_multiples(b, k * n))})")
        else:
            problems.append(
                f"data.train.batch_size={b} does not split over {where}"
                + (f" in train.micro_batches={k} micro-batches" if k > 1 else "")
                + f"; use {_either('data.train.batch_size', _nearest_multiples(b, k * n))}"
                + (f" (multiples of micro_batches x data x fsdp = {k} x {n})" if k > 1 else ""))
    if data.get("eval"):
        e = int(data["eval"].get("batch_size", DataConfig.batch_size))
        if e % n:
            problems.append(f"data.eval.batch_size={e} does not split over {where} (held-out batches are never "
                            f"split into micro-batches); use {_either('data.eval.batch_size', _nearest_multiples(e, n))}")
    if problems:
        raise RunConfigError("batch sizes do not fit the mesh: " + "; ".join(problems))


def _data_config(section: Mapping[str, Any], mesh: Any, *, eval_: bool = False) -> DataConfig:
    """A host's DataConfig from a `data.train` / `data.eval` section whose batch_size is the GLOBAL batch.

    Hosts whose devices hold the same batch rows (a batch replicated across hosts) read the same shard.
    """
    d = dict(section)
    global_batch = int(d.get("batch_size", DataConfig.batch_size))
    index, count = parallel.process_data_shard(mesh)
    if global_batch % count:
        raise ValueError(f"data batch_size {global_batch} (global) is not divisible by the {count} data shards "
                         "of this mesh's processes")
    d.update(batch_size=global_batch // count, process_index=index, process_count=count)
    if eval_:
        d.setdefault("shuffle", False)
        d.setdefault("split", "validation")
    return DataConfig.from_dict(d)


def run_distillation(cfg: Mapping[str, Any], *, log: Callable[[str], None] = parallel.main_print,
                     max_steps: int | None = None) -> dict[str, Any]:
    """Run (or resume) the distillation described by a run config (see distill/config.py).

    `max_steps` stops early after that many steps of this invocation (tests, smoke runs); the schedule
    still follows `train.total_steps`. Returns a summary with status 'finished' or 'preempted'.
    """
    from boomerang_jax.hf.load import load_hf
    from boomerang_jax.hf.sources import load_model
    from boomerang_jax.surgery.family_export import save_student, source_from_params

    settings, tcfg, lcfg = run_settings(cfg), train_config(cfg), loss_config(cfg)
    run_dir = str(settings.dir)  # local path or gs:// URL
    mesh = parallel.make_mesh(cfg["mesh"])
    check_batch_config(cfg, mesh)  # before the teacher or any data is read
    t0 = time.perf_counter()
    teacher = load_model(cfg["teacher"], to_device=False)
    plan = plan_from_config(cfg["plan"], teacher.config.num_layers)
    if cfg.get("student"):
        student_ck = load_hf(cfg["student"], to_device=False)
        student_config, student_params = student_ck.config, student_ck.params
        try:  # the rule interpolation needs, checked now rather than as shape errors at the first step
            check_compatible(student_config, teacher.config, plan)
        except SurgeryError as e:
            raise RunConfigError(f"student {cfg['student']} cannot be distilled from teacher {cfg['teacher']} "
                                 f"with this plan: {e}") from None
    else:
        student_config, student_params = prune(teacher.params, teacher.config, plan)
    log(f"teacher {cfg['teacher']}: {teacher.config.num_layers} layers, "
        f"{count_params(teacher.config).total / 1e6:.1f}M params; student {student_config.num_layers} layers, "
        f"{count_params(student_config).total / 1e6:.1f}M params; plan kept {list(plan.kept)}; "
        f"mesh {parallel.mesh_shape(mesh)} ({time.perf_counter() - t0:.1f}s)")

    distiller = Distiller(student_config, teacher.config, plan, mesh, tcfg, lcfg)
    teacher_params = distiller.put_teacher(teacher.params)
    ckpt = Checkpointer(storage.join(run_dir, "checkpoints"), keep=settings.keep_checkpoints,
                        async_save=settings.async_checkpoints)
    meta = {"plan": plan.to_dict(), "config": json.loads(json.dumps(cfg, default=str)),
            "student_config": dataclasses.asdict(student_config), "hf_config": teacher.hf_config}
    latest = ckpt.latest_step()
    data_cfg = _data_config(cfg["data"]["train"], mesh)
    if latest is not None:
        shapes = TrainState(
            params=param_shapes(student_config, jnp.dtype(tcfg.param_dtype)),
            opt_state=jax.eval_shape(distiller.optimizer.init, param_shapes(student_config,
                                                                            jnp.dtype(tcfg.param_dtype))),
            step=jax.ShapeDtypeStruct((), jnp.int32),
        )
        state, data_state, saved_meta = ckpt.restore(latest, abstract_like(shapes, distiller.state_shardings))
        if saved_meta.get("plan") != plan.to_dict():
            raise ValueError(f"{run_dir}: its checkpoints were made with a different layer plan; "
                             "use a new run.dir or the same plan")
        check_versions(saved_meta.get("versions"), f"checkpoint {ckpt.directory} step {latest}")
        iterator = make_iterator(data_cfg, data_state)
        log(f"resumed from {ckpt.directory} step {latest}")
    else:
        state = distiller.init_state(student_params)
        iterator = make_iterator(data_cfg)
    del student_params
    teacher.params = None  # host copy no longer needed: the teacher lives on the mesh

    step = int(jax.device_get(state.step))
    metrics_log = MetricsLog(run_dir, step)
    tokens_per_step = data_cfg.batch_size * data_cfg.process_count * data_cfg.seq_len
    flops = tokens_per_step * (flops_per_token(student_config, data_cfg.seq_len, backward=True)
                               + flops_per_token(teacher.config, data_cfg.seq_len, backward=False))
    peak = peak_flops(settings.peak_tflops)
    eval_cfg = _data_config(cfg["data"]["eval"], mesh, eval_=True) if cfg["data"].get("eval") else None
    end = tcfg.total_steps if max_steps is None else min(tcfg.total_steps, step + max_steps)
    status = "finished"
    bar = None
    if settings.progress and parallel.is_main_process():
        from tqdm import tqdm

        bar = tqdm(total=tcfg.total_steps, initial=step, desc="distill", unit="step", dynamic_ncols=True)

    def save(at: int) -> None:
        metrics_log.flush()  # the log covers every step of a checkpoint before that checkpoint can commit
        ckpt.save(at, state, iterator.get_state(), {**meta, "step": at})

    last: dict[str, float] = {}
    with _Preemption() as preempt:
        while step < end:
            t = time.perf_counter()
            batch = next(iterator)
            state, metrics = distiller.step(state, teacher_params, distiller.put_batch(batch), step=step)
            host = _host_metrics(metrics)
            step += 1
            dt = time.perf_counter() - t
            if not math.isfinite(host["loss"]):
                metrics_log.flush()
                ckpt.wait()
                raise TrainingDiverged(
                    f"non-finite loss {host['loss']} at step {step} (ce {host.get('ce')}, kl {host.get('kl')}, "
                    f"grad norm {host.get('grad_norm')}); the last good checkpoint "
                    f"(step {ckpt.latest_step()}) in {ckpt.directory} is kept. Lower train.lr or check the data.")
            host.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt)
            if peak:
                host["mfu"] = flops / dt / peak
            last = host
            if step % settings.log_every == 0 or step == end:
                metrics_log.write(step, host)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{host['loss']:.3f}", kl=f"{host.get('kl', 0):.3f}",
                                tok_s=f"{host['tokens_per_s']:.0f}")
            if eval_cfg is not None and settings.eval_every and step % settings.eval_every == 0:
                it = make_iterator(dataclasses.replace(eval_cfg, num_epochs=1, drop_remainder=False))
                batches = [b for _, b in zip(range(settings.eval_batches), it)]
                if hasattr(it, "close"):
                    it.close()
                metrics_log.write(step, _evaluate(distiller, state.params, teacher_params, batches))
            if preempt.should_stop(step):  # collective on several processes: every one stops at this step
                save(step)
                ckpt.wait()
                status = "preempted"
                log(f"SIGTERM: checkpointed step {step} to {ckpt.directory}; rerun the same command to resume")
                break
            if step % settings.checkpoint_every == 0 or step == tcfg.total_steps:
                save(step)
    if bar is not None:
        bar.close()
    if status == "finished" and ckpt.latest_step() != step and step > 0:
        save(step)
    if hasattr(iterator, "close"):
        iterator.close()  # stop grain's read-ahead threads (they would keep reading remote shards at exit)
    ckpt.wait()
    summary = {"status": status, "step": step, "total_steps": tcfg.total_steps, "run_dir": str(run_dir),
               "last_metrics": last}
    if status == "finished" and step == tcfg.total_steps and settings.export_student:
        params = parallel.to_host(state.params)
        if parallel.is_main_process():
            src = source_from_params(student_config, params, where=f"{run_dir} step {step}",
                                     hf_config=teacher.hf_config, tokenizer_files=teacher.tokenizer_files,
                                     generation_config=teacher.generation_config, plan=plan)
            out = save_student(storage.join(run_dir, "student"), src, plan, dtype="float32", overwrite=True)
            summary["student_dir"] = str(out)
            log(f"student exported to {out}")
    ckpt.close()
    metrics_log.close()
    return summary

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
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from boomerang_jax.data.pipeline import DataConfig, make_iterator
from boomerang_jax.distill.checkpoint import Checkpointer, abstract_like, check_settings, check_versions
from boomerang_jax.distill.config import RunConfig, RunConfigError
from boomerang_jax.distill.loop import (
    MetricsLog,
    PeriodicEval,
    Preemption,
    Progress,
    RunCheckpoints,
    StepProfiler,
    Throughput,
    batch_tokens,
    flops_per_token,
    host_metrics,
    peak_flops,
)
from boomerang_jax.distill.optim import TrainState, abstract_train_state
from boomerang_jax.distill.step import Distiller
from boomerang_jax.hf.load import load_hf, load_model
from boomerang_jax.infra import parallel, storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import param_shapes
from boomerang_jax.surgery import LayerPlan, SurgeryError, check_compatible, count_params, prune
from boomerang_jax.surgery.family_export import save_student
from boomerang_jax.surgery.tensors import source_from_params


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


def check_batch_config(cfg: RunConfig, mesh: Any) -> None:
    """Raise RunConfigError unless data.train.batch_size splits into train.micro_batches micro-batches that each
    divide over the mesh's data x fsdp, and data.eval.batch_size divides over data x fsdp (held-out batches are
    never micro-batched). The message names the keys and the nearest valid values. Cheap: run before loading."""
    n = parallel.batch_shards(mesh)
    where = f"data x fsdp = {n} devices (mesh {parallel.mesh_shape(mesh)})"
    k = cfg.train.micro_batches
    problems = []
    b = cfg.data.train_batch_size
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
    e = cfg.data.eval_batch_size
    if e is not None:
        if e % n:
            problems.append(f"data.eval.batch_size={e} does not split over {where} (held-out batches are never "
                            f"split into micro-batches); use {_either('data.eval.batch_size', _nearest_multiples(e, n))}")
    if problems:
        raise RunConfigError("batch sizes do not fit the mesh: " + "; ".join(problems))


# Training batches prefetched by a thread unless data.train.prefetch_batches says otherwise: the host waits on
# the device every step (host_metrics), and the thread packs the next batches meanwhile. Measured on a CPU host
# with a 0.2 s simulated step: per-step wait 41 ms -> 1 ms (32x2048 rows), 1.4 -> 0.1 ms (tiny 4x32); grain
# worker processes did no better. Same order and the same (interchangeable) iterator state as without.
TRAIN_PREFETCH = 2


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
    else:
        d.setdefault("prefetch_batches", TRAIN_PREFETCH)
    return DataConfig.from_dict(d)


@dataclasses.dataclass
class _Run:
    """What set-up hands the loop: the models on the mesh, the (restored or fresh) state and data iterator."""

    run_dir: str
    plan: LayerPlan
    teacher: Any  # the loaded teacher checkpoint (its host params dropped once on the mesh)
    teacher_params: Any
    student_config: ModelConfig
    distiller: Distiller
    state: TrainState
    iterator: Any
    ckpt: Checkpointer
    meta: dict[str, Any]
    data_cfg: DataConfig


def _load_models(cfg: RunConfig, mesh: Any, log: Callable[[str], None]) -> tuple[Any, LayerPlan, ModelConfig, Any]:
    """The teacher, the plan, and the student (given, checked against both; or pruned from the teacher)."""
    t0 = time.perf_counter()
    teacher = load_model(cfg.teacher, to_device=False)
    plan = cfg.layer_plan(teacher.config.num_layers)
    if cfg.student:
        student_ck = load_hf(cfg.student, to_device=False)
        student_config, student_params = student_ck.config, student_ck.params
        try:  # the rule interpolation needs, checked now rather than as shape errors at the first step
            check_compatible(student_config, teacher.config, plan)
        except SurgeryError as e:
            raise RunConfigError(f"student {cfg.student} cannot be distilled from teacher {cfg.teacher} "
                                 f"with this plan: {e}") from None
    else:
        student_config, student_params = prune(teacher.params, teacher.config, plan)
    log(f"teacher {cfg.teacher}: {teacher.config.num_layers} layers, "
        f"{count_params(teacher.config).total / 1e6:.1f}M params; student {student_config.num_layers} layers, "
        f"{count_params(student_config).total / 1e6:.1f}M params; plan kept {list(plan.kept)}; "
        f"mesh {parallel.mesh_shape(mesh)} ({time.perf_counter() - t0:.1f}s)")
    return teacher, plan, student_config, student_params


def _set_up(cfg: RunConfig, log: Callable[[str], None]) -> _Run:
    """Check the batches against the mesh, load the models, put them on the mesh, and resume from the newest
    checkpoint (state and data-iterator state of the same step) or start fresh."""
    run_dir = str(cfg.run.dir)  # local path or gs:// URL
    mesh = parallel.make_mesh(cfg.mesh)
    check_batch_config(cfg, mesh)  # before the teacher or any data is read
    teacher, plan, student_config, student_params = _load_models(cfg, mesh, log)
    tcfg = cfg.train
    distiller = Distiller(student_config, teacher.config, plan, mesh, tcfg, cfg.loss)
    teacher_params = distiller.put_teacher(teacher.params)
    ckpt = Checkpointer(storage.join(run_dir, "checkpoints"), keep=cfg.run.keep_checkpoints,
                        async_save=cfg.run.async_checkpoints)
    meta = {"plan": plan.to_dict(), "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
            "student_config": dataclasses.asdict(student_config), "hf_config": teacher.hf_config}
    latest = ckpt.latest_step()
    data_cfg = _data_config(cfg.data.train, mesh)
    if latest is not None:
        shapes = abstract_train_state(param_shapes(student_config, jnp.dtype(tcfg.param_dtype)), tcfg)
        state, data_state, saved_meta = ckpt.restore(latest, abstract_like(shapes, distiller.state_shardings))
        if saved_meta.get("plan") != plan.to_dict():
            raise ValueError(f"{run_dir}: its checkpoints were made with a different layer plan; "
                             "use a new run.dir or the same plan")
        check_versions(saved_meta.get("versions"), f"checkpoint {ckpt.directory} step {latest}")
        check_settings(saved_meta.get("config"), meta["config"], f"checkpoint {ckpt.directory} step {latest}")
        iterator = make_iterator(data_cfg, data_state)
        log(f"resumed from {ckpt.directory} step {latest}")
    else:
        state = distiller.init_state(student_params)
        iterator = make_iterator(data_cfg)
    del student_params
    teacher.params = None  # host copy no longer needed: the teacher lives on the mesh
    return _Run(run_dir, plan, teacher, teacher_params, student_config, distiller, state, iterator, ckpt, meta,
                data_cfg)


def _export_student(r: _Run, step: int, log: Callable[[str], None]) -> str | None:
    """Write the final student as an HF directory (with its plan) under run.dir/student; its path on process 0."""
    params = parallel.to_host(r.state.params)
    if not parallel.is_main_process():
        return None
    t = r.teacher
    src = source_from_params(r.student_config, params, where=f"{r.run_dir} step {step}", files=t.files, plan=r.plan)
    out = save_student(storage.join(r.run_dir, "student"), src, r.plan, dtype="float32", overwrite=True)
    log(f"student exported to {out}")
    return str(out)


def run_distillation(cfg: RunConfig, *, log: Callable[[str], None] = parallel.main_print,
                     max_steps: int | None = None) -> dict[str, Any]:
    """Run (or resume) the distillation described by a run config (distill/config.py): set-up, loop, finish.

    `max_steps` stops early after that many steps of this invocation (tests, smoke runs); the schedule
    still follows `train.total_steps`. Returns a summary with status 'finished' or 'preempted'.
    """
    settings, tcfg = cfg.run, cfg.train
    r = _set_up(cfg, log)
    state, iterator, distiller, ckpt = r.state, r.iterator, r.distiller, r.ckpt
    step = int(jax.device_get(state.step))
    metrics_log = MetricsLog(r.run_dir, step)
    seq = r.data_cfg.seq_len
    tokens_per_step = r.data_cfg.batch_size * r.data_cfg.process_count * seq
    throughput = Throughput(tokens_per_step, tokens_per_step * (
        flops_per_token(r.student_config, seq, backward=True)
        + flops_per_token(r.teacher.config, seq, backward=False)), peak_flops(settings.peak_tflops))
    eval_cfg = _data_config(cfg.data.eval, mesh=distiller.mesh, eval_=True) if cfg.data.eval else None
    evals = PeriodicEval(distiller, eval_cfg, settings.eval_every, settings.eval_batches)
    checkpoints = RunCheckpoints(ckpt, metrics_log, r.meta, settings.checkpoint_every, tcfg.total_steps)
    end = tcfg.total_steps if max_steps is None else min(tcfg.total_steps, step + max_steps)
    status = "finished"
    progress = Progress(settings.progress, tcfg.total_steps, step)
    profiler = StepProfiler(r.run_dir, settings.profile_range(), log)
    last: dict[str, float] = {}
    try:
        with Preemption() as preempt:
            while step < end:
                profiler.before(step + 1)
                t = time.perf_counter()
                batch = next(iterator)
                t_data = time.perf_counter()
                with profiler.annotation(step + 1):
                    state, metrics = distiller.step(state, r.teacher_params, distiller.put_batch(batch), step=step)
                    host = host_metrics(metrics)  # the loop's one sync per step
                step += 1
                dt = time.perf_counter() - t
                profiler.after(step)
                checkpoints.check_finite(host, step)
                ckpt.check(step)  # a save that failed in the background stops the run now, not at the next save
                last = throughput.measure(host, dt, t_data - t, batch_tokens(batch))
                if step % settings.log_every == 0 or step == end:
                    metrics_log.write(step, host)
                progress.update(host)
                if evals.due(step):
                    metrics_log.write(step, evals.run(state.params, r.teacher_params))
                if preempt.should_stop(step):  # collective on several processes: every one stops at this step
                    checkpoints.save(step, state, iterator)
                    ckpt.wait(step)
                    status = "preempted"
                    log(f"SIGTERM: checkpointed step {step} to {ckpt.directory}; rerun the same command to resume")
                    break
                if checkpoints.due(step):
                    checkpoints.save(step, state, iterator)
    except BaseException:  # failed checkpoint, diverged loss, disk full, Ctrl-C: close quietly, re-raise
        progress.close()
        try:
            profiler.close()
        except Exception:  # the error that stopped the run is the one to see
            pass
        metrics_log.abandon()
        if hasattr(iterator, "close"):
            iterator.close()
        raise
    progress.close()
    profiler.close()
    r.state = state
    if status == "finished" and ckpt.latest_step() != step and step > 0:
        checkpoints.save(step, state, iterator)
    if hasattr(iterator, "close"):
        iterator.close()  # stop grain's read-ahead threads (they would keep reading remote shards at exit)
    ckpt.wait(step)
    summary = {"status": status, "step": step, "total_steps": tcfg.total_steps, "run_dir": r.run_dir,
               "last_metrics": last}
    if status == "finished" and step == tcfg.total_steps and settings.export_student:
        out = _export_student(r, step, log)
        if out is not None:
            summary["student_dir"] = out
    ckpt.close()
    metrics_log.close()
    return summary

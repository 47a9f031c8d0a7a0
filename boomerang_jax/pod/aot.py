"""Compile a run for a TPU slice without the slice: `boomerang compile --config CFG --preset v5p-128`.

With `libtpu` installed (the `tpu` extra), JAX describes any Cloud TPU topology on a CPU-only host
(`jax.experimental.topologies.get_topology_desc`): its devices carry real process indices and the physical
torus order. Over a mesh of those devices this module lowers and compiles, with the run's real shardings and
parameters as ShapeDtypeStructs (nothing allocated, no weights read), the three programs a run executes:

  train step       the sharded distillation step (micro-batches, remat, the patch-aware hybrid if configured)
  eval step        the held-out evaluation of `data.eval` (one pass, no micro-batching)
  teacher forward  the teacher's per-row NLL (what perplexity and the family's evaluation run), sharded

XLA's memory analysis of each compiled program is the per-device memory that chip would need: arguments,
outputs, temporaries, minus what donation aliases. The largest program decides whether the run fits the chip's
HBM; `planning.estimate_memory`'s estimate is printed next to it. A run that does not fit is reported before any
TPU is paid for (non-zero exit from the CLI). Attention is what the run would use on the slice: `auto` (the
default) is splash for these TPU devices (`train.attention=xla` compiles the einsum path instead).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from boomerang_jax.distill.config import RunConfig
from boomerang_jax.distill.hybrid import hybrid_arrays
from boomerang_jax.distill.step import Distiller
from boomerang_jax.distill.train import check_batch_config
from boomerang_jax.models.attention import resolve_on
from boomerang_jax.models.nll import row_nll
from boomerang_jax.infra import parallel
from boomerang_jax.infra.topology import GIB, Topology, parse_topology
from boomerang_jax.pod.planning import MemoryEstimate, RunShape, describe_run, estimate_memory, run_shape
from boomerang_jax.surgery import patched_first

PROGRAMS = ("train step", "eval step", "teacher forward")
MIN_MARGIN = 0.10  # presets are chosen to leave at least this share of HBM free (docs/REPRODUCE.md)


class CompileError(RuntimeError):
    """A topology that cannot be described here (no libtpu, not a TPU) or a program that does not compile."""


# ----------------------------------------------------------------------------------------- topology
def _torus_dims(chips: int, start: Sequence[int]) -> tuple[int, ...]:
    """Cloud TPU slice shapes: from `start`, double the last of the smallest axes until `chips` are reached
    (v4/v5p from 2x2x1: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; v5e/v6e from 1x1: 1x2, 2x2, 2x4, 4x4, 4x8, 8x8)."""
    dims = list(start)
    while int(np.prod(dims)) < chips:
        i = max(j for j, d in enumerate(dims) if d == min(dims))
        dims[i] *= 2
    if int(np.prod(dims)) != chips:
        raise CompileError(f"{chips} chips is not a Cloud TPU slice shape")
    return tuple(dims)


def libtpu_topology_name(topo: Topology) -> str:
    """libtpu's name of one slice of `topo`, e.g. v5p-128 -> 'v5p:4x4x4', v5e-16 -> 'v5e:4x4', v4-8 -> 'v4:2x2x1'."""
    if topo.kind != "tpu":
        raise CompileError(f"{topo.name} is not a TPU topology: ahead-of-time compilation here is for TPU slices "
                           "(a GPU run is checked on the GPU itself, e.g. benchmarks/plan_memory_check.py)")
    gen, chips = topo.generation.name, topo.chips_per_slice
    if gen in ("v4", "v5p"):
        dims = _torus_dims(chips, (2, 2, 1)) if chips >= 4 else (1, 1, chips)
    else:
        dims = _torus_dims(chips, (1, 1))
    return f"{gen}:{'x'.join(map(str, dims))}"


def topology_devices(topology: Topology | str) -> list[Any]:
    """The devices of `topology` (all slices) as libtpu describes them on this host (no TPU needed)."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    name = libtpu_topology_name(topo)
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise CompileError(f"jax.experimental.topologies is missing ({e})") from None
    kwargs: dict[str, Any] = {}
    if topo.generation.name == "v4":
        kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as on a real v4 VM
    if topo.slices > 1:
        kwargs["num_slices"] = topo.slices
    # Describing a topology loads libtpu, which takes a machine-wide lock meant for a real TPU; nothing here
    # touches a TPU, so several compiles (and a training process on a TPU VM) may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except Exception as e:
        hint = "" if importlib.util.find_spec("libtpu") else (
            " libtpu is not installed: pip install -e '.[tpu]' (jax[tpu] pinned to the project's jax)")
        raise CompileError(f"cannot describe TPU topology {topo.name} ({name}): {type(e).__name__}: {e}.{hint}"
                           ) from None
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise CompileError(f"libtpu describes {name} x {topo.slices} slice(s) with {len(devices)} devices, "
                           f"expected {topo.chips}")
    return devices


# --------------------------------------------------------------------------------------------- report
@dataclasses.dataclass
class ProgramMemory:
    """XLA's memory analysis of one compiled program, per device, and how long it took to get it.

    When the program needs more than the chip has, XLA refuses to compile it (RESOURCE_EXHAUSTED); then only
    the requirement it reports is known (`exhausted` holds its message, `temp` the bytes it names)."""

    name: str
    argument: int
    output: int
    alias: int  # outputs that reuse donated argument buffers (the train state)
    temp: int
    code: int
    lower_s: float
    compile_s: float
    exhausted: str | None = None

    @property
    def total(self) -> int:
        """Peak bytes one device needs for this program: live arguments, non-aliased outputs, temporaries."""
        return self.argument + self.output - self.alias + self.temp + self.code

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"total": self.total}


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _exhausted_bytes(message: str) -> int | None:
    """The bytes XLA says a program needs, from its out-of-memory message ('... required for HLO temporaries
    (259.07G) exceeds available HBM (15.75G)'): the first size in the message."""
    m = re.search(r"\((\d+(?:\.\d+)?)([KMGT]?)i?B?\)", message)
    return None if m is None else int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclasses.dataclass
class CompileReport:
    """Every program of one run compiled for one topology, next to plan-memory's estimate."""

    topology: Topology
    libtpu_name: str
    mesh: dict[str, int]
    programs: list[ProgramMemory]
    estimate: MemoryEstimate | None  # plan-memory's figures for the same run
    describe: str = ""
    attention: str = ""  # the attention the programs were compiled with (resolved: xla or splash)

    @property
    def hbm(self) -> int:
        return self.topology.hbm_bytes

    @property
    def peak(self) -> ProgramMemory:
        return max(self.programs, key=lambda p: p.total)

    @property
    def margin(self) -> float:
        """Share of HBM left free by the largest program (negative: does not fit)."""
        return 1.0 - self.peak.total / self.hbm

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.hbm

    def verdict(self) -> str:
        p = self.peak
        if not self.fits:
            needs = "XLA refused it: " + p.exhausted if p.exhausted else f"needs {p.total / GIB:.2f} GiB per device"
            return (f"DOES NOT FIT: the {p.name} {needs}, "
                    f"{(p.total - self.hbm) / GIB:.2f} GiB over the {self.hbm / GIB:.0f} GiB of HBM; raise "
                    "train.micro_batches, use remat full, or a larger slice")
        low = f" (under the {MIN_MARGIN:.0%} margin presets keep)" if self.margin < MIN_MARGIN else ""
        return (f"fits: the {p.name} needs {p.total / GIB:.2f} of {self.hbm / GIB:.0f} GiB per device, "
                f"{self.margin:.0%} free{low}")

    def table(self) -> str:
        slices = f" x {self.topology.slices} slices" if self.topology.slices > 1 else ""
        lines = [f"{self.topology.describe()} (libtpu {self.libtpu_name}{slices}); mesh "
                 + ", ".join(f"{k}={v}" for k, v in self.mesh.items())
                 + (f"; attention {self.attention}" if self.attention else "")]
        if self.describe:
            lines.append(self.describe)
        lines.append(f"  {'per device, GiB':<18}{'arguments':>10}{'outputs':>9}{'aliased':>9}{'temps':>9}"
                     f"{'total':>9}{'lower s':>9}{'compile s':>10}")
        for p in self.programs:
            lines.append(f"  {p.name:<18}{p.argument / GIB:10.3f}{p.output / GIB:9.3f}{p.alias / GIB:9.3f}"
                         f"{p.temp / GIB:9.3f}{p.total / GIB:9.3f}{p.lower_s:9.1f}{p.compile_s:10.1f}")
        train = next((p for p in self.programs if p.name == "train step"), None)
        if self.estimate is not None and train is not None:
            ratio = self.estimate.total / max(train.total, 1)
            lines.append(f"  plan-memory estimate of the train step: {self.estimate.total / GIB:.3f} GiB "
                         f"({ratio:.2f}x XLA's)")
        lines.append("  " + self.verdict())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"topology": self.topology.name, "libtpu_topology": self.libtpu_name, "slices": self.topology.slices,
                "mesh": self.mesh, "attention": self.attention, "hbm": self.hbm, "programs": [p.to_dict() for p in self.programs],
                "peak_program": self.peak.name, "peak": self.peak.total, "fits": self.fits, "margin": self.margin,
                "plan_memory": None if self.estimate is None else self.estimate.total}


def _compiled_memory(name: str, lower: Callable[[], Any]) -> ProgramMemory:
    t0 = time.perf_counter()
    lowered = t1 = None
    try:
        lowered = lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:
        needed = _exhausted_bytes(str(e)) if "RESOURCE_EXHAUSTED" in str(e) and t1 is not None else None
        if needed is not None:
            first = str(e).strip().splitlines()[0]
            return ProgramMemory(name, 0, 0, 0, needed, 0, t1 - t0, time.perf_counter() - t1, first[:500])
        raise CompileError(f"the {name} does not compile: {type(e).__name__}: {str(e)[:2000]}") from e
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    if m is None:
        raise CompileError(f"XLA gave no memory analysis for the {name}")
    return ProgramMemory(name, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                         int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                         int(getattr(m, "generated_code_size_in_bytes", 0)), t1 - t0, t2 - t1)


def _largest_hybrid(distiller: Distiller) -> dict[str, np.ndarray] | None:
    """Gather indices of the largest hybrid patch-aware training draws: its most blocks, the longest ones."""
    sizes = [m for m in distiller.train_cfg.patch_sizes if m]
    if not sizes:
        return None
    plan = distiller.plan
    longest = sorted(plan.multi_layer_blocks, key=lambda b: -len(plan.blocks[b]))
    patched = patched_first(plan, longest[:max(sizes)])
    return {k: np.asarray(v) for k, v in hybrid_arrays(plan, patched).items()}


def compile_run(shape: RunShape, topology: Topology | str, mesh: Any, *, eval_batch: int | None = None,
                programs: Sequence[str] = PROGRAMS,
                log: Callable[[str], None] = lambda s: None) -> CompileReport:
    """Compile the run's programs for `topology` with `mesh` (a mesh config; -1 fills the topology) and return
    XLA's per-device memory of each. `eval_batch`: the global batch of `data.eval` (default: no eval step)."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise CompileError(f"unknown program(s) {unknown}; the programs are {', '.join(PROGRAMS)}")
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topo)
    jmesh = parallel.make_mesh(mesh, devices)
    sizes = parallel.mesh_shape(jmesh)
    d = Distiller(shape.student, shape.teacher, shape.plan, jmesh, shape.train, shape.loss)
    seq = shape.seq_len
    out: list[ProgramMemory] = []
    if "train step" in programs:
        log(f"compiling the train step ({shape.global_batch} x {seq} tokens) for {topo.name} ...")
        out.append(_compiled_memory("train step", lambda: d.lower_step(shape.global_batch, seq)))
        hybrid = _largest_hybrid(d)
        if hybrid is not None:
            name = f"train step, largest patch-aware hybrid ({len(hybrid['layers'])} layers)"
            log(f"compiling the {name} ...")
            mem = _compiled_memory(name, lambda: d.lower_step(shape.global_batch, seq, hybrid))
            if mem.temp == 0 and out[-1].temp > 0:
                # seen with libtpu 0.0.42: the gather-built hybrid compiles but reports no temporaries at all,
                # which cannot be its real footprint; count it as the plain step plus its own arguments
                mem.exhausted = None
                mem.name += " (XLA reported no temporaries; the plain step's counted)"
                mem.temp = out[-1].temp
            out.append(mem)
    if eval_batch and "eval step" in programs:
        log(f"compiling the eval step ({eval_batch} x {seq}) ...")
        out.append(_compiled_memory("eval step", lambda: d.lower_eval(eval_batch, seq)))
    if "teacher forward" in programs:
        rows = eval_batch or parallel.batch_shards(jmesh)
        parallel.check_batch_size(rows, jmesh)
        batch = d.abstract_batch(rows, seq)
        teacher = d.abstract_teacher()
        log(f"compiling the teacher forward ({rows} x {seq}) ...")
        fwd = jax.jit(row_nll, static_argnames=("config", "chunk", "dtype", "rows_sharding"),
                      out_shardings=NamedSharding(jmesh, P(parallel.BATCH_AXES)))
        rows = NamedSharding(jmesh, P(parallel.BATCH_AXES, None, None))
        def lower_teacher() -> jax.stages.Lowered:
            with d.mesh_context():
                return fwd.lower(teacher, d.teacher_config, batch, chunk=min(shape.loss.chunk, seq),
                                 dtype=shape.train.compute_dtype, rows_sharding=rows)

        out.append(_compiled_memory("teacher forward", lower_teacher))
    try:
        estimate = estimate_memory(shape, topo, mesh)
    except Exception:  # the estimate is informative only
        estimate = None
    used = sorted({resolve_on(devices, c.attention, seq, c.head_dim) for c in (d.student_config, d.teacher_config)})
    return CompileReport(topo, libtpu_topology_name(topo), sizes, out, estimate, describe_run(shape), "/".join(used))


def compile_config(cfg: RunConfig, topology: Topology | str, **kwargs: Any) -> CompileReport:
    """`compile_run` for a run config (distill/config.py): its models, plan, batch, mesh and eval batch."""
    # batch sizes that cannot split over this slice: the same start-up error, naming keys, as `distill` gives
    check_batch_config(cfg, parallel.make_mesh(cfg.mesh, topology_devices(topology)))
    eval_batch = int(cfg.data.eval["batch_size"]) if cfg.data.eval and cfg.data.eval.get("batch_size") else None
    return compile_run(run_shape(cfg), topology, cfg.mesh, eval_batch=eval_batch, **kwargs)


def report_json(report: CompileReport) -> str:
    return json.dumps(report.to_dict(), indent=2)

"""Plan a distillation run before paying for it: per-device memory on a topology, FLOPs, accelerator-hours.

`boomerang plan-memory --config configs/paper-qwen3-8b-base.yaml --topology v5p-128` prints, per device:
student parameters, AdamW state, gradients, the frozen teacher, gathered weights and activations. The first
four are exact: the same partition rules (`boomerang_jax.infra.parallel`) and optimizer-state shardings
(`distill.step`) as the train step, evaluated on an abstract mesh of the topology's shape, so they equal the
bytes the step allocates (tests/test_planning.py checks this on a CPU mesh). Gathered weights and activations
are estimates from the model shapes, the micro-batch and the remat policy (see `activation_parts`); XLA's
own buffer assignment will differ somewhat, so leave headroom.

Everything here needs shapes only: teacher configs come from config.json (local or gs://), from the GGUF
metadata of the embedded teacher, or, for the paper's teachers, from `hf.known_configs` (offline).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from boomerang_jax.distill.config import RunConfig
from boomerang_jax.distill.loop import flops_per_token
from boomerang_jax.distill.loss import LossConfig
from boomerang_jax.distill.optim import TrainConfig, make_optimizer, opt_state_shardings
from boomerang_jax.hf.gguf import default_teacher_path, read_gguf
from boomerang_jax.hf.known_configs import known_config
from boomerang_jax.hf.load import EMBEDDED_TEACHER
from boomerang_jax.infra import parallel, storage
from boomerang_jax.infra.topology import GIB, Topology, parse_topology
from boomerang_jax.models import sharding
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import param_shapes
from boomerang_jax.surgery import LayerPlan, count_params

USABLE_HBM = 0.90  # leave ~10% for XLA's scratch, fragmentation and the runtime
DEFAULT_MFU = 0.40  # the MFU the guide's time estimates assume


class PlanningError(ValueError):
    """A run that cannot be planned as asked (batch does not split over the mesh, unknown teacher, ...)."""


# ------------------------------------------------------------------------------------------ shapes
def model_config_for(spec: str) -> ModelConfig:
    """A model's config without its weights: embedded teacher / .gguf (metadata), HF dir or gs:// dir
    (config.json), a paper teacher's hub id (built-in table), or another hub id (downloads config.json)."""
    spec = str(spec)
    if spec == EMBEDDED_TEACHER or spec.endswith(".gguf"):
        return ModelConfig.from_hf(read_gguf(default_teacher_path() if spec == EMBEDDED_TEACHER else spec).hf_config,
                                   source=spec)
    path = storage.join(spec, "config.json")
    if storage.is_remote(spec) or storage.exists(spec):
        return ModelConfig.from_hf(json.loads(storage.read_text(path)), source=path)
    known = known_config(spec)
    if known is not None:
        return ModelConfig.from_hf(known, source=f"{spec} (built-in config)")
    try:
        from huggingface_hub import hf_hub_download

        return ModelConfig.from_file(hf_hub_download(spec, "config.json"))
    except Exception as e:  # offline, gated, unknown
        raise PlanningError(f"{spec}: not a local/gs:// model directory, not a built-in paper teacher, and its "
                            f"config.json could not be fetched from the hub ({e})") from None


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What memory and FLOPs depend on: both models, the plan, precision/remat, batch and sequence length."""

    teacher: ModelConfig
    student: ModelConfig
    plan: LayerPlan
    train: TrainConfig
    loss: LossConfig
    global_batch: int
    seq_len: int

    @property
    def tokens(self) -> int:
        """Tokens seen by the whole run."""
        return self.global_batch * self.seq_len * self.train.total_steps


def run_shape(cfg: RunConfig) -> RunShape:
    """The RunShape of a run config (distill/config.py), reading model configs only."""
    teacher = model_config_for(cfg.teacher)
    plan = cfg.layer_plan(teacher.num_layers)
    student = model_config_for(cfg.student) if cfg.student else teacher.replace(num_layers=plan.num_student_layers)
    data = cfg.data.train
    return RunShape(teacher, student, plan, cfg.train, cfg.loss, int(data.get("batch_size", 8)),
                    int(data.get("seq_len", 2048)))


# ------------------------------------------------------------------------------------------ memory
@functools.lru_cache(maxsize=64)
def _param_shapes(config: ModelConfig, dtype: str) -> Any:
    return param_shapes(config, jnp.dtype(dtype))


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    """A device-less mesh of the given axis sizes (shardings and shard shapes work on it)."""
    return AbstractMesh(tuple(int(sizes[a]) for a in parallel.AXES), parallel.AXES,
                        axis_types=(AxisType.Auto,) * len(parallel.AXES))


def per_device_bytes(shapes: Any, shardings: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs placed with these NamedShardings."""
    total = 0
    for x, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding)),
                     strict=True):
        total += math.prod(sh.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    return int(total)


def state_bytes(shape: RunShape, sizes: Mapping[str, int]) -> dict[str, int]:
    """Exact per-device bytes of the student params, optimizer state and teacher params on a mesh of `sizes`,
    using the train step's own partition rules and optimizer-state shardings."""
    mesh = abstract_mesh(sizes)
    s_shapes = _param_shapes(shape.student, shape.train.param_dtype)
    t_shapes = _param_shapes(shape.teacher, shape.train.teacher_dtype)
    named = lambda specs: jax.tree.map(lambda p: NamedSharding(mesh, p), specs,  # noqa: E731
                                       is_leaf=lambda p: isinstance(p, P))
    s_sh = named(sharding.param_specs(s_shapes, shape.student, dict(sizes)))
    t_sh = named(sharding.param_specs(t_shapes, shape.teacher, dict(sizes)))
    opt_shapes = jax.eval_shape(make_optimizer(shape.train).init, s_shapes)
    opt_sh = opt_state_shardings(opt_shapes, s_shapes, s_sh, mesh)
    return {"params": per_device_bytes(s_shapes, s_sh), "opt_state": per_device_bytes(opt_shapes, opt_sh),
            "teacher": per_device_bytes(t_shapes, t_sh), "step": 4}


def _layer_bytes(config: ModelConfig, dtype: Any, sizes: Mapping[str, int]) -> int:
    """Bytes of one layer's weights after the fsdp all-gather (still split over tensor)."""
    shapes = _param_shapes(config.replace(num_layers=1), dtype)["layers"]
    specs = sharding.param_specs({"layers": shapes}, config, dict(sizes))["layers"]
    total = 0
    for x, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda p: isinstance(p, P))):
        n = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        total += n // (sizes["tensor"] if "tensor" in tuple(spec) else 1)
    return total


def activation_parts(shape: RunShape, sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """Estimated per-device bytes of everything that scales with the batch, for one micro-batch in flight.

    Model: the student keeps, per layer, what its remat policy saves (`full`: the layer input; `none`: every
    intermediate incl. the [heads, T, T] attention scores; `dots`: the matmul outputs); one layer's working set
    lives twice during its backward; aligned hidden states of both models are kept for the cosine loss; the
    loss holds ~5 float32 [rows, chunk, vocab] buffers (student/teacher logits, softmaxes, gradient); the
    whole step's batch sits on the device.
    """
    s, tr = shape.student, shape.train
    shards = sizes["data"] * sizes["fsdp"]
    tensor = sizes["tensor"]
    micro = shape.global_batch // tr.micro_batches
    if shape.global_batch % tr.micro_batches or micro % shards:
        raise PlanningError(f"global batch {shape.global_batch} in {tr.micro_batches} micro-batches does not split "
                            f"over data x fsdp = {shards} devices (mesh {dict(sizes)}); change train.micro_batches "
                            "or data.train.batch_size")
    rows, seq = micro // shards, shape.seq_len
    cb, f32 = jnp.dtype(tr.compute_dtype).itemsize, 4

    def split(n: int) -> float:
        return n / tensor if n % tensor == 0 else n

    def layer_io(c: ModelConfig) -> float:
        return rows * seq * c.hidden_size * cb

    def layer_work(c: ModelConfig) -> float:
        qkv = split((c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
        mlp = split((2 if c.gated_mlp else 1) * c.intermediate_size)
        scores = rows * split(c.num_heads) * seq * seq * (f32 + cb)
        return rows * seq * (4 * c.hidden_size + qkv + split(c.num_heads * c.head_dim) + 2 * mlp) * cb + scores

    def dots_saved(c: ModelConfig) -> float:
        qkv = split((c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
        mlp = split((2 if c.gated_mlp else 1) * c.intermediate_size)
        return rows * seq * (qkv + 2 * c.hidden_size + mlp) * cb + rows * split(c.num_heads) * seq * seq * f32

    saved = {"full": layer_io, "dots_no_batch": layer_io, "none": lambda c: layer_io(c) + layer_work(c),
             "dots": lambda c: layer_io(c) + dots_saved(c)}[tr.remat]
    pairs = len(shape.plan.aligned_pairs())
    chunk = min(shape.loss.chunk, seq)
    return [
        (f"student layers saved for backward (remat {tr.remat})", int(s.num_layers * saved(s))),
        ("one layer's working set, forward + backward", int(2 * layer_work(s))),
        ("aligned hidden states, student + teacher", int(2 * pairs * layer_io(s))),
        ("loss chunk: logits/softmax/grad, float32", int(5 * rows * chunk * split(s.vocab_size) * f32)),
        ("the step's batch (5 int32 arrays)", int(5 * (shape.global_batch // shards) * seq * 4)),
    ]


def gathered_parts(shape: RunShape, sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """Estimated per-device bytes of weights gathered over fsdp where used: the two embeddings (gathered for the
    token lookup) and about two layers of each model in flight (current + prefetched)."""
    if sizes["fsdp"] == 1:
        return []
    s, t, tr = shape.student, shape.teacher, shape.train
    tensor = sizes["tensor"]

    def emb(c: ModelConfig, dtype: str) -> int:
        n = c.vocab_size * c.hidden_size * jnp.dtype(dtype).itemsize
        return n // tensor if c.vocab_size % tensor == 0 else n

    layers = 2 * _layer_bytes(s, tr.param_dtype, sizes) + 2 * _layer_bytes(t, tr.teacher_dtype, sizes)
    return [("embeddings gathered over fsdp (student + teacher)", emb(s, tr.param_dtype) + emb(t, tr.teacher_dtype)),
            ("~2 layers per model gathered over fsdp", layers)]


@dataclasses.dataclass
class MemoryEstimate:
    """Per-device memory of one run on one topology and mesh."""

    topology: Topology
    mesh: dict[str, int]
    rows_per_device: int  # rows of one micro-batch on each device
    exact: list[tuple[str, int]]
    estimated: list[tuple[str, int]]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.exact + self.estimated)

    @property
    def usable(self) -> int:
        return int(self.topology.hbm_bytes * USABLE_HBM)

    @property
    def fits(self) -> bool | None:
        return None if not self.topology.hbm_bytes else self.total <= self.usable

    def table(self) -> str:
        width = max(len(n) for n, _ in self.exact + self.estimated) + 2
        lines = [f"{self.topology.describe()}; mesh " + ", ".join(f"{k}={v}" for k, v in self.mesh.items())
                 + f"; {self.rows_per_device} row(s) per device per micro-batch",
                 f"  {'per device':<{width}}{'GiB':>9}"]
        for label, parts in (("exact", self.exact), ("estimated", self.estimated)):
            for name, b in parts:
                lines.append(f"  {name:<{width}}{b / GIB:9.3f}  {label}")
        verdict = ("unknown HBM" if self.fits is None else
                   f"of {self.topology.hbm_bytes / GIB:.0f} GiB HBM ({100 * self.total / self.topology.hbm_bytes:.0f}%)"
                   f" -> {'fits' if self.fits else 'DOES NOT FIT'} (limit {USABLE_HBM:.0%})")
        lines.append(f"  {'total':<{width}}{self.total / GIB:9.3f}  {verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"topology": self.topology.name, "mesh": self.mesh, "rows_per_device": self.rows_per_device,
                "exact": dict(self.exact), "estimated": dict(self.estimated), "total": self.total,
                "hbm": self.topology.hbm_bytes, "fits": self.fits}


def estimate_memory(shape: RunShape, topology: Topology | str, mesh: Any) -> MemoryEstimate:
    """Per-device memory of `shape` on `topology` with `mesh` (a mesh config; -1 fills the topology's devices)."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    data, fsdp, tensor = parallel.MeshConfig.parse(mesh).sizes(topo.chips)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    state = state_bytes(shape, sizes)
    grads = state["params"] * (2 if shape.train.micro_batches > 1 else 1)
    exact = [(f"student params ({shape.train.param_dtype})", state["params"]),
             (f"AdamW state ({shape.train.param_dtype} moments)", state["opt_state"] + state["step"]),
             (f"frozen teacher ({shape.train.teacher_dtype})", state["teacher"])]
    estimated = [(f"gradients ({'accumulator + micro-batch' if shape.train.micro_batches > 1 else 'one copy'})",
                  grads)]
    estimated += gathered_parts(shape, sizes) + activation_parts(shape, sizes)
    rows = shape.global_batch // shape.train.micro_batches // (data * fsdp)
    return MemoryEstimate(topo, sizes, rows, exact, estimated)


# ------------------------------------------------------------------------------------------- FLOPs
def run_flops(shape: RunShape) -> dict[str, float]:
    """FLOPs of the whole run, two conventions.

    `ours`: what the training loop's MFU uses (distill/loop.py `flops_per_token`): matmul FLOPs incl. the LM
    heads and non-causal attention; student forward + backward (3x) plus teacher forward (1x).
    `6ND+2ND`: the common rule of thumb, 6 x student params + 2 x teacher params per token (all params, no
    attention term), which is closest to how papers usually quote training compute.
    """
    n_s, n_t = count_params(shape.student).total, count_params(shape.teacher).total
    per_token = (flops_per_token(shape.student, shape.seq_len, backward=True)
                 + flops_per_token(shape.teacher, shape.seq_len, backward=False))
    return {"tokens": float(shape.tokens), "ours": per_token * shape.tokens,
            "6ND+2ND": (6 * n_s + 2 * n_t) * shape.tokens}


def accelerator_hours(flops: float, topology: Topology | str, mfu: float = DEFAULT_MFU) -> dict[str, float]:
    """Chip-hours and wall-clock hours of `flops` on `topology` at model FLOPs utilisation `mfu`."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    seconds_all_chips = flops / (topo.peak_flops * mfu)
    return {"chip_hours": seconds_all_chips * topo.chips / 3600, "wall_hours": seconds_all_chips / 3600}


def describe_run(shape: RunShape) -> str:
    ps, pt = count_params(shape.student).total, count_params(shape.teacher).total
    tr = shape.train
    return (f"teacher {shape.teacher.model_type} {shape.teacher.num_layers} layers {pt / 1e9:.2f}B -> student "
            f"{shape.student.num_layers} layers {ps / 1e9:.2f}B; {tr.total_steps} steps x {shape.global_batch} x "
            f"{shape.seq_len} tokens = {shape.tokens / 1e9:.2f}B tokens; {tr.micro_batches} micro-batch(es), "
            f"compute {tr.compute_dtype}, remat {tr.remat}, loss chunk {shape.loss.chunk}")

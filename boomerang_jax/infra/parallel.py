"""Device mesh, batch layout and multi-host helpers for the sharded train step.

Mesh axes are ``("data", "fsdp", "tensor")``. The batch dimension is sharded over ``("data", "fsdp")``; where each
parameter goes is decided by `boomerang_jax.models.sharding`. Hosts each feed the rows of their own devices
(`global_batch`); `initialize_distributed` starts JAX's multi-host runtime on a pod slice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both: fsdp groups also see different data

Params = dict[str, Any]


class MeshError(ValueError):
    """A mesh that does not fit the devices, or a batch/parameter that does not fit the mesh."""


# ------------------------------------------------------------------------------------------------- mesh
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; at most one may be -1, meaning "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, spec: str | Mapping[str, int] | MeshConfig) -> MeshConfig:
        """From 'data=2,fsdp=-1,tensor=1' (any subset; missing axes keep their defaults) or a mapping."""
        if isinstance(spec, MeshConfig):
            return spec
        if isinstance(spec, Mapping):
            items = dict(spec)
        else:
            items = {}
            for part in filter(None, (p.strip() for p in spec.split(","))):
                key, sep, value = part.partition("=")
                try:
                    items[key.strip()] = int(value)
                except ValueError:
                    raise MeshError(f"mesh spec {spec!r}: cannot read {part!r}; expected e.g. "
                                    "'data=2,fsdp=-1,tensor=1'") from None
                if not sep:
                    raise MeshError(f"mesh spec {spec!r}: cannot read {part!r}")
        unknown = set(items) - set(AXES)
        if unknown:
            raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(AXES)}")
        return cls(**{k: int(v) for k, v in items.items()})

    def sizes(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete (data, fsdp, tensor) sizes for `num_devices`, filling the -1 axis."""
        sizes = [self.data, self.fsdp, self.tensor]
        desc = ", ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
        if any(s == 0 or s < -1 for s in sizes):
            raise MeshError(f"mesh sizes must be positive or -1 (fill), got {desc}")
        fill = [i for i, s in enumerate(sizes) if s == -1]
        if len(fill) > 1:
            raise MeshError(f"at most one mesh axis may be -1 (fill), got {desc}")
        fixed = math.prod(s for s in sizes if s != -1)
        if fill:
            if num_devices % fixed:
                raise MeshError(f"mesh {desc}: the fixed axes multiply to {fixed}, which does not divide the "
                                f"{num_devices} available devices")
            sizes[fill[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise MeshError(f"mesh {desc} needs {fixed} devices, but {num_devices} are available")
        return tuple(sizes)  # type: ignore[return-value]


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices `devices` span (devices without a `slice_index`, e.g. CPUs and GPUs, count as one)."""
    return len({getattr(d, "slice_index", None) or 0 for d in devices})


def make_mesh(config: MeshConfig | str | Mapping[str, int] = MeshConfig(),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes).

    Within a slice the device order follows the physical interconnect (`jax.make_mesh`). Devices of several
    TPU slices (multi-slice, joined by the data-center network) get a hybrid ICI x DCN mesh: `data` is split
    over the slices first, so only the data-parallel gradient reduction crosses slices; `mesh.data` must then
    be a multiple of the number of slices. Axis types are Auto: shardings are given explicitly at jit
    boundaries and propagated inside.
    """
    config = MeshConfig.parse(config)
    devices = list(jax.devices() if devices is None else devices)
    shape = config.sizes(len(devices))
    slices = num_slices(devices)
    if slices == 1:
        grid = _device_grid(mesh_utils.create_device_mesh, shape, devices)
    else:
        data, fsdp, tensor = shape
        if data % slices:
            raise MeshError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor} over {slices} slices: mesh.data must be "
                            f"a multiple of the number of slices (data is split over slices first), e.g. "
                            f"mesh.data={slices} with fsdp=-1")
        def hybrid(ici: Sequence[int], devs: Sequence[jax.Device], **kw: Any) -> np.ndarray:
            return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devs, **kw)

        grid = _device_grid(hybrid, (data // slices, fsdp, tensor), devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _device_grid(create: Any, shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """`create(shape, devices)` in the interconnect's order; where the logical shape cannot be laid on whole
    physical axes (e.g. fsdp=32 x tensor=2 on a 4x4x4 torus), physical axes are split rather than failing."""
    try:
        return create(tuple(shape), devices)
    except (NotImplementedError, ValueError, AssertionError):
        return create(tuple(shape), devices, allow_split_physical_axes=True)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    """{axis: size} of a mesh (missing axes count as 1)."""
    return {a: int(mesh.shape.get(a, 1)) for a in AXES}


def batch_spec() -> P:
    """Batch arrays [B, T]: batch over ("data", "fsdp"), sequence unsharded."""
    return P(BATCH_AXES, None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (data x fsdp)."""
    s = mesh_shape(mesh)
    return s["data"] * s["fsdp"]


def check_batch_size(batch_size: int, mesh: Mesh, micro_batches: int = 1) -> None:
    """Raise MeshError unless every micro-batch splits evenly over data x fsdp."""
    n = batch_shards(mesh)
    if micro_batches < 1 or batch_size % micro_batches:
        raise MeshError(f"global batch {batch_size} is not divisible into {micro_batches} micro-batches")
    if (batch_size // micro_batches) % n:
        raise MeshError(f"micro-batch size {batch_size // micro_batches} (global batch {batch_size} / "
                        f"{micro_batches} micro-batches) is not divisible by data x fsdp = {n} "
                        f"(mesh {mesh_shape(mesh)})")


# ------------------------------------------------------------------------------------ placing arrays
def put(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    """Place a tree of host (numpy) or device arrays onto `shardings` (a matching tree or one sharding).

    Works on one or many processes: host values must then be identical on every process (each process
    copies only the slices its own devices hold). `dtype`, if given, casts floating leaves. The result never
    aliases the input, so it may be donated.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    leaves, treedef = jax.tree.flatten(tree)
    shards = treedef.flatten_up_to(shardings)
    out: list[Any] = [None] * len(leaves)
    to_cast: list[int] = []
    for i, (x, sharding) in enumerate(zip(leaves, shards)):
        target = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
            # Always a fresh copy: the result may be donated to the train step without deleting `x`.
            out[i] = jax.device_put(x, sharding, may_alias=False)
            if out[i].dtype != target:
                to_cast.append(i)
        else:
            host = np.asarray(x)
            host = host if host.dtype == target else host.astype(target)
            out[i] = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
    if to_cast:  # one compiled cast for all device leaves
        cast = jax.jit(lambda xs: [x.astype(dtype) for x in xs], out_shardings=[shards[i] for i in to_cast])
        for i, y in zip(to_cast, cast([out[i] for i in to_cast])):
            out[i] = y
    return jax.tree.unflatten(treedef, out)


def process_row_blocks(size: int, mesh: Mesh, process_index: int | None = None) -> list[slice]:
    """The row blocks of a global batch of `size` rows that process `process_index` (default: this one) holds,
    in global order: one block per distinct device shard of its devices (devices that replicate a shard, e.g.
    over `tensor`, count once).

    Right for any device order: on a TPU slice the mesh follows the physical torus, so a host's rows are
    usually not contiguous (e.g. v5p-128: the first mesh devices belong to processes 0, 4, 8, 12, 0, ...).
    Works on meshes of devices this program cannot address too (ahead-of-time topologies).
    """
    process = jax.process_index() if process_index is None else process_index
    index_map = batch_sharding(mesh).devices_indices_map((size, 1))
    rows = sorted({(idx[0].start or 0, size if idx[0].stop is None else idx[0].stop)
                   for dev, idx in index_map.items() if dev.process_index == process})
    if not rows:
        raise MeshError(f"process {process} holds no device of this mesh")
    return [slice(a, b) for a, b in rows]


def process_batch_indices(size: int, mesh: Mesh) -> np.ndarray:
    """Indices of the global rows this process loads, in the order its local batch must hold them (what
    `global_batch` expects): the rows of `process_row_blocks`, concatenated."""
    return np.concatenate([np.arange(s.start, s.stop) for s in process_row_blocks(size, mesh)])


def process_batch_rows(size: int, mesh: Mesh) -> slice:
    """This process's rows of a global batch as one slice, when they are contiguous (single host, or a mesh
    ordered by process); otherwise MeshError (use `process_batch_indices`, which works for any order)."""
    blocks = process_row_blocks(size, mesh)
    if any(a.stop != b.start for a, b in zip(blocks, blocks[1:])):
        raise MeshError(f"this process's batch rows {[(s.start, s.stop) for s in blocks]} are not contiguous; "
                        "use process_batch_indices")
    return slice(blocks[0].start, blocks[-1].stop)


def _data_groups(mesh: Mesh) -> list[tuple[int, ...]]:
    """The distinct row-shard sets of all processes (over data x fsdp one-row shards), sorted by first row.
    Processes with equal sets read the same data; different sets must not overlap."""
    n = batch_shards(mesh)
    sets = {tuple(r for s in process_row_blocks(n, mesh, p) for r in range(s.start, s.stop))
            for p in sorted({d.process_index for d in mesh.devices.flat})}
    groups = sorted(sets)
    seen: set[int] = set()
    for g in groups:
        if seen & set(g):
            raise MeshError(f"processes hold partly overlapping batch shards {groups}: a batch replicated across "
                            "hosts must be replicated whole (put the axis that spans hosts on data or fsdp)")
        seen |= set(g)
    return groups


def global_batch_size(local_rows: int, mesh: Mesh) -> int:
    """The global batch size when this process holds `local_rows` rows (processes may share rows when the
    batch is replicated across them, e.g. a tensor axis that spans hosts)."""
    n = batch_shards(mesh)
    held = sum(s.stop - s.start for s in process_row_blocks(n, mesh))  # of n one-row shards, this process holds
    if local_rows % held:
        raise MeshError(f"{local_rows} local rows do not split over this process's {held} batch shards")
    return local_rows // held * n


def process_data_shard(mesh: Mesh) -> tuple[int, int]:
    """(shard index, number of shards) this process should read from the data, e.g. for a per-host iterator.

    Use this rather than (process_index, process_count): processes whose devices hold the same batch rows
    (a batch replicated across hosts) must read the same data shard.
    """
    groups = _data_groups(mesh)
    n = batch_shards(mesh)
    mine = tuple(r for s in process_row_blocks(n, mesh) for r in range(s.start, s.stop))
    return groups.index(mine), len(groups)


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh, size: int | None = None) -> dict[str, jax.Array]:
    """Each process's local rows -> one global batch of `size` rows (default: from `global_batch_size`) sharded
    over ("data", "fsdp"). Local row i goes to global row `process_batch_indices(size, mesh)[i]`, so any device
    order works; on one process the local batch is the global batch."""
    sharding = batch_sharding(mesh)
    layouts: dict[int, tuple[int, dict[int, int]]] = {}  # global rows -> (local rows, local start of each block)
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        gb = size or global_batch_size(v.shape[0], mesh)
        if gb not in layouts:  # the same for every array of the batch: computed once per call
            offset, start = 0, {}
            for s in process_row_blocks(gb, mesh):  # where each of this process's blocks starts locally
                start[s.start] = offset
                offset += s.stop - s.start
            layouts[gb] = (offset, start)
        held, start = layouts[gb]
        if v.shape[0] != held:
            raise MeshError(f"batch {k!r}: this process holds {held} rows of the global batch of {gb}, but its "
                            f"local batch has {v.shape[0]}")
        shape = (gb,) + v.shape[1:]
        arrays = []
        for dev, idx in sharding.addressable_devices_indices_map(shape).items():
            a = idx[0].start or 0
            b = gb if idx[0].stop is None else idx[0].stop
            arrays.append(jax.device_put(v[start[a]:start[a] + b - a], dev))
        out[k] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
    return out


def to_host(tree: Any) -> Any:
    """Full numpy copies of (possibly multi-process sharded) arrays, on every process."""
    if jax.process_count() == 1:  # copies: a zero-copy view would pin the buffer and block donation on CPU
        return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes each device holds for a tree of arrays (to check that something is sharded, not replicated)."""
    out: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out


# -------------------------------------------------------------------------------------------- multi-host
_CLUSTER_HINTS = ("JAX_COORDINATOR_ADDRESS",)


def _on_cluster() -> bool:
    """Whether the environment looks like a multi-process launch that jax.distributed can auto-detect."""
    env = os.environ
    if any(env.get(k) for k in _CLUSTER_HINTS):
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in re.split(r"[,\s]+", hosts) if h]) > 1:
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        try:
            if int(env.get(key, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    force: bool = False,
    local_device_ids: Sequence[int] | None = None,
    timeout_s: int = 300,
) -> bool:
    """Start jax.distributed when running multi-process; return whether it was started.

    Explicit arguments (e.g. a local coordinator '127.0.0.1:PORT' for tests) always start it; otherwise it
    starts when the environment is a multi-host TPU pod, SLURM/Open MPI job or sets JAX_COORDINATOR_ADDRESS,
    or when `force` is set (auto-detection by JAX). A single host does nothing. Call before any JAX work.
    On CPU, cross-process collectives use gloo.
    """
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if not (explicit or force or _on_cluster()):
        return False
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise MeshError("an explicit distributed start needs coordinator_address, num_processes and process_id "
                        f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
    return True


def is_main_process() -> bool:
    """True on process 0 only: the one that writes logs, checkpoints' metadata and exports."""
    return jax.process_index() == 0


def main_print(*args: Any, **kwargs: Any) -> None:
    """print() on process 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on `host` (for a local coordinator in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]

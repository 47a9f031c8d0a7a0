"""Where every parameter lives on the mesh: partition rules by dimension name (used by the train step, planning
and the ahead-of-time compile).

Parameters are replicated over ``data`` (pure data parallelism), sharded over ``fsdp`` on one large dimension
(ZeRO-3 style: each weight lives once per fsdp group) and over ``tensor`` on attention heads, the MLP hidden
dimension and the vocabulary (Megatron style). The stacked layer axis of ``layers/...`` is never sharded.
Partition rule, per parameter (see ``LOGICAL_AXES`` for every parameter's dimension names):

1. ``tensor`` (if its size > 1) goes to the dimension named ``q_heads``/``kv_heads`` (only when the number of
   query/key-value heads is divisible by it, so no head is split), ``mlp`` or ``vocab`` (when that size is
   divisible by it). A parameter has at most one such dimension.
2. ``fsdp`` (if its size > 1) goes to the largest remaining non-layer dimension whose size it divides; if none
   divides, the parameter is replicated over ``fsdp``.
3. Every other dimension, and any dimension a rule skipped because it does not divide, is replicated.

So tiny models (odd head counts, 3-wide norms) still run on any mesh, just with less sharding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from boomerang_jax.infra.parallel import AXES, MeshError, mesh_shape
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params

# ----------------------------------------------------------------------------------- partition rules
# Dimension names of every parameter in docs/PARAMS.md ("layers" = the stacked layer axis, never sharded).
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed/embedding": ("vocab", "embed"),
    "lm_head/kernel": ("embed", "vocab"),
    "final_norm/scale": ("embed",),
    "final_norm/bias": ("embed",),
    "layers/attn_norm/scale": ("layers", "embed"),
    "layers/attn_norm/bias": ("layers", "embed"),
    "layers/mlp_norm/scale": ("layers", "embed"),
    "layers/mlp_norm/bias": ("layers", "embed"),
    "layers/attn/q_proj/kernel": ("layers", "embed", "q_heads"),
    "layers/attn/q_proj/bias": ("layers", "q_heads"),
    "layers/attn/k_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/attn/k_proj/bias": ("layers", "kv_heads"),
    "layers/attn/v_proj/kernel": ("layers", "embed", "kv_heads"),
    "layers/attn/v_proj/bias": ("layers", "kv_heads"),
    "layers/attn/o_proj/kernel": ("layers", "q_heads", "embed"),
    "layers/attn/o_proj/bias": ("layers", "embed"),
    "layers/attn/q_norm/scale": ("layers", "head_dim"),
    "layers/attn/k_norm/scale": ("layers", "head_dim"),
    "layers/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
    "layers/mlp/gate_proj/bias": ("layers", "mlp"),
    "layers/mlp/up_proj/kernel": ("layers", "embed", "mlp"),
    "layers/mlp/up_proj/bias": ("layers", "mlp"),
    "layers/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
    "layers/mlp/down_proj/bias": ("layers", "embed"),
}
TENSOR_DIMS = ("q_heads", "kv_heads", "mlp", "vocab")


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def _tensor_divides(name: str, size: int, t: int, config: ModelConfig) -> bool:
    if name == "q_heads":
        return config.num_heads % t == 0
    if name == "kv_heads":
        return config.num_kv_heads % t == 0
    return size % t == 0


def partition_spec(path: str, shape: Sequence[int], config: ModelConfig, mesh: Mesh | Mapping[str, int]) -> P:
    """PartitionSpec of the parameter at `path` ('layers/attn/q_proj/kernel') with `shape` (module docstring)."""
    names = LOGICAL_AXES.get(path)
    if names is None:
        raise MeshError(f"no partition rule for parameter {path!r} {tuple(shape)}; add it to LOGICAL_AXES")
    if len(names) != len(shape):
        raise MeshError(f"parameter {path!r} has shape {tuple(shape)} but its rule names {len(names)} dims {names}")
    sizes = mesh_shape(mesh) if isinstance(mesh, Mesh) else {a: int(mesh.get(a, 1)) for a in AXES}
    spec: list[str | None] = [None] * len(shape)
    t, f = sizes["tensor"], sizes["fsdp"]
    if t > 1:
        for i, name in enumerate(names):
            if name in TENSOR_DIMS and _tensor_divides(name, shape[i], t, config):
                spec[i] = "tensor"
                break
    if f > 1:
        free = [i for i, name in enumerate(names) if name != "layers" and spec[i] is None and shape[i] % f == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return P(*spec)


def without_fsdp(spec: P) -> P:
    """The spec with its "fsdp" sharding dropped: the layout a weight is gathered to where it is used."""
    return P(*(None if s == "fsdp" else s for s in spec))


def param_specs(params: Params, config: ModelConfig, mesh: Mesh | Mapping[str, int]) -> Params:
    """PartitionSpecs for every leaf of a parameter tree (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: partition_spec(_path_str(path), x.shape, config, mesh), params)


def param_shardings(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """NamedShardings for every leaf of a parameter tree."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, config, mesh),
                        is_leaf=lambda x: isinstance(x, P))

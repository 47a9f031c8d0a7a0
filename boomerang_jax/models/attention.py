"""The one attention entry point: `xla` (einsum over an explicit mask, the exact reference) or `splash` (Pallas TPU
splash attention with packed segment ids), chosen by `ModelConfig.attention`; `auto` (the default) is splash on TPU,
xla elsewhere: on a CPU or GPU it is exactly the xla path.

Both compute softmax(q k^T / sqrt(head_dim)) v, causal and within a segment; padding (segment id 0) is one more
segment, so every query row sees at least itself (the diagonal) and no softmax is empty. Splash never materialises
the [B, H, T, T] scores: it tiles queries and keys in blocks (`block_sizes`), skips the blocks above the diagonal
and keeps the log-sum-exp for its own backward. Under a mesh (`jax.set_mesh`) the kernel runs per device under
`shard_map`, rows over ("data", "fsdp") and heads over "tensor"; grouped-query attention is the kernel's own
grouping (no repeated keys/values). `splash-interpret` runs the same kernel in Pallas interpret mode (any backend;
what the CPU tests compare against xla).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from boomerang_jax.infra.parallel import BATCH_AXES
from boomerang_jax.models.config import ATTENTION_IMPLEMENTATIONS

# Candidate query/key block lengths, largest first; T must be a multiple of one. The kernel's key-block compute
# width must be a multiple of the TPU lane count (128), so 128 is the smallest.
SPLASH_BLOCKS = (512, 256, 128)


class AttentionError(ValueError):
    """An attention implementation that cannot run these shapes (e.g. splash with T not a multiple of 128)."""


def cache_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """[B, 1, T, S] boolean for decoding with a key/value cache of S slots: a query at position p sees slots <= p."""
    return (jnp.arange(cache_len)[None, None, :] <= positions[:, :, None])[:, None]


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, T, T] boolean: causal and within the same segment (padding, id 0, only sees padding)."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


# ------------------------------------------------------------------------------------------- choice
def on_tpu(devices: Any) -> bool:
    """Whether `devices` (a Mesh, or a sequence of devices: also the TPU devices libtpu describes for an
    ahead-of-time compile on a CPU host) are all TPUs: where `auto` means splash."""
    devices = list(devices.devices.flat) if isinstance(devices, jax.sharding.Mesh) else list(devices)
    return bool(devices) and all(getattr(d, "platform", None) == "tpu" for d in devices)


def _splash_runs_here() -> bool:
    """Whether `auto` may pick splash: the context mesh (`jax.set_mesh`; also an ahead-of-time TPU mesh on a CPU
    host) is of TPUs, or there is no context mesh and the default backend is a single TPU. Several TPUs without a
    context mesh get xla: the kernel is one custom call that the SPMD partitioner cannot split."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        return getattr(mesh.abstract_device, "platform", None) == "tpu"
    return jax.default_backend() == "tpu" and jax.device_count() == 1


def resolve_on(devices: Any, implementation: str, seq_len: int, head_dim: int) -> str:
    """`resolve` as it runs under a mesh of `devices` (see `on_tpu`), without tracing anything: `auto` is splash
    when they are TPUs and T fits a block, else xla. What `boomerang compile` reports for a TPU topology."""
    if implementation == "auto" and not on_tpu(devices):
        return "xla"
    if implementation != "auto":
        return resolve(implementation, seq_len, head_dim)
    try:
        splash_block(seq_len, head_dim)
    except AttentionError:
        return "xla"
    return "splash"


def splash_block(seq_len: int, head_dim: int) -> int:
    """The query/key block length for splash at T = seq_len: the largest of SPLASH_BLOCKS dividing T (at most 256
    for head dims over 128, to stay within VMEM); an AttentionError naming T and the block when none divides."""
    candidates = [b for b in SPLASH_BLOCKS if head_dim <= 128 or b <= 256]
    for block in candidates:
        if seq_len % block == 0:
            return block
    raise AttentionError(
        f"splash attention needs the sequence length to be a multiple of a {candidates[-1]}-token block "
        f"(blocks tried: {candidates}); got T={seq_len}. Pad rows to a multiple of {candidates[-1]} "
        "or use attention=xla (attention=auto falls back to xla for such T)")


def resolve(implementation: str, seq_len: int, head_dim: int) -> str:
    """The implementation that runs: `xla`, `splash` or `splash-interpret` (`auto`: splash on TPU when T fits a
    block and the kernel can be placed per device, see `_splash_runs_here`; else xla)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise AttentionError(f"unknown attention implementation {implementation!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if implementation == "auto":
        if not _splash_runs_here():
            return "xla"
        try:
            splash_block(seq_len, head_dim)
        except AttentionError:
            return "xla"
        return "splash"
    if implementation.startswith("splash"):
        splash_block(seq_len, head_dim)  # a clear error now rather than deep inside the kernel
    return implementation


# ---------------------------------------------------------------------------------------- entry point
def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str, dtype: Any,
           segment_ids: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Attention output [B, T, H, hd] for q [B, T, H, hd] and k, v [B, S, Hkv, hd] (H a multiple of Hkv).

    `implementation` is a resolved name (see `resolve`). xla needs `mask` ([B, 1, T, S], e.g. `attention_mask`
    or `cache_mask`); splash needs `segment_ids` [B, T] (self-attention, S = T) and builds its causal mask itself."""
    if implementation == "xla":
        if mask is None:
            mask = attention_mask(segment_ids)
        return xla_attention(q, k, v, mask, dtype)
    if implementation in ("splash", "splash-interpret"):
        if segment_ids is None:
            raise AttentionError("splash attention needs segment ids (self-attention over packed rows)")
        return splash_attention(q, k, v, segment_ids, dtype, interpret=implementation == "splash-interpret")
    raise AttentionError(f"attention implementation {implementation!r} is not resolved; call resolve() first")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
    """The reference: float32 scores over an explicit [B, 1, T, S] mask, softmax in float32, output in `dtype`."""
    b, t, h, hd = q.shape
    hkv = k.shape[2]
    groups = h // hkv
    q = q.reshape(b, t, hkv, groups, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * (hd**-0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype).reshape(b, t, h, hd)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, dtype: Any, *,
                     interpret: bool = False, block: int | None = None) -> jax.Array:
    """Splash attention [B, T, H, hd] (causal, within segments); per device under shard_map when a mesh is set.
    `block` overrides the block length of `splash_block` (tests use it to get several blocks at small T)."""
    b, t, h, hd = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise AttentionError(f"{h} query heads is not a multiple of {hkv} key/value heads")
    block = block or splash_block(t, hd)
    # [B, H, T, hd], queries pre-scaled (the kernel does not scale), all in the compute dtype
    qh = (q.astype(jnp.float32) * (hd**-0.5)).astype(dtype).transpose(0, 2, 1, 3)
    kh = k.astype(dtype).transpose(0, 2, 1, 3)
    vh = v.astype(dtype).transpose(0, 2, 1, 3)
    segment_ids = segment_ids.astype(jnp.int32)

    def local(qh: jax.Array, kh: jax.Array, vh: jax.Array, seg: jax.Array) -> jax.Array:
        kernel = _splash_kernel(qh.shape[1], t, block, interpret)
        one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))  # noqa: E731
        return jax.vmap(one)(qh, kh, vh, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = local(qh, kh, vh, segment_ids)
    else:
        sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
        rows = tuple(a for a in BATCH_AXES if a in sizes)
        row_shards = math.prod(sizes[a] for a in rows)
        row_spec = rows if rows and b % row_shards == 0 else None
        tensor = sizes.get("tensor", 1)
        head_spec = "tensor" if tensor > 1 and hkv % tensor == 0 else None  # else heads stay whole per device
        qkv = P(row_spec, head_spec, None, None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(row_spec, None)), out_specs=qkv,
                            check_vma=False)(qh, kh, vh, segment_ids)
    return out.transpose(0, 2, 1, 3)


def _splash_kernel(heads: int, seq_len: int, block: int, interpret: bool) -> Any:
    """A splash kernel for `heads` query heads of one row: causal mask, every block `block` long."""
    mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len))] * heads)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

"""One Flax transformer for the Llama, Qwen3 and GPT-NeoX families, HF-exact, layers stacked and scanned.

Parameters follow docs/PARAMS.md. Attention takes segment ids and per-segment positions so packed rows
behave exactly like separate sequences. Compute dtype is independent of the parameter dtype: weights are
cast to `dtype` where they are used; norms, softmax and RoPE tables are computed in float32 as HF does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from boomerang_jax.models.attention import attend, attention_mask, resolve
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.matmul import mixed_dot

Params = dict[str, Any]

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no remat
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass
class ModelOutput:
    """What the forward pass returns: logits (None when not asked), chosen hidden states, final normed hidden,
    and the raw output of the last layer (before the final norm; HF does not expose it)."""

    logits: jax.Array | None
    hidden_states: tuple[jax.Array, ...]
    final_hidden: jax.Array
    last_layer_output: jax.Array
    cache: tuple[jax.Array, jax.Array] | None = None  # updated key/value cache when decoding with one


jax.tree_util.register_dataclass(
    ModelOutput, data_fields=["logits", "hidden_states", "final_hidden", "last_layer_output", "cache"],
    meta_fields=[],
)


class Norm(nn.Module):
    """RMSNorm (Llama/Qwen3: scale * x/rms(x), computed in float32) or LayerNorm with bias (GPT-NeoX)."""

    kind: str
    eps: float
    dim: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        if self.kind == "rms":
            xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
            # HF: weight * hidden.to(input_dtype)
            return scale.astype(dtype) * xf.astype(dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(dtype)


class Dense(nn.Module):
    """x @ kernel (+ bias) with the kernel stored [in, out] as HF's weight transposed."""

    features: int
    use_bias: bool
    dtype: Any
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), self.param_dtype)
        y = mixed_dot(x, kernel, self.dtype)  # float32 accumulation, rounded once to `dtype` below
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, rope_dim] in float32 for integer positions [B, T] (HF rotate-half layout)."""
    inv_freq = jnp.asarray(config.inv_freq())
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x [B, T, H, hd]; the rest passes through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    half = rd // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def attention_inputs(implementation: str, segment_ids: jax.Array) -> tuple[jax.Array | None, jax.Array]:
    """What every layer's attention gets: (mask, segment ids); the [B, 1, T, T] mask is built only for xla."""
    return (attention_mask(segment_ids) if implementation == "xla" else None), segment_ids


class Attention(nn.Module):
    """Self-attention through `models.attention.attend`; `implementation` is a resolved name (xla, splash, ...)."""

    config: ModelConfig
    dtype: Any
    param_dtype: Any
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: tuple[jax.Array | None, jax.Array | None],
                 kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | None = None) -> Any:
        """Attention output; `mask` is (mask, segment ids) from `attention_inputs`. With `kv`, this layer's
        key/value cache ([B, Hkv, S, hd] each, read only), x's tokens are the ones at slots `index`.. and attend
        to the cache's slots < index and causally to each other; (output, (x's keys, x's values)) is returned,
        [B, Hkv, T, hd] in the cache's dtype, for the caller to write into the cache."""
        c = self.config
        b, t, _ = x.shape
        dense = lambda n, f, bias: Dense(f, bias, self.dtype, self.param_dtype, name=n)  # noqa: E731
        q = dense("q_proj", c.num_heads * c.head_dim, c.attention_bias)(x).reshape(b, t, c.num_heads, c.head_dim)
        k = dense("k_proj", c.num_kv_heads * c.head_dim, c.attention_bias)(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = dense("v_proj", c.num_kv_heads * c.head_dim, c.attention_bias)(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = Norm("rms", c.norm_eps, c.head_dim, self.param_dtype, name="q_norm")(q)
            k = Norm("rms", c.norm_eps, c.head_dim, self.param_dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            new_kv = tuple(a.transpose(0, 2, 1, 3).astype(kv[0].dtype) for a in (k, v))
            out = cached_attention(q, new_kv, kv, index, self.dtype)
        else:
            dense_mask, segment_ids = mask
            out = attend(q, k, v, implementation=self.implementation, dtype=self.dtype, segment_ids=segment_ids,
                         mask=dense_mask)
        out = Dense(c.hidden_size, c.attention_out_bias, self.dtype, self.param_dtype,
                    name="o_proj")(out.reshape(b, t, c.num_heads * c.head_dim))
        return out if kv is None else (out, new_kv)


def cached_attention(q: jax.Array, new: tuple[jax.Array, jax.Array], cache: tuple[jax.Array, jax.Array],
                     index: jax.Array, dtype: Any) -> jax.Array:
    """Attention [B, T, H, hd] of queries q [B, T, H, hd] at slots index..index+T-1 over a cache's slots < index
    (keys, values [B, Hkv, S, hd]) and, causally, over their own keys and values `new` ([B, Hkv, T, hd]).

    The numerics of `xla_attention` (float32 scores and softmax, probabilities in `dtype`) without writing the
    new keys into the cache first: the caller writes them once per step for all layers, so the cache is only
    read here, in a layout (heads before slots) that the two batched matmuls use as it is."""
    b, t, h, hd = q.shape
    hkv, s = cache[0].shape[1], cache[0].shape[2]
    g = h // hkv
    # rows of the score matrices: (query group, query) for each key/value head
    qh = q.reshape(b, t, hkv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, hd)
    scale = hd**-0.5
    neg = jnp.finfo(jnp.float32).min
    old = jnp.einsum("bkqd,bksd->bkqs", qh, cache[0].astype(dtype), preferred_element_type=jnp.float32) * scale
    old = jnp.where(jnp.arange(s) < index, old, neg)
    own = jnp.einsum("bkqd,bktd->bkqt", qh, new[0].astype(dtype), preferred_element_type=jnp.float32) * scale
    causal = jnp.tile(jnp.tril(jnp.ones((t, t), bool)), (g, 1))
    own = jnp.where(causal, own, neg)
    probs = jax.nn.softmax(jnp.concatenate([old, own], axis=-1), axis=-1).astype(dtype)
    out = (jnp.einsum("bkqs,bksd->bkqd", probs[..., :s], cache[1].astype(dtype), preferred_element_type=jnp.float32)
           + jnp.einsum("bkqt,bktd->bkqd", probs[..., s:], new[1].astype(dtype), preferred_element_type=jnp.float32))
    return out.astype(dtype).reshape(b, hkv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


class MLP(nn.Module):
    config: ModelConfig
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        act = _ACTIVATIONS[c.activation]
        dense = lambda n, f: Dense(f, c.mlp_bias, self.dtype, self.param_dtype, name=n)  # noqa: E731
        h = dense("up_proj", c.intermediate_size)(x)
        h = act(dense("gate_proj", c.intermediate_size)(x)) * h if c.gated_mlp else act(h)
        return dense("down_proj", c.hidden_size)(h)


class Block(nn.Module):
    """One decoder layer. Collection of layer outputs (for hidden states) is one of:
    "none"; "stack", the scan output (every layer's output, [L, B, T, D]: what backprop keeps anyway); or
    "buffer", written into a carried [n + 1, B, T, D] buffer at this layer's slot (slot n is scratch), so a
    forward pass without gradients (the teacher) holds only the n requested outputs; or "cache" (decoding):
    `layer_cache` is this layer's (keys, values) cache, read only, and the scan output is the keys and values of
    this call's tokens, which the caller writes into the cache at slot `index`."""

    config: ModelConfig
    dtype: Any
    param_dtype: Any
    collect: str = "none"
    implementation: str = "xla"  # attention implementation, resolved (see models.attention.resolve)

    @nn.compact
    def __call__(self, carry: Any, cos: jax.Array, sin: jax.Array, mask: Any, slot: jax.Array,
                 index: jax.Array | None = None, layer_cache: tuple[jax.Array, jax.Array] | None = None):
        c = self.config
        h, buf = carry if self.collect == "buffer" else (carry, None)
        norm = lambda n: Norm(c.norm_type, c.norm_eps, c.hidden_size, self.param_dtype, name=n)  # noqa: E731
        attn = Attention(c, self.dtype, self.param_dtype, self.implementation, name="attn")(
            norm("attn_norm")(h), cos, sin, mask, layer_cache, index)
        if layer_cache is not None:
            attn, new_kv = attn
        if c.parallel_residual:
            h = h + attn + MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("mlp_norm")(h))
        else:
            h = h + attn
            h = h + MLP(c, self.dtype, self.param_dtype, name="mlp")(norm("mlp_norm")(h))
        if layer_cache is not None:
            return h, new_kv
        if self.collect == "buffer":
            return (h, jax.lax.dynamic_update_index_in_dim(buf, h.astype(buf.dtype), slot, 0)), None
        return h, (h if self.collect == "stack" else None)


class Transformer(nn.Module):
    """Decoder LM. `hidden_indices` follow HF: 0 = embedding output, i = output of layer i-1, num_layers (or -1)
    = output of the final norm. Set `return_logits=False` to get only hidden states (e.g. for a chunked loss)."""

    config: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    # True: keep only the requested layer outputs (a carried buffer) instead of stacking every layer's output.
    # Use it for forward passes that are not differentiated (the teacher); with gradients, stacking is cheaper.
    hidden_buffer: bool = False
    # dtype of the residual stream between layers (None: `dtype`). float32 with a bf16 `dtype` keeps the sums of
    # the layers' outputs, and their gradients, in float32 while every matmul stays bf16 (docs/DECISIONS.md).
    residual_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        hidden_indices: Sequence[int] = (),
        return_logits: bool = True,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> ModelOutput:
        c = self.config
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        idx = _normalise_indices(hidden_indices, c.num_layers)
        stream = self.residual_dtype or self.dtype
        embed = nn.Embed(c.vocab_size, c.hidden_size, param_dtype=self.param_dtype, dtype=stream, name="embed",
                         embedding_init=nn.initializers.normal(0.02))
        h = embed(tokens).astype(stream)
        cos, sin = rope_tables(c, positions)
        if cache is not None:
            return self._decode(embed, h, cos, sin, positions, cache, cache_index, return_logits)
        implementation = resolve(c.attention, tokens.shape[-1], c.head_dim)
        mask = attention_inputs(implementation, segment_ids)
        inner = sorted({i for i in idx if 0 < i < c.num_layers})
        collect = "none" if not inner else "buffer" if self.hidden_buffer else "stack"
        block = Block
        if self.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[self.remat])
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_layers,
        )(c, self.dtype, self.param_dtype, collect, implementation, name="layers")
        h_in = h
        # slot of layer l's output (HF index l + 1) in the buffer; unrequested layers write to scratch slot n
        slot_of = {i: k for k, i in enumerate(inner)}
        slots = jnp.asarray([slot_of.get(layer + 1, len(inner)) for layer in range(c.num_layers)], jnp.int32)
        if collect == "buffer":
            buf = jnp.zeros((len(inner) + 1,) + h.shape, h.dtype)
            (h, buf), _ = layers((h, buf), cos, sin, mask, slots)
            per_layer = {i: buf[slot_of[i]] for i in inner}
        else:
            h, stacked = layers(h, cos, sin, mask, slots)
            per_layer = {i: stacked[i - 1] for i in inner}
        final = Norm(c.norm_type, c.norm_eps, c.hidden_size, self.param_dtype, name="final_norm")(h).astype(self.dtype)
        picked = []
        for i in idx:
            picked.append(h_in if i == 0 else final if i == c.num_layers else per_layer[i])
        logits = self._logits(embed, final) if return_logits else None
        return ModelOutput(logits=logits, hidden_states=tuple(picked), final_hidden=final, last_layer_output=h)

    def _logits(self, embed: nn.Embed, final: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            return embed.attend(final.astype(self.dtype)).astype(self.dtype)
        return Dense(self.config.vocab_size, False, self.dtype, self.param_dtype, name="lm_head")(final)

    def _decode(self, embed: nn.Embed, h: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                cache: tuple[jax.Array, jax.Array], index: jax.Array, return_logits: bool) -> ModelOutput:
        """Forward of the tokens at slots index.. of a key/value cache ([L, B, Hkv, S, hd] keys and values).

        The layer scan only reads the cache (each layer its own slice) and outputs the new tokens' keys and
        values; they are written into the cache once, after the scan, so under a decoding loop that carries the
        cache the update is in place and nothing copies the cache per layer or per step."""
        c = self.config
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
            length=c.num_layers,
        )(c, self.dtype, self.param_dtype, "cache", name="layers")
        index = jnp.asarray(index, jnp.int32)
        h, (new_k, new_v) = layers(h, cos, sin, (None, None), jnp.arange(c.num_layers, dtype=jnp.int32), index,
                                   tuple(cache))
        zero = jnp.zeros((), jnp.int32)
        at = (zero, zero, zero, index, zero)
        new_cache = tuple(jax.lax.dynamic_update_slice(old, new, at) for old, new in zip(cache, (new_k, new_v)))
        final = Norm(c.norm_type, c.norm_eps, c.hidden_size, self.param_dtype, name="final_norm")(h).astype(self.dtype)
        logits = self._logits(embed, final) if return_logits else None
        return ModelOutput(logits=logits, hidden_states=(), final_hidden=final, last_layer_output=h, cache=new_cache)


def _normalise_indices(indices: Sequence[int], num_layers: int) -> tuple[int, ...]:
    out = []
    for i in indices:
        j = i + num_layers + 1 if i < 0 else i
        if not 0 <= j <= num_layers:
            raise ValueError(f"hidden state index {i} out of range for a {num_layers}-layer model (0..{num_layers})")
        out.append(j)
    return tuple(out)


def head_kernel(params: Params, config: ModelConfig) -> jax.Array:
    """The [D, V] matrix mapping final hidden states to logits (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def forward(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    hidden_indices: Sequence[int] = (),
    return_logits: bool = True,
    dtype: Any = jnp.float32,
    remat: str = "none",
    hidden_buffer: bool = False,
    cache: tuple[jax.Array, jax.Array] | None = None,
    cache_index: jax.Array | int | None = None,
    residual_dtype: Any = None,
) -> ModelOutput:
    """Functional forward pass on a plain parameter dict (docs/PARAMS.md).

    `hidden_buffer=True` keeps only the requested hidden states (see Transformer) for undifferentiated passes.
    Decoding: pass `cache` (from `init_cache`) and `cache_index`, the slot of tokens[:, 0]; `positions` default
    to index, index+1, ...; the output carries the updated cache. Rows are single sequences (no segments)."""
    if cache is not None:
        if hidden_indices:
            raise ValueError("hidden states are not collected when decoding with a cache")
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(tokens.shape[-1]), tokens.shape)
    model = Transformer(config, dtype=dtype, remat=remat, hidden_buffer=hidden_buffer, residual_dtype=residual_dtype)
    return model.apply({"params": params}, tokens, segment_ids, positions, tuple(hidden_indices), return_logits,
                       cache, cache_index)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32
               ) -> tuple[jax.Array, jax.Array]:
    """Empty key and value caches, [num_layers, batch, num_kv_heads, length, head_dim] each, for `forward`
    (heads before slots: the layout the cached attention's matmuls read without a transpose)."""
    shape = (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def init_params(config: ModelConfig, key: jax.Array, param_dtype: Any = jnp.float32) -> Params:
    """Random parameters with the right tree and shapes (for tests and shape-only planning)."""
    model = Transformer(config.replace(attention="xla"), param_dtype=param_dtype)  # a 2-token trace: any kernel
    tokens = jnp.zeros((1, 2), jnp.int32)
    return model.init(key, tokens)["params"]


def param_shapes(config: ModelConfig, param_dtype: Any = jnp.float32) -> Params:
    """ShapeDtypeStructs of every parameter, without allocating (for import validation and memory planning)."""
    model = Transformer(config.replace(attention="xla"), param_dtype=param_dtype)  # same parameters for any kernel
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 2), jnp.int32)), jax.random.key(0))
    return shapes["params"]

"""Part of a forward pass: chosen decoder layers of a layer stack, run from a hidden state, and the final norm.

Built from the pieces of `models.transformer` (Block, Norm, rope_tables, attention_inputs) with the same
semantics: segment ids and per-segment positions, padding (segment id 0) attending only to padding, float32
norms and RoPE tables. Running layers a..L-1 of a model from the output of its layer a-1 gives what its whole
forward gives at the final norm. The layers are picked by index from a stack and their number is a traced
value, so one compiled program runs any sequence of layers of any length up to the index array's: the KL patch
order (surgery.orders) scores many models made of student and teacher layers with it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from boomerang_jax.models.attention import resolve
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Block, Norm, Params, attention_inputs, rope_tables


def run_layers(stack: Params, layer_ids: jax.Array, count: jax.Array | int, config: ModelConfig,
               hidden: jax.Array, *, segment_ids: jax.Array, positions: jax.Array,
               slots: jax.Array | None = None, num_slots: int = 0, dtype: Any = jnp.float32
               ) -> tuple[jax.Array, jax.Array | None]:
    """Apply layers stack[layer_ids[0]], ..., stack[layer_ids[count - 1]] (`stack`: a stacked layer tree as in
    params["layers"]) to `hidden` [B, T, D], the input of the first of them; return the last one's output and,
    with `slots`, a [num_slots + 1, B, T, D] buffer where the output of the i-th layer run was written at
    slots[i] (slot num_slots is scratch: give it to the layers whose output is not wanted). `count` may be
    traced; `config` gives the architecture (its num_layers is not read)."""
    cos, sin = rope_tables(config, positions)
    implementation = resolve(config.attention, hidden.shape[1], config.head_dim)
    mask = attention_inputs(implementation, segment_ids)
    block = Block(config, dtype, jnp.float32, "none", implementation)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array | None]) -> tuple[jax.Array, jax.Array | None]:
        h, buf = carry
        params = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, layer_ids[i], 0, keepdims=False), stack)
        h, _ = block.apply({"params": params}, h, cos, sin, mask, jnp.zeros((), jnp.int32))
        if buf is not None:
            buf = jax.lax.dynamic_update_index_in_dim(buf, h.astype(buf.dtype), slots[i], 0)
        return h, buf

    h = hidden.astype(dtype)
    buf = None if slots is None else jnp.zeros((num_slots + 1,) + h.shape, h.dtype)
    return jax.lax.fori_loop(0, count, body, (h, buf))


def final_norm(params: Params, config: ModelConfig, h: jax.Array) -> jax.Array:
    """The final norm (`params`: a model's params["final_norm"]) of the last layer's output, as `forward` has it."""
    norm = Norm(config.norm_type, config.norm_eps, config.hidden_size)
    return norm.apply({"params": params}, h)


def embed_tokens(params: Params, config: ModelConfig, tokens: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The embedding output [B, T, D] of a model's parameters (HF hidden state 0), as `forward` computes it."""
    embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=dtype)
    return embed.apply({"params": params["embed"]}, tokens).astype(dtype)

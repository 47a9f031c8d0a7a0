"""The tail of a forward pass: a stack of decoder layers and the final norm, run from a hidden state.

Built from the same pieces as `models.transformer` (Block, Norm, rope_tables, attention_inputs), with the same
semantics: segment ids and per-segment positions, padding (segment id 0) attending only to padding, float32
norms and RoPE tables. Running layers a..L-1 from the output of layer a-1 gives what the full forward gives at
its final norm; the KL patch order (surgery.orders) scores many models that share a prefix this way.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from boomerang_jax.models.attention import resolve
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Block, Norm, Params, attention_inputs, rope_tables


class Suffix(nn.Module):
    """`config.num_layers` decoder layers (params "layers", stacked [L, ...]) and the final norm ("final_norm")
    applied to hidden states [B, T, D]; returns the final normed hidden states."""

    config: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
        c = self.config
        if c.num_layers < 1:
            raise ValueError(f"a suffix runs at least one layer, got num_layers={c.num_layers}")
        cos, sin = rope_tables(c, positions)
        implementation = resolve(c.attention, h.shape[1], c.head_dim)
        mask = attention_inputs(implementation, segment_ids)
        layers = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_layers,
        )(c, self.dtype, self.param_dtype, "none", implementation, name="layers")
        h, _ = layers(h.astype(self.dtype), cos, sin, mask, jnp.zeros((c.num_layers,), jnp.int32))
        return Norm(c.norm_type, c.norm_eps, c.hidden_size, self.param_dtype, name="final_norm")(h)


def suffix_forward(layers: Params, final_norm: Params, config: ModelConfig, hidden: jax.Array, *,
                   segment_ids: jax.Array, positions: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Final normed hidden states [B, T, D] of `layers` (a stacked layer tree of `config.num_layers` layers, as
    in params["layers"]) then `final_norm`, from `hidden` [B, T, D]: the input of the first of those layers."""
    return Suffix(config, dtype=dtype).apply({"params": {"layers": layers, "final_norm": final_norm}}, hidden,
                                             segment_ids, positions)


def embed_tokens(params: Params, config: ModelConfig, tokens: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """The embedding output [B, T, D] of a model's parameters (HF hidden state 0), as `forward` computes it."""
    embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=dtype)
    return embed.apply({"params": params["embed"]}, tokens).astype(dtype)

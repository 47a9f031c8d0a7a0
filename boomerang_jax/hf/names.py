"""The map between HF tensor names and our parameter paths (docs/PARAMS.md), per family.

Each `Entry` says how one HF tensor becomes one or more parameter leaves (a transpose, or NeoX's fused
per-head-interleaved QKV split) and back. Import and export both walk this one table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from boomerang_jax.models.config import ModelConfig

Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Entry:
    hf: str  # HF name; "{i}" stands for the layer index in per-layer entries
    targets: tuple[Path_, ...]  # parameter paths (under "layers" for per-layer entries)
    per_layer: bool
    hf_shape: tuple[int, ...]
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # HF tensor -> param leaves
    join: Callable[..., np.ndarray]  # param leaves -> HF tensor

    def name(self, layer: int | None = None) -> str:
        return self.hf.format(i=layer) if self.per_layer else self.hf


def _same(x: np.ndarray) -> tuple[np.ndarray]:
    return (x,)


def _ident(x: np.ndarray) -> np.ndarray:
    return x


def _t_split(x: np.ndarray) -> tuple[np.ndarray]:
    return (x.T,)


def _t_join(x: np.ndarray) -> np.ndarray:
    return x.T


def _vector(hf: str, target: Path_, n: int, per_layer: bool = True) -> Entry:
    return Entry(hf, (target,), per_layer, (n,), _same, _ident)


def _embedding(hf: str, c: ModelConfig) -> Entry:
    return Entry(hf, (("embed", "embedding"),), False, (c.vocab_size, c.hidden_size), _same, _ident)


def _linear(prefix: str, target: Path_, n_in: int, n_out: int, bias: bool, per_layer: bool = True) -> list[Entry]:
    out = [Entry(f"{prefix}.weight", (target + ("kernel",),), per_layer, (n_out, n_in), _t_split, _t_join)]
    if bias:
        out.append(_vector(f"{prefix}.bias", target + ("bias",), n_out, per_layer))
    return out


def _norm(hf: str, target: Path_, n: int, layer_norm: bool, per_layer: bool = True) -> list[Entry]:
    out = [_vector(f"{hf}.weight", target + ("scale",), n, per_layer)]
    if layer_norm:
        out.append(_vector(f"{hf}.bias", target + ("bias",), n, per_layer))
    return out


def entries(config: ModelConfig) -> list[Entry]:
    """Every HF tensor of a model with this config, in a stable order (globals first, then layer by layer)."""
    c = config
    d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
    q, kv = c.num_heads * hd, c.num_kv_heads * hd
    ln = c.norm_type == "layer"
    if c.model_type == "gpt_neox":
        h = c.num_heads

        def qkv_split(w: np.ndarray) -> tuple[np.ndarray, ...]:
            parts = w.reshape(h, 3, hd, *w.shape[1:])
            return tuple(parts[:, j].reshape(h * hd, *w.shape[1:]).T for j in range(3))

        def qkv_join(*leaves: np.ndarray) -> np.ndarray:
            parts = [x.T.reshape(h, hd, *x.shape[:-1]) for x in leaves]
            return np.stack(parts, axis=1).reshape(3 * h * hd, *leaves[0].shape[:-1])

        lp = "gpt_neox.layers.{i}"
        qkv = [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")]
        layer = [
            *_norm(f"{lp}.input_layernorm", ("attn_norm",), d, True),
            *_norm(f"{lp}.post_attention_layernorm", ("mlp_norm",), d, True),
            Entry(f"{lp}.attention.query_key_value.weight", tuple(p + ("kernel",) for p in qkv), True,
                  (3 * q, d), qkv_split, qkv_join),
        ]
        if c.attention_bias:
            layer.append(Entry(f"{lp}.attention.query_key_value.bias", tuple(p + ("bias",) for p in qkv), True,
                               (3 * q,), qkv_split, qkv_join))
        layer += [
            *_linear(f"{lp}.attention.dense", ("attn", "o_proj"), q, d, c.attention_out_bias),
            *_linear(f"{lp}.mlp.dense_h_to_4h", ("mlp", "up_proj"), d, f, c.mlp_bias),
            *_linear(f"{lp}.mlp.dense_4h_to_h", ("mlp", "down_proj"), f, d, c.mlp_bias),
        ]
        glob = [
            _embedding("gpt_neox.embed_in.weight", c),
            *_norm("gpt_neox.final_layer_norm", ("final_norm",), d, True, False),
        ]
        head = "embed_out"
    else:
        lp = "model.layers.{i}"
        layer = [
            *_norm(f"{lp}.input_layernorm", ("attn_norm",), d, ln),
            *_norm(f"{lp}.post_attention_layernorm", ("mlp_norm",), d, ln),
            *_linear(f"{lp}.self_attn.q_proj", ("attn", "q_proj"), d, q, c.attention_bias),
            *_linear(f"{lp}.self_attn.k_proj", ("attn", "k_proj"), d, kv, c.attention_bias),
            *_linear(f"{lp}.self_attn.v_proj", ("attn", "v_proj"), d, kv, c.attention_bias),
            *_linear(f"{lp}.self_attn.o_proj", ("attn", "o_proj"), q, d, c.attention_out_bias),
        ]
        if c.qk_norm:
            layer += [_vector(f"{lp}.self_attn.q_norm.weight", ("attn", "q_norm", "scale"), hd),
                      _vector(f"{lp}.self_attn.k_norm.weight", ("attn", "k_norm", "scale"), hd)]
        if c.gated_mlp:
            layer += _linear(f"{lp}.mlp.gate_proj", ("mlp", "gate_proj"), d, f, c.mlp_bias)
        layer += [
            *_linear(f"{lp}.mlp.up_proj", ("mlp", "up_proj"), d, f, c.mlp_bias),
            *_linear(f"{lp}.mlp.down_proj", ("mlp", "down_proj"), f, d, c.mlp_bias),
        ]
        glob = [
            _embedding("model.embed_tokens.weight", c),
            *_norm("model.norm", ("final_norm",), d, ln, False),
        ]
        head = "lm_head"
    if not c.tie_word_embeddings:
        glob += _linear(head, ("lm_head",), d, c.vocab_size, False, per_layer=False)
    return glob + layer


# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED_TENSORS = re.compile(
    r"(^|\.)rotary_emb\.inv_freq$|^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)$"
)


def export_order(config: ModelConfig) -> list[tuple[Entry, int | None]]:
    """(entry, layer) pairs in the order tensors are written: globals, then each layer's tensors together."""
    es = entries(config)
    order: list[tuple[Entry, int | None]] = [(e, None) for e in es if not e.per_layer]
    for i in range(config.num_layers):
        order += [(e, i) for e in es if e.per_layer]
    return order

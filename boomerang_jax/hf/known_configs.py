"""The architecture part of the paper teachers' `config.json` files, for planning without a download.

`boomerang plan-memory` and the FLOPs estimates need only shapes; with these a planner runs offline on a
workstation. Loading weights always reads the real config.json of the checkpoint, never these.
"""

from __future__ import annotations

from typing import Any

_QWEN3 = dict(model_type="qwen3", head_dim=128, hidden_act="silu", num_attention_heads=32, num_key_value_heads=8,
              num_hidden_layers=36, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
              rms_norm_eps=1e-6, attention_bias=False, bos_token_id=151643, eos_token_id=151643)
_PYTHIA = dict(model_type="gpt_neox", num_hidden_layers=32, num_attention_heads=32, hidden_act="gelu",
               rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, max_position_embeddings=2048,
               layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-4B-Base": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, tie_word_embeddings=True),
    "Qwen/Qwen3-8B-Base": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False),
    "meta-llama/Llama-3.2-3B": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
        head_dim=128, num_hidden_layers=28, vocab_size=128256, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128001),
    "EleutherAI/pythia-2.8b": dict(_PYTHIA, hidden_size=2560, intermediate_size=10240, vocab_size=50304),
    "EleutherAI/pythia-6.9b": dict(_PYTHIA, hidden_size=4096, intermediate_size=16384, vocab_size=50432),
}


def known_config(spec: str) -> dict[str, Any] | None:
    """The HF config dict of a known hub id (case-insensitive), else None."""
    for key, cfg in KNOWN_CONFIGS.items():
        if key.lower() == spec.lower():
            return dict(cfg)
    return None

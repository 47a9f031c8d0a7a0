"""The real embedded teacher (SmolLM2-135M from GGUF): JAX equals transformers on the same weights."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from boomerang_jax.cli import main as cli_main
from boomerang_jax.hf.export import save_hf
from boomerang_jax.hf.load import EMBEDDED_TEACHER, load_model
from boomerang_jax.models.generate import greedy_generate
from boomerang_jax.models.transformer import forward

pytestmark = pytest.mark.slow

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    ck = load_model(EMBEDDED_TEACHER)
    out = save_hf(tmp_path_factory.mktemp("smollm2") / "hf", ck.config, ck.params, hf_config=ck.hf_config,
                  tokenizer_files=ck.tokenizer_files, generation_config=ck.generation_config)
    return ck, out


def test_embedded_teacher_has_the_published_shape(teacher):
    ck, out = teacher
    c = ck.config
    assert (c.model_type, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (
        "llama", 30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ck.params))
    assert 134_000_000 < n < 135_000_000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30


def test_jax_logits_match_transformers_on_the_exported_teacher(teacher):
    ck, out = teacher
    tok = AutoTokenizer.from_pretrained(out)
    ids = np.asarray([tok(TEXT)["input_ids"]])
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda p, t: forward(p, ck.config, t).logits)(ck.params, jnp.asarray(ids)))
    err = np.abs(ours - ref).max()
    print(f"SmolLM2-135M max |logit diff| = {err:.2e} (max |logit| {np.abs(ref).max():.1f}, {ids.shape[1]} tokens)")
    assert err < 2e-3
    # and the model is a real language model on English: next-token accuracy far above chance
    acc = (ours[0, :-1].argmax(-1) == ids[0, 1:]).mean()
    assert acc > 0.3, acc


def test_greedy_generation_is_sensible_english(teacher):
    ck, out = teacher
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is")["input_ids"]
    text = tok.decode(greedy_generate(ck.params, ck.config, ids, 8)[len(ids):])
    assert "Paris" in text, text


def test_verify_command_reports_a_small_difference(teacher, capsys):
    _, out = teacher
    assert cli_main(["verify", str(out), "--num-sequences", "2", "--seq-len", "16"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("OK:") and "max |logits_jax - logits_transformers|" in line

"""Decoding with a key/value cache: the same logits as transformers' full forward, the same greedy text as
transformers' generate, and samples drawn from the model's own next-token distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from boomerang_jax.hf.load import load_hf
from boomerang_jax.models.generate import generate, greedy_generate, sample_logits
from boomerang_jax.models.transformer import forward, init_cache
from tests.conftest import save_tiny, torch_logits


def test_cached_decoding_gives_transformers_logits_token_by_token(tiny):
    model, ck = tiny
    tokens = np.random.RandomState(3).randint(0, ck.config.vocab_size, (2, 11))
    ref = torch_logits(model, tokens)
    cache = init_cache(ck.config, 2, 16)
    out = forward(ck.params, ck.config, jnp.asarray(tokens[:, :4]), cache=cache, cache_index=0)  # a 4-token prompt
    got = [np.asarray(out.logits)]
    cache = out.cache
    for i in range(4, tokens.shape[1]):
        out = forward(ck.params, ck.config, jnp.asarray(tokens[:, i:i + 1]), cache=cache, cache_index=i)
        got.append(np.asarray(out.logits))
        cache = out.cache
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers_generate(tiny):
    model, ck = tiny
    prompt = np.random.RandomState(4).randint(0, ck.config.vocab_size, (3, 5))
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                             do_sample=False, max_new_tokens=9, min_new_tokens=9, pad_token_id=0).numpy()
    ours = generate(ck.params, ck.config, prompt, 9, temperature=0.0)
    np.testing.assert_array_equal(ours, ref)
    # the list helper cuts after the first stop id
    row = ours[0].tolist()
    stop = row[7]
    assert greedy_generate(ck.params, ck.config, prompt[0].tolist(), 9, stop_ids=(stop,)) == row[: row.index(stop, 5) + 1]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_samples_follow_the_next_token_distribution(tmp_path, temperature):
    model = save_tiny(tmp_path / "m", "qwen3-gqa2-tied")
    ck = load_hf(tmp_path / "m")
    prompt = np.asarray([[5, 17, 3]])
    n = 20000
    drawn = generate(ck.params, ck.config, np.repeat(prompt, n, 0), 1, temperature=temperature,
                     key=jax.random.key(7))[:, -1]
    probs = jax.nn.softmax(torch_logits(model, prompt)[0, -1] / temperature)
    freq = np.bincount(drawn, minlength=ck.config.vocab_size) / n
    tv = 0.5 * np.abs(freq - np.asarray(probs)).sum()
    assert tv < 0.05, tv  # a wrong temperature or an off-by-one position gives a far larger distance
    # same key, same tokens; another key, other tokens
    a = generate(ck.params, ck.config, prompt, 12, key=jax.random.key(1))
    assert (a == generate(ck.params, ck.config, prompt, 12, key=jax.random.key(1))).all()
    assert (a != generate(ck.params, ck.config, prompt, 12, key=jax.random.key(2))).any()


def test_generate_rejects_bad_arguments(tmp_path):
    save_tiny(tmp_path / "m", "qwen3-gqa2-tied")
    ck = load_hf(tmp_path / "m")
    with pytest.raises(ValueError, match="PRNG key"):
        generate(ck.params, ck.config, np.zeros((1, 2), int), 3, temperature=1.0)
    with pytest.raises(ValueError, match="shape"):
        generate(ck.params, ck.config, np.zeros((3,), int), 3, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(ck.params, ck.config, np.zeros((1, 2), int), 3, temperature=-1.0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="hidden states"):
        forward(ck.params, ck.config, jnp.zeros((1, 1), jnp.int32), cache=init_cache(ck.config, 1, 4),
                cache_index=0, hidden_indices=(1,))


def _full_forward_greedy(ck, prompts, n):
    """The straightforward decoder: re-run the whole sequence every step and append the last position's argmax."""
    seq = jnp.asarray(prompts)
    for _ in range(n):
        logits = forward(ck.params, ck.config, seq).logits[:, -1]
        seq = jnp.concatenate([seq, jnp.argmax(logits, -1)[:, None].astype(seq.dtype)], axis=1)
    return np.asarray(seq)


@pytest.mark.parametrize("name", ["llama-gqa3-tied-llama3rope", "qwen3-gqa4-untied", "neox-partial-parallel"])
def test_cached_greedy_equals_full_forward_greedy(tmp_path, name):
    save_tiny(tmp_path / "m", name)
    ck = load_hf(tmp_path / "m")
    prompts = np.random.RandomState(5).randint(0, ck.config.vocab_size, (3, 4))
    np.testing.assert_array_equal(generate(ck.params, ck.config, prompts, 10, temperature=0.0),
                                  _full_forward_greedy(ck, prompts, 10))
    # one new token: the prompt's forward only; a one-token prompt: every position decoded from the cache
    np.testing.assert_array_equal(generate(ck.params, ck.config, prompts, 1, temperature=0.0),
                                  _full_forward_greedy(ck, prompts, 1))
    np.testing.assert_array_equal(generate(ck.params, ck.config, prompts[:, :1], 8, temperature=0.0),
                                  _full_forward_greedy(ck, prompts[:, :1], 8))


def test_inverse_cdf_sampler_gives_each_token_its_probability():
    # 300 tokens (not a multiple of the 128-token block), probabilities from ~0.3 down to ~1e-7, and tokens of
    # probability 0; stratified uniforms (an n1 x n2 grid) make the frequencies exact to about 1/n1 + 1/n2
    rs = np.random.RandomState(0)
    logits = rs.randn(300).astype(np.float32) * 4
    logits[[7, 150, 299]] = -np.inf
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    n1, n2 = 4096, 256
    u1 = (np.arange(n1) + 0.5) / n1
    u2 = (np.arange(n2) + 0.5) / n2
    u = np.stack(np.meshgrid(u1, u2, indexing="ij"), -1).reshape(-1, 2).astype(np.float32)
    tokens = np.asarray(sample_logits(jnp.broadcast_to(jnp.asarray(logits), (len(u), 300)), jnp.asarray(u), 1.0))
    freq = np.bincount(tokens, minlength=300) / len(u)
    assert freq[[7, 150, 299]].sum() == 0
    assert np.abs(freq - probs).max() < 2 / n1 + 2 / n2, np.abs(freq - probs).max()
    # temperature divides the logits; uniforms at the very ends never give a token of probability 0
    hot = np.asarray(sample_logits(jnp.broadcast_to(jnp.asarray(logits * 2), (len(u), 300)), jnp.asarray(u), 2.0))
    np.testing.assert_array_equal(hot, tokens)
    edge = jnp.asarray([[0.0, 0.0], [1 - 2**-24, 1 - 2**-24], [0.0, 1 - 2**-24], [1 - 2**-24, 0.0]], jnp.float32)
    drawn = np.asarray(sample_logits(jnp.broadcast_to(jnp.asarray(logits), (4, 300)), edge, 1.0))
    assert np.isfinite(logits[drawn]).all()
    assert drawn[1] == np.flatnonzero(np.isfinite(logits))[-1]  # u -> 1: the last token that can be drawn


def test_each_row_samples_from_its_own_key(tmp_path):
    save_tiny(tmp_path / "m", "qwen3-gqa2-tied")
    ck = load_hf(tmp_path / "m")
    prompts = np.asarray([[5, 17, 3], [2, 2, 9], [5, 17, 3], [1, 0, 4]])
    keys = jax.random.split(jax.random.key(3), 4)
    rows = generate(ck.params, ck.config, prompts, 16, key=keys)
    # a row's tokens depend on its prompt and key only, not on the rest of the batch
    np.testing.assert_array_equal(generate(ck.params, ck.config, prompts[2:3], 16, key=keys[2:3]), rows[2:3])
    np.testing.assert_array_equal(generate(ck.params, ck.config, prompts[[3, 1]], 16, key=keys[jnp.asarray([3, 1])]),
                                  rows[[3, 1]])
    assert (rows[0] != rows[2]).any()  # same prompt, other key
    with pytest.raises(ValueError, match="one per row"):
        generate(ck.params, ck.config, prompts, 4, key=keys[:3])

"""Decoding with a key/value cache: the same logits as transformers' full forward, the same greedy text as
transformers' generate, and samples drawn from the model's own next-token distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from boomerang_jax.hf.load import load_hf
from boomerang_jax.models.generate import generate, greedy_generate
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

"""The Flax model reproduces transformers exactly (fp32), including packed rows and hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from boomerang_jax.models.transformer import forward, init_params
from tests.conftest import torch_logits

ATOL = 1e-4


def test_logits_match_transformers(tiny):
    model, ck = tiny
    tokens = np.random.RandomState(1).randint(0, ck.config.vocab_size, (3, 17))
    ref = torch_logits(model, tokens)
    ours = np.asarray(forward(ck.params, ck.config, jnp.asarray(tokens)).logits)
    assert np.abs(ref).max() > 0.5  # logits of order 1, so the tolerance is meaningful
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


def test_packed_row_gives_same_logits_per_segment_as_separate_runs(tiny):
    model, ck = tiny
    rng = np.random.RandomState(2)
    lengths = [5, 9, 3]
    docs = [rng.randint(0, ck.config.vocab_size, n) for n in lengths]
    pad = 4
    tokens = np.concatenate(docs + [np.zeros(pad, int)])[None]
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])[None]
    packed = np.asarray(forward(ck.params, ck.config, jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids),
                                positions=jnp.asarray(positions)).logits)[0]
    start = 0
    for doc in docs:
        alone = torch_logits(model, doc[None])[0]
        np.testing.assert_allclose(packed[start:start + len(doc)], alone, atol=ATOL, rtol=0)
        start += len(doc)
    assert np.isfinite(packed).all()  # padding rows stay finite (they attend to padding only)


def test_hidden_states_follow_hf_indexing(tiny):
    model, ck = tiny
    tokens = np.random.RandomState(3).randint(0, ck.config.vocab_size, (2, 7))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens), output_hidden_states=True).hidden_states
    n = ck.config.num_layers
    wanted = list(range(n + 1)) + [-1]
    out = forward(ck.params, ck.config, jnp.asarray(tokens), hidden_indices=wanted, return_logits=False)
    assert out.logits is None
    for i, h in zip(wanted, out.hidden_states):
        np.testing.assert_allclose(np.asarray(h), ref[i].numpy(), atol=ATOL, rtol=0, err_msg=f"hidden state {i}")
    np.testing.assert_allclose(np.asarray(out.final_hidden), ref[n].numpy(), atol=ATOL, rtol=0)
    # the no-gradient path that keeps only the requested layer outputs gives the same states
    some = [0, n // 2, -2, -1]
    lean = forward(ck.params, ck.config, jnp.asarray(tokens), hidden_indices=some, return_logits=False,
                   hidden_buffer=True)
    for i, h in zip(some, lean.hidden_states):
        np.testing.assert_allclose(np.asarray(h), ref[i].numpy(), atol=ATOL, rtol=0, err_msg=f"buffered state {i}")


def test_out_of_range_hidden_index_is_a_clear_error(tiny):
    _, ck = tiny
    with pytest.raises(ValueError, match="out of range"):
        forward(ck.params, ck.config, jnp.zeros((1, 3), jnp.int32), hidden_indices=(ck.config.num_layers + 1,))


def test_bf16_compute_with_fp32_params_stays_close(tiny):
    _, ck = tiny
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, ck.config.vocab_size, (2, 9)))
    f32 = np.asarray(forward(ck.params, ck.config, tokens).logits)
    bf16 = forward(ck.params, ck.config, tokens, dtype=jnp.bfloat16).logits
    assert bf16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(bf16, np.float32) - f32).max()
    assert err < 0.1 * np.abs(f32).max(), err


def test_float32_residual_stream_with_bf16_compute_keeps_the_sums_in_float32(tiny):
    _, ck = tiny
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, ck.config.vocab_size, (2, 9)))
    f32 = forward(ck.params, ck.config, tokens, hidden_indices=(0, 1))
    bf16 = forward(ck.params, ck.config, tokens, hidden_indices=(0, 1), dtype=jnp.bfloat16)
    mixed = forward(ck.params, ck.config, tokens, hidden_indices=(0, 1), dtype=jnp.bfloat16,
                    residual_dtype=jnp.float32)
    assert [h.dtype for h in mixed.hidden_states] == [jnp.float32] * 2
    assert [h.dtype for h in bf16.hidden_states] == [jnp.bfloat16] * 2
    assert mixed.final_hidden.dtype == jnp.bfloat16  # what the LM head's bf16 matmul reads
    # the stream starts unrounded (the embedding output is float32's exactly), then only the matmuls round
    np.testing.assert_array_equal(np.asarray(mixed.hidden_states[0]), np.asarray(f32.hidden_states[0]))
    assert not np.array_equal(np.asarray(bf16.hidden_states[0], np.float32), np.asarray(f32.hidden_states[0]))
    scale = np.abs(np.asarray(f32.logits)).max()
    assert np.abs(np.asarray(mixed.logits) - np.asarray(f32.logits)).max() < 0.1 * scale


def test_remat_keeps_logits_and_gradients():
    from boomerang_jax.models.config import ModelConfig
    from tests.conftest import TINY_CONFIGS

    cfg = ModelConfig.from_hf(TINY_CONFIGS["qwen3-gqa2-tied"])
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 8)))

    def loss(p, remat):
        return jnp.mean(forward(p, cfg, tokens, remat=remat).logits ** 2)

    base_val, base_grad = jax.value_and_grad(loss)(params, "none")
    for policy in ("full", "dots"):
        val, grad = jax.value_and_grad(loss)(params, policy)
        np.testing.assert_allclose(val, base_val, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grad, base_grad)


def test_buffered_hidden_states_hold_only_the_requested_layers():
    """Compiled temp memory of a no-gradient forward: the buffer keeps 2 of 24 layer outputs, the stack all 24."""
    from boomerang_jax.models.config import ModelConfig
    from boomerang_jax.models.transformer import param_shapes

    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2))
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32)
    layer_bytes = 4 * 256 * 256 * 4
    temp = {}
    for buffered in (False, True):
        fn = jax.jit(lambda p, t: forward(p, cfg, t, hidden_indices=(0, 6, 12, 24), return_logits=False,
                                          hidden_buffer=buffered).hidden_states)
        analysis = fn.lower(param_shapes(cfg), tokens).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        temp[buffered] = analysis.temp_size_in_bytes
    assert temp[False] - temp[True] >= 15 * layer_bytes, temp

"""The KL patch order's fast path: suffix forwards from a shared prefix, and a cached teacher distribution, choose
the same blocks with the same KL and NLL as scoring every candidate model whole."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.suffix import embed_tokens, final_norm, run_layers
from boomerang_jax.models.transformer import forward, init_params
from boomerang_jax.surgery import LayerPlan, patched_first, prune
from boomerang_jax.surgery import orders
from tests.conftest import EIGHT_LAYER_CONFIGS

# float32 on CPU: the prefix and suffix run the same layer code as the whole forward; the cached KL sums
# sum_v p log p - sum_v p z + logsumexp(z) instead of sum_v p (log p - z) + logsumexp(z): rounding only.
REL, ABS = 1e-5, 1e-6


def _noisy(tree, rng: np.random.RandomState, scale: float):
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(np.float32), tree)


def _teacher(name: str, seed: int = 0, num_layers: int = 8):
    config = ModelConfig.from_hf({**EIGHT_LAYER_CONFIGS[name], "num_hidden_layers": num_layers})
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(seed)))
    return config, _noisy(params, np.random.RandomState(seed), 0.2)


def _student(teacher, plan: LayerPlan, seed: int = 1):
    """The pruned teacher with every part damaged (layers by different amounts, and the embedding, final norm
    and head), so that which model supplies each part shows in the KL."""
    config, params = prune(teacher[1], teacher[0], plan)
    rng = np.random.RandomState(seed)
    params = {k: _noisy(v, rng, 0.05) for k, v in params.items()}
    kernel = params["layers"]["mlp"]["down_proj"]["kernel"]
    for layer in range(config.num_layers):
        kernel[layer] += (0.1 + 0.3 * rng.rand()) * rng.standard_normal(kernel[layer].shape).astype(np.float32)
    return config, params


def _batch(vocab: int, rows: int, seq: int, lengths: list[int], seed: int) -> dict[str, np.ndarray]:
    """Documents packed left to right, row by row; what is left of each row is padding (segment 0, no loss)."""
    rng = np.random.RandomState(seed)
    out = {k: np.zeros((rows, seq), np.int32) for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    r, col, seg = 0, 0, 0
    for n in lengths:
        if col + n > seq:
            r, col, seg = r + 1, 0, 0
        doc = rng.randint(0, vocab, n)
        seg += 1
        out["tokens"][r, col:col + n] = doc
        out["targets"][r, col:col + n - 1] = doc[1:]
        out["segment_ids"][r, col:col + n] = seg
        out["positions"][r, col:col + n] = np.arange(n)
        out["loss_mask"][r, col:col + n - 1] = 1
        col += n
    assert (out["segment_ids"] == 0).any(), "the batch should have padding"
    return out


def _batches(vocab: int) -> list[dict[str, np.ndarray]]:
    # two shapes (the last batch of a calibration set is often shorter), both padded
    return [_batch(vocab, 3, 16, [9, 5, 12, 3, 10], seed=3), _batch(vocab, 2, 12, [7, 4, 9], seed=4)]


@pytest.mark.parametrize("name", ["llama-tied", "qwen3-untied"])
def test_layers_run_from_a_hidden_state_give_the_whole_forward(name):
    config, params = _teacher(name)
    b = {k: jnp.asarray(v) for k, v in _batch(config.vocab_size, 3, 16, [9, 5, 12, 3, 10], seed=3).items()}
    wanted = (0, 3, 5, 7)
    whole = forward(params, config, b["tokens"], segment_ids=b["segment_ids"], positions=b["positions"],
                    hidden_indices=wanted, return_logits=False, hidden_buffer=True)
    np.testing.assert_array_equal(embed_tokens(params, config, b["tokens"]), whole.hidden_states[0])
    run = jax.jit(run_layers, static_argnames=("config", "num_slots"))  # one program for every start and count
    programs = run._cache_size()  # jit's cache is per function, shared with the other parametrisations
    n = config.num_layers
    for start, h in zip(wanted, whole.hidden_states):
        ids = jnp.asarray(list(range(start, n)) + [0] * start, jnp.int32)  # padded: only `count` are run
        out, _ = run(params["layers"], ids, n - start, config, h, segment_ids=b["segment_ids"],
                     positions=b["positions"])
        np.testing.assert_allclose(final_norm(params["final_norm"], config, out), whole.final_hidden,
                                   rtol=1e-5, atol=1e-5)
    # the outputs of chosen layers, written into a buffer's slots (slot 2 is scratch)
    slots = jnp.asarray([2, 2, 0, 2, 1, 2, 2, 2], jnp.int32)  # layer 2 -> slot 0 (HF index 3), layer 4 -> slot 1
    _, buf = run(params["layers"], jnp.arange(n, dtype=jnp.int32), 5, config, whole.hidden_states[0],
                 segment_ids=b["segment_ids"], positions=b["positions"], slots=slots, num_slots=2)
    np.testing.assert_allclose(buf[0], whole.hidden_states[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(buf[1], whole.hidden_states[2], rtol=1e-5, atol=1e-5)
    assert run._cache_size() - programs == 2  # with and without slots


@pytest.mark.parametrize("name,knobs,cache", [
    ("llama-tied", dict(every=2, first=1, last=2), True),  # blocks {0,1},{2,3},{4,5},{6},{7}
    ("qwen3-untied", dict(every=2, first=2, last=1), True),  # {0},{1,2},{3,4},{5,6},{7}: block 0 closes with 1
    ("qwen3-tied", dict(every=2, first=2, last=1), False),  # the teacher's logits recomputed per candidate
])
def test_fast_kl_greedy_order_chooses_what_scoring_whole_models_chooses(name, knobs, cache):
    teacher = _teacher(name)
    plan = LayerPlan.from_knobs(8, **knobs)
    student = _student(teacher, plan)
    batches = _batches(teacher[0].vocab_size)

    ref_order, ref_steps = orders.kl_greedy_order(student, teacher, plan, batches, chunk=8, fast=False)
    order, steps = orders.kl_greedy_order(student, teacher, plan, batches, chunk=8,
                                          teacher_cache_bytes=orders.TEACHER_CACHE_BYTES if cache else 0)

    assert order == ref_order
    assert [(s["block"], s["num_layers"]) for s in steps] == [(s["block"], s["num_layers"]) for s in ref_steps]
    for s, r in zip(steps, ref_steps):
        assert s["kl"] == pytest.approx(r["kl"], rel=REL, abs=ABS)
        assert s["nll"] == pytest.approx(r["nll"], rel=REL, abs=ABS)
    # every candidate of the first two steps, not only the chosen ones
    s_model, t_model = orders.Model(*student), orders.Model(*teacher)
    jb = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    scorer = orders._SuffixScorer(s_model, t_model, plan, jb, 8, orders.TEACHER_CACHE_BYTES if cache else 0)
    assert scorer.teacher_cached == cache
    reference = orders._WholeModelScorer(s_model, t_model, plan, jb, 8)
    for chosen in ([], [order[0]]):
        rest = [b for b in plan.multi_layer_blocks if b not in chosen]
        fast, whole = scorer.step(chosen, rest), reference.step(chosen, rest)
        assert list(fast) == list(whole) == rest
        for c in rest:
            assert fast[c] == pytest.approx(whole[c], rel=REL, abs=ABS)


def test_bf16_kl_scores_match_whole_bf16_models_and_stay_near_float32():
    teacher = _teacher("llama-tied")
    plan = LayerPlan.from_knobs(8, every=2, first=1, last=2)
    s_model, t_model = orders.Model(*_student(teacher, plan)), orders.Model(*teacher)
    jb = [{k: jnp.asarray(v) for k, v in b.items()} for b in _batches(teacher[0].vocab_size)]
    rest = list(plan.multi_layer_blocks)
    fast = orders._SuffixScorer(s_model, t_model, plan, jb, 8, dtype=jnp.bfloat16).step([rest[0]], rest[1:])
    whole = orders._WholeModelScorer(s_model, t_model, plan, jb, 8, dtype=jnp.bfloat16).step([rest[0]], rest[1:])
    exact = orders._WholeModelScorer(s_model, t_model, plan, jb, 8).step([rest[0]], rest[1:])
    for c in rest[1:]:
        assert fast[c] == pytest.approx(whole[c], rel=1e-2, abs=1e-3)
        assert fast[c] == pytest.approx(exact[c], rel=5e-2, abs=1e-2)
        assert fast[c] != pytest.approx(exact[c], rel=1e-7, abs=0)  # bf16 really ran


def test_every_candidate_of_every_step_runs_in_one_compiled_program():
    teacher = _teacher("llama-tied", seed=2, num_layers=12)  # 5 multi-layer blocks: 14 candidates in 4 steps
    plan = LayerPlan.from_knobs(12, every=2, first=1, last=2)
    student = _student(teacher, plan, seed=3)
    batches = [_batch(teacher[0].vocab_size, 2, 20, [11, 6, 13], seed=5)]  # a shape no other test uses
    before = orders._suffix_kl_sums._cache_size(), orders._prefix_states._cache_size()
    order, steps = orders.kl_greedy_order(student, teacher, plan, batches, chunk=8)
    assert len(steps) == 4
    after = orders._suffix_kl_sums._cache_size(), orders._prefix_states._cache_size()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


def test_two_sided_kl_order_chooses_the_back_half_from_the_teacher_side():
    teacher = _teacher("llama-tied", seed=4, num_layers=12)  # 5 multi-layer blocks
    plan = LayerPlan.from_knobs(12, every=2, first=1, last=2)
    student = _student(teacher, plan, seed=6)
    batches = _batches(teacher[0].vocab_size)
    multi = list(plan.multi_layer_blocks)
    order, steps = orders.kl_greedy_order(student, teacher, plan, batches, chunk=8, from_teacher=2)
    ref_order, ref_steps = orders.kl_greedy_order(student, teacher, plan, batches, chunk=8, from_teacher=2, fast=False)
    assert order == ref_order and sorted(order) == multi
    assert [s["num_layers"] for s in steps] == [plan.num_layers(patched_first(plan, order[:k])) for k in range(1, 5)]
    for s, r in zip(steps, ref_steps):
        assert s["kl"] == pytest.approx(r["kl"], rel=REL, abs=ABS)
    # the block patched last is the one whose student layer alone, in the teacher, gives the lowest KL: scored
    # independently with whole models
    reference = orders._WholeModelScorer(orders.Model(*student), orders.Model(*teacher), plan,
                                         [{k: jnp.asarray(v) for k, v in b.items()} for b in batches], 8)
    alone = reference.score(multi, [[b for b in multi if b != c] for c in multi])
    assert order[-1] == multi[min(range(len(multi)), key=lambda i: alone[i][0])]
    assert steps[-1]["kl"] == pytest.approx(min(kl for kl, _ in alone), rel=REL, abs=ABS)
    with pytest.raises(ValueError, match="from_teacher"):
        orders.kl_greedy_order(student, teacher, plan, batches, from_teacher=5)

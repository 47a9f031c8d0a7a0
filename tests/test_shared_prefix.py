"""Family evaluation with shared prefixes: the same rows as evaluating each model on its own, fewer layers run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boomerang_jax.eval.perplexity import perplexity_rows
from boomerang_jax.eval.shared_prefix import SharedPrefixEval
from boomerang_jax.hf.load import load_hf
from boomerang_jax.surgery import LayerPlan, interpolate, patched_for, prune
from boomerang_jax.surgery.baselines import drop_layers
from tests.conftest import save_tiny
from tests.test_eval import pack_rows


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """An 8-layer teacher, a damaged 4-layer student, and models of the three methods built from them."""
    d = tmp_path_factory.mktemp("m") / "llama"
    save_tiny(d, "llama-gqa3-tied-llama3rope")
    ck = load_hf(d)
    t_config = ck.config.replace(num_layers=2 * ck.config.num_layers)
    t_params = dict(jax.tree.map(np.array, ck.params))
    t_params["layers"] = jax.tree.map(lambda x: np.concatenate([x, x[::-1]]), t_params["layers"])
    teacher = (t_config, t_params)
    plan = LayerPlan.from_kept(8, [0, 2, 4, 6])
    s_config, s_params = prune(t_params, t_config, plan)
    s_params = jax.tree.map(np.array, s_params)
    rng = np.random.RandomState(5)
    kernel = s_params["layers"]["mlp"]["down_proj"]["kernel"]
    kernel += 0.5 * rng.standard_normal(kernel.shape).astype(kernel.dtype)
    student = (s_config, s_params)
    pruned = prune(t_params, t_config, plan)
    models = {}
    for order in ("last-to-first", "first-to-last"):
        for k in range(5):
            models[("boomerang", order, k)] = interpolate(student, teacher, plan, patched_for(plan, order, k))
            models[("naive", order, k)] = interpolate(pruned, teacher, plan, patched_for(plan, order, k))
    for drop in ([7], [2, 5], [0, 1, 6]):
        models[("shortgpt", tuple(drop))] = drop_layers(t_params, t_config, drop)
    models[("teacher",)] = teacher
    texts = {name: [pack_rows([r.randint(0, ck.config.vocab_size, n) for n in lengths], seq_len=24, rows=3)
                    for _ in range(2)]
             for name, r, lengths in (("a", np.random.RandomState(1), (11, 7, 14, 9, 12, 6)),
                                      ("b", np.random.RandomState(2), (20, 5, 17, 8)))}
    return models, texts


@pytest.mark.parametrize("max_state_bytes", [2 << 30, 1], ids=["one-group", "a-group-per-batch"])
def test_rows_equal_evaluating_each_model_on_its_own(family, max_state_bytes):
    models, texts = family
    ev = SharedPrefixEval(texts, chunk=8, max_state_bytes=max_state_bytes)
    for ident, (cfg, params) in models.items():
        ev.add(ident, cfg, params)
    todo = {ident: ["a", "b"] if i % 3 else ["b"] for i, ident in enumerate(models)}
    got = {(ident, text): (sums, counts) for ident, text, sums, counts, _ in ev.run(todo)}

    assert set(got) == {(ident, t) for ident, ts in todo.items() for t in ts}
    for (ident, text), (sums, counts) in got.items():
        cfg, params = models[ident]
        _, want_sums, want_counts = perplexity_rows(params, cfg, texts[text], chunk=8)
        np.testing.assert_array_equal(counts, want_counts)
        np.testing.assert_allclose(sums, want_sums, rtol=2e-5, err_msg=str((ident, text)))


def test_bf16_rows_equal_each_model_evaluated_on_its_own_in_bf16(family):
    models, texts = family
    ev = SharedPrefixEval(texts, chunk=8, dtype=jnp.bfloat16)
    picked = [("boomerang", "last-to-first", 2), ("naive", "first-to-last", 1), ("shortgpt", (2, 5)), ("teacher",)]
    for ident in picked:
        ev.add(ident, *models[ident])
    got = {(ident, text): sums for ident, text, sums, _, _ in ev.run({i: ["a", "b"] for i in picked})}
    for (ident, text), sums in got.items():
        cfg, params = models[ident]
        _, want, _ = perplexity_rows(params, cfg, texts[text], chunk=8, dtype=jnp.bfloat16)
        _, exact, _ = perplexity_rows(params, cfg, texts[text], chunk=8)
        # layers run one at a time vs in one loop: the same bf16 roundings, up to float32 accumulation order
        np.testing.assert_allclose(sums, want, rtol=1e-3, err_msg=str((ident, text)))
        assert not np.allclose(sums, exact, rtol=1e-6)  # bf16 really ran
        np.testing.assert_allclose(sums, exact, rtol=5e-2)  # and stays near the float32 rows


def test_each_shared_prefix_runs_once_per_text(family):
    models, texts = family
    ev = SharedPrefixEval(texts, chunk=8)
    members = [ev.add(ident, cfg, params) for ident, (cfg, params) in models.items()]
    todo = {m.ident: ["a"] for m in members}
    cost = ev.plan_cost(todo)
    list(ev.run(todo))
    assert (cost["run"], cost["needed"]) == (ev.layers_run, ev.layers_needed)
    assert ev.layers_run / ev.layers_needed < cost["share"] < 1

    # one layer application per node of the trie of layer sequences (a node: a distinct prefix of a model)
    nodes = {m.path[:d] for m in members for d in range(2, len(m.path) + 1)}
    assert ev.layers_run == len(nodes)
    assert ev.layers_needed == sum(cfg.num_layers for cfg, _ in models.values())
    assert ev.layers_run < 0.6 * ev.layers_needed
    # the teacher appears as naive pruning and boomerang at k=4 too: the same layers, found by content
    teacher = next(m for m in members if m.ident == ("teacher",))
    assert [m.ident for m in members if m.path == teacher.path and m.head == teacher.head] == [
        ("boomerang", "last-to-first", 4), ("naive", "last-to-first", 4), ("boomerang", "first-to-last", 4),
        ("naive", "first-to-last", 4), ("teacher",)]
    # the teacher's layers are 4 distinct ones, then the same in reverse; the student's 4 damaged ones; the naive
    # student's are the teacher's
    assert ev.distinct_layers == 4 + 4


def test_a_model_of_another_architecture_or_an_unknown_text_is_refused(family):
    models, texts = family
    cfg, params = models[("teacher",)]
    ev = SharedPrefixEval(texts, chunk=8)
    ev.add("t", cfg, params)
    with pytest.raises(ValueError, match=r"model 'wide' has another architecture .*intermediate_size"):
        ev.add("wide", cfg.replace(intermediate_size=cfg.intermediate_size + 1), params)
    with pytest.raises(ValueError, match="added twice"):
        ev.add("t", cfg, params)
    with pytest.raises(ValueError, match="its layer stack holds \\[8\\] layers, its config 7"):
        ev.add("short", cfg.replace(num_layers=7), params)
    with pytest.raises(KeyError, match="texts \\['c'\\]"):
        list(ev.run({"t": ["c"]}))
    with pytest.raises(KeyError, match="never added"):
        list(ev.run({"u": ["a"]}))
    with pytest.raises(ValueError, match="at least one evaluation batch"):
        SharedPrefixEval({"a": []})

"""Evaluation: perplexity equals transformers' on the same documents; the ShortGPT baseline drops the right layers."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from boomerang_jax.surgery.baselines import block_influence, drop_layers, layers_to_drop, shortgpt_family
from boomerang_jax.eval.perplexity import perplexity, summarise
from boomerang_jax.hf.load import load_hf
from boomerang_jax.models.transformer import forward
from tests.conftest import WORDS, save_tiny, torch_logits, word_model


def pack_rows(docs: list[np.ndarray], seq_len: int, rows: int) -> dict[str, np.ndarray]:
    """Straightforward packing for tests: documents placed whole, left to right, row by row."""
    out = {k: np.zeros((rows, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    r, col, seg = 0, 0, 0
    for doc in docs:
        if col + len(doc) > seq_len:
            r, col, seg = r + 1, 0, 0
        seg += 1
        n = len(doc)
        out["tokens"][r, col:col + n] = doc
        out["targets"][r, col:col + n - 1] = doc[1:]
        out["segment_ids"][r, col:col + n] = seg
        out["positions"][r, col:col + n] = np.arange(n)
        out["loss_mask"][r, col:col + n - 1] = 1
        col += n
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "llama"
    model = save_tiny(d, "llama-gqa3-tied-llama3rope")
    return model, load_hf(d)


def test_perplexity_equals_transformers_on_the_same_documents(tiny):
    model, ck = tiny
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, ck.config.vocab_size, n) for n in (7, 12, 5, 9, 15, 3)]
    batch = pack_rows(docs, seq_len=24, rows=3)
    ours = perplexity(ck.params, ck.config, [batch], chunk=8)
    nll, count = 0.0, 0
    for doc in docs:
        logits = torch.as_tensor(torch_logits(model, doc[None])[0, :-1])
        nll += float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(doc[1:]), reduction="sum"))
        count += len(doc) - 1
    assert ours.tokens == count
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert ours.ci_low <= ours.perplexity <= ours.ci_high


def test_bootstrap_interval_narrows_with_more_rows():
    rng = np.random.default_rng(0)
    few = summarise(rng.normal(30, 5, 4), np.full(4, 10.0))
    many = summarise(rng.normal(30, 5, 400), np.full(400, 10.0))
    assert (many.ci_high - many.ci_low) < (few.ci_high - few.ci_low)


def test_block_influence_drops_layers_that_do_nothing(tiny):
    _, ck = tiny
    params = jax.tree.map(np.array, ck.params)
    idle = [1, 2]  # layers whose attention and MLP write nothing to the residual stream
    for i in idle:
        params["layers"]["attn"]["o_proj"]["kernel"][i] = 0
        params["layers"]["mlp"]["down_proj"]["kernel"][i] = 0
    rng = np.random.RandomState(1)
    batch = pack_rows([rng.randint(0, ck.config.vocab_size, 10) for _ in range(4)], seq_len=20, rows=2)
    influence = block_influence(params, ck.config, [batch])
    np.testing.assert_allclose(influence[idle], 0.0, atol=1e-6)
    assert (np.delete(influence, idle) > 1e-3).all()
    assert layers_to_drop(influence, 2) == idle
    (drop, (cfg, small)), = shortgpt_family(params, ck.config, influence, [2])
    assert drop == idle and cfg.num_layers == 2
    full = forward(params, ck.config, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    cut = forward(small, cfg, batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    np.testing.assert_allclose(np.asarray(cut.logits), np.asarray(full.logits), atol=1e-5)


def test_dropping_layers_equals_transformers_without_those_layers(tiny):
    model, ck = tiny
    cfg, small = drop_layers(ck.params, ck.config, [0, 2])
    tokens = np.random.RandomState(2).randint(0, ck.config.vocab_size, (2, 9))
    import copy

    cut = copy.deepcopy(model)
    cut.model.layers = torch.nn.ModuleList([cut.model.layers[i] for i in (1, 3)])
    cut.config.num_hidden_layers = 2
    with torch.no_grad():  # no KV cache: the kept attention modules still carry their old layer indices
        ref = cut(torch.as_tensor(tokens), use_cache=False).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(small, cfg, tokens).logits), ref, atol=1e-4)
    with pytest.raises(ValueError, match="invalid layers to drop"):
        drop_layers(ck.params, ck.config, [7])


def test_eval_command_matches_transformers_perplexity_on_raw_text(tmp_path, capsys):
    """`boomerang eval` on text files (tokenised with the model's tokenizer) == transformers, document by document."""
    import json as _json

    from boomerang_jax.cli import main as cli_main

    words = WORDS
    model, fast = word_model(tmp_path / "m", num_layers=2)
    rng = np.random.RandomState(0)
    (tmp_path / "text").mkdir()
    docs = [" ".join(rng.choice(words, n)) for n in (5, 9, 14, 3, 11)]
    for i, d in enumerate(docs):
        (tmp_path / "text" / f"{i}.txt").write_text(d)
    out = tmp_path / "r.json"
    assert cli_main(["eval", str(tmp_path / "m"), "--data", str(tmp_path / "text"), "--seq", "32",
                     "--json-out", str(out)]) == 0
    (row,) = _json.loads(out.read_text())
    nll, count = 0.0, 0
    for d in docs:
        ids = np.asarray(fast(d)["input_ids"] + [1])
        logits = torch.as_tensor(torch_logits(model, ids[None])[0, :-1])
        nll += float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    assert row["tokens"] == count
    assert row["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert "perplexity" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- patch orders
def _stand_in_case(ck, plan):
    """Teacher with layer 1 idle (so student layer 0 = teacher layer 0 stands in exactly for block {0, 1}) and
    a student whose layer 1 (block {2, 3}) is scrambled: the worst stand-in."""
    from boomerang_jax.surgery import prune

    teacher = jax.tree.map(np.array, ck.params)
    teacher["layers"]["attn"]["o_proj"]["kernel"][1] = 0
    teacher["layers"]["mlp"]["down_proj"]["kernel"][1] = 0
    s_config, student = prune(teacher, ck.config, plan)
    student = jax.tree.map(np.array, student)
    rng = np.random.RandomState(3)
    for leaf in jax.tree.leaves(student["layers"]):
        leaf[1] = 3 * rng.standard_normal(leaf[1].shape).astype(leaf.dtype)
    return (s_config, student), (ck.config, teacher)


def test_by_loss_order_patches_the_worst_stand_in_first(tiny):
    from boomerang_jax.surgery.orders import block_scores, by_loss_order
    from boomerang_jax.surgery import LayerPlan

    _, ck = tiny
    plan = LayerPlan.from_kept(4, [0, 2])  # blocks {0,1}, {2,3}
    student, teacher = _stand_in_case(ck, plan)
    rng = np.random.RandomState(4)
    batch = pack_rows([rng.randint(0, ck.config.vocab_size, 12) for _ in range(6)], seq_len=24, rows=3)
    # text the teacher predicts well: its own greedy next tokens (a random teacher is no better than chance on
    # random text, where a broken layer need not look worse)
    out = forward(teacher[1], teacher[0], batch["tokens"], segment_ids=batch["segment_ids"],
                  positions=batch["positions"])
    batch["targets"] = np.asarray(out.logits.argmax(-1), np.int32)
    scores = block_scores(student, teacher, plan, [batch])
    # block 0's stand-in is exact, so the teacher with it swapped in scores the teacher's own loss
    assert scores[0] == pytest.approx(perplexity(teacher[1], teacher[0], [batch]).nll, rel=1e-6)
    assert scores[1] > scores[0] + 0.1
    assert by_loss_order(scores) == (1, 0)
    assert by_loss_order({3: 1.0, 1: 2.0, 2: 1.0}) == (1, 2, 3)  # ties by block id
    with pytest.raises(ValueError, match="at least one calibration batch"):
        block_scores(student, teacher, plan, [])


def _reference_kl(model, teacher, batch) -> float:
    """Mean KL(teacher || model) per loss token from full logits: the straightforward computation."""
    def logp(m):
        out = forward(m[1], m[0], batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        return np.asarray(jax.nn.log_softmax(np.asarray(out.logits, np.float64), -1))
    lt, lm = logp(teacher), logp(model)
    kl = np.sum(np.exp(lt) * (lt - lm), -1)
    mask = batch["loss_mask"].astype(np.float64)
    return float(np.sum(kl * mask) / np.sum(mask))


def test_kl_greedy_order_patches_at_each_step_the_block_that_brings_the_model_closest_to_the_teacher(tiny):
    from boomerang_jax.surgery.orders import kl_greedy_order
    from boomerang_jax.surgery import LayerPlan, interpolate, patched_for, prune

    _, ck = tiny
    # an 8-layer teacher (the tiny model's layers, then the same in reverse) and a 4-layer student whose layers
    # are damaged by different amounts, so the KL of every patched set differs
    t_config = ck.config.replace(num_layers=2 * ck.config.num_layers)
    t_params = dict(jax.tree.map(np.array, ck.params))
    t_params["layers"] = jax.tree.map(lambda x: np.concatenate([x, x[::-1]]), t_params["layers"])
    teacher = (t_config, t_params)
    plan = LayerPlan.from_kept(8, [0, 2, 4, 6])
    s_config, s_params = prune(t_params, t_config, plan)
    s_params = jax.tree.map(np.array, s_params)
    rng = np.random.RandomState(5)
    for layer, scale in enumerate([0.3, 2.0, 0.05, 0.8]):
        kernel = s_params["layers"]["mlp"]["down_proj"]["kernel"]
        kernel[layer] += scale * rng.standard_normal(kernel[layer].shape).astype(kernel.dtype)
    student = (s_config, s_params)
    batch = pack_rows([rng.randint(0, ck.config.vocab_size, n) for n in (11, 7, 14, 9, 12, 6)], seq_len=24, rows=3)

    order, steps = kl_greedy_order(student, teacher, plan, [batch], chunk=8)

    # brute force with the reference KL: at each step, the candidate with the lowest KL
    chosen: list[int] = []
    for step in steps:
        rest = [b for b in plan.multi_layer_blocks if b not in chosen]
        kls = {c: _reference_kl(interpolate(student, teacher, plan,
                                            patched_for(plan, chosen + [c] + [b for b in rest if b != c],
                                                        len(chosen) + 1)), teacher, batch) for c in rest}
        best = min(kls, key=kls.get)
        assert step["block"] == best
        assert step["kl"] == pytest.approx(kls[best], rel=1e-3, abs=1e-6)
        assert step["num_layers"] == 4 + len(chosen) + 1  # each patched block adds one layer
        chosen.append(best)
    assert order[0] == 1  # the most damaged stand-in goes first
    assert sorted(order) == list(plan.multi_layer_blocks) and len(steps) == len(order) - 1
    assert [s["kl"] for s in steps] == sorted((s["kl"] for s in steps), reverse=True)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        kl_greedy_order(student, teacher, plan, [])


def test_interpolate_orders_from_calibration_text_are_recorded_in_the_family(tmp_path, capsys):
    import json as _json

    from boomerang_jax.cli import main as cli_main
    from boomerang_jax.surgery.family_export import plan_files
    from boomerang_jax.hf.export import save_hf
    from boomerang_jax.surgery import LayerPlan, patched_for

    words = WORDS
    word_model(tmp_path / "m", num_layers=4)
    ck = load_hf(tmp_path / "m", to_device=False)
    plan = LayerPlan.from_kept(4, [0, 2])
    (s_cfg, s_params), (t_cfg, t_params) = _stand_in_case(ck, plan)
    save_hf(tmp_path / "teacher", t_cfg, t_params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files)
    save_hf(tmp_path / "student", s_cfg, s_params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files,
            extra_files=plan_files(plan))
    (tmp_path / "calib").mkdir()
    rng = np.random.RandomState(0)
    for i in range(6):
        (tmp_path / "calib" / f"{i}.txt").write_text(" ".join(rng.choice(words, 12)))
    common = ["interpolate", "--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher")]
    assert cli_main(common + ["--order", "by-loss", "--calib", str(tmp_path / "calib"),
                              "--out", str(tmp_path / "fam")]) == 0
    family = _json.loads((tmp_path / "fam" / "family.json").read_text())
    assert (family["order"], family["patch_order"]) == ("custom", [1, 0])
    assert [sorted(s["patched"]) for s in family["sizes"]] == [sorted(patched_for(plan, [1, 0], k)) for k in (0, 1, 2)]
    assert "calibration NLL" in capsys.readouterr().out
    assert cli_main(common + ["--order", "kl-greedy", "--calib", str(tmp_path / "calib"),
                              "--out", str(tmp_path / "fam-kl")]) == 0
    assert _json.loads((tmp_path / "fam-kl" / "family.json").read_text())["patch_order"] == [1, 0]
    assert "KL to the teacher" in capsys.readouterr().out
    assert cli_main(common + ["--order", "0,1", "--out", str(tmp_path / "fam2")]) == 0
    assert _json.loads((tmp_path / "fam2" / "family.json").read_text())["patch_order"] == [0, 1]
    capsys.readouterr()
    assert cli_main(common + ["--order", "by-loss", "--out", str(tmp_path / "fam3")]) != 0
    assert "needs --calib" in capsys.readouterr().err
    assert cli_main(common + ["--order", "0", "--out", str(tmp_path / "fam3")]) != 0
    assert "block(s) [1] are missing" in capsys.readouterr().err
    assert not (tmp_path / "fam3").exists()


def test_perplexity_rows_keep_what_a_paired_comparison_needs(tiny):
    from boomerang_jax.eval.perplexity import paired_bootstrap, perplexity_rows

    _, ck = tiny
    rng = np.random.RandomState(2)
    # documents fill rows 0-2; row 3 holds no tokens and is left out of the rows kept
    batch = pack_rows([rng.randint(0, ck.config.vocab_size, n) for n in (9, 6, 11, 4, 7)], seq_len=16, rows=4)
    res, sums, counts = perplexity_rows(ck.params, ck.config, [batch], chunk=8)
    assert res == perplexity(ck.params, ck.config, [batch], chunk=8)
    assert len(sums) == len(counts) == res.rows == 3 and counts.sum() == res.tokens
    assert sums.sum() / counts.sum() == pytest.approx(res.nll, rel=1e-6)
    same = paired_bootstrap(sums, counts, sums, counts)
    assert (same.diff, same.ci_low, same.ci_high, same.significant) == (0.0, 0.0, 0.0, False)

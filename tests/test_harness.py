"""lm-evaluation-harness runs unchanged on an exported model, offline, with a local task; scores are right."""

from __future__ import annotations

import argparse
import csv

import jax.numpy as jnp
import numpy as np
import pytest

from boomerang_jax.commands.lm_eval import lm_eval_command
from boomerang_jax.eval.harness import (
    cloze_questions,
    merge_into_csv,
    run_harness,
    write_multiple_choice_task,
)
from boomerang_jax.hf.export import save_hf
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import forward, init_params

pytest.importorskip("lm_eval")

TEXT = """The quick brown fox jumps over the lazy sleeping dog tonight. A small green frog sat quietly on the
floating water lily. Every morning the old baker sells fresh bread to the village. The tired children walked
home slowly after the long football match. My neighbour plants bright yellow flowers along the garden fence.
The captain steered the wooden ship through the stormy northern waters. Our teacher explained the difficult
lesson again with great patience. The hungry cat waited beside the kitchen door for dinner."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for w in TEXT.replace(".", " . ").split()})
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=1, bos_token_id=1, tie_word_embeddings=True))
    import jax

    params = jax.tree.map(lambda x: x * 20, init_params(config, jax.random.key(3)))  # confident, non-uniform
    out = save_hf(tmp_path_factory.mktemp("exp") / "tiny", config, params, tokenizer_files=files)
    return out, config, params, fast


def _our_choice(config, params, tok, context: str, choices: list[str]) -> int:
    scores = []
    for choice in choices:
        ctx = tok(context)["input_ids"]
        whole = tok(context + " " + choice)["input_ids"]
        logits = np.asarray(forward(params, config, jnp.asarray([whole])).logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        scores.append(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))
    return int(np.argmax(scores))


def test_local_multiple_choice_task_runs_and_scores_match_our_loglikelihoods(exported, tmp_path):
    out, config, params, tok = exported
    items = cloze_questions([TEXT], 8, seed=1, min_words=6)
    assert len(items) == 8 and all(len(i["choices"]) == 4 for i in items)
    write_multiple_choice_task(tmp_path / "tasks", "boomerang_cloze", items)
    scores = run_harness(out, ["boomerang_cloze"], include_path=tmp_path / "tasks", batch_size=2)
    ours = np.mean([_our_choice(config, params, tok, i["context"], i["choices"]) == i["label"] for i in items])
    assert scores["boomerang_cloze"]["acc"] == pytest.approx(ours)
    assert "acc_stderr" in scores["boomerang_cloze"]


def test_lm_eval_command_adds_scores_to_results_csv(exported, tmp_path):
    out, *_ = exported
    write_multiple_choice_task(tmp_path / "tasks", "boomerang_cloze", cloze_questions([TEXT], 4, min_words=6))
    results = tmp_path / "results.csv"
    merge_into_csv(results, [{"dir": out.name, "perplexity": 12.5}])
    args = argparse.Namespace(family_dir=str(out), tasks="boomerang_cloze", include_path=str(tmp_path / "tasks"),
                              batch_size=2, limit=None, device="cpu", results_csv=str(results))
    assert lm_eval_command(args) == 0
    rows = list(csv.DictReader(results.open()))
    assert len(rows) == 1 and rows[0]["perplexity"] == "12.5"
    assert 0.0 <= float(rows[0]["boomerang_cloze/acc"]) <= 1.0

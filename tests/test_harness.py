"""lm-evaluation-harness runs unchanged on an exported model, offline, with a local task; scores are right; `boomerang
lm-eval` over a family builds sizes in memory, records each (size, task) as it finishes and resumes."""

from __future__ import annotations

import argparse
import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from boomerang_jax import cli  # noqa: E402
from boomerang_jax.commands.lm_eval import lm_eval_command  # noqa: E402
from boomerang_jax.eval import lm_runs  # noqa: E402
from boomerang_jax.eval.harness import (  # noqa: E402
    cloze_questions,
    merge_into_csv,
    run_harness,
    write_multiple_choice_task,
    write_perplexity_task,
)
from boomerang_jax.hf.export import save_hf  # noqa: E402
from boomerang_jax.hf.load import load_hf  # noqa: E402
from boomerang_jax.models.config import ModelConfig  # noqa: E402
from boomerang_jax.models.transformer import forward, init_params  # noqa: E402
from boomerang_jax.surgery import LayerPlan, prune  # noqa: E402
from boomerang_jax.surgery import compact as cf  # noqa: E402
from boomerang_jax.surgery import family_export as fam  # noqa: E402
from tests.conftest import WORDS_TEXT, build_hf_model, word_tokenizer  # noqa: E402

TEXT = WORDS_TEXT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    fast = word_tokenizer()
    vocab = fast.get_vocab()
    d = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(d)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    config = ModelConfig.from_hf(dict(model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=1, bos_token_id=1, tie_word_embeddings=True))
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


# ------------------------------------------------------------------------------ families, resumable runs
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A 6-layer teacher and its perturbed 4-layer student (sizes 4, 5, 6 layers), exported as a compact and as
    a full family, with a word tokenizer; and local tasks: cloze questions and a perplexity task."""
    root = tmp_path_factory.mktemp("family")
    build_hf_model(dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                        eos_token_id=1, bos_token_id=1), seed=4, scale=0.5).save_pretrained(root / "teacher")
    word_tokenizer().save_pretrained(root / "teacher")
    t = load_hf(root / "teacher", to_device=False)
    plan = LayerPlan.from_knobs(6)
    s_config, s_params = prune(t.params, t.config, plan)
    rng = np.random.RandomState(1)
    s_params = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), s_params)
    save_hf(root / "student", s_config, s_params, hf_config=t.hf_config, tokenizer_files=t.tokenizer_files,
            extra_files=fam.plan_files(plan))
    student, teacher = (cf.open_hf_source(root / n) for n in ("student", "teacher"))
    fam.export_family(student, teacher, root / "full")
    cf.export_compact_family(student, teacher, root / "compact")
    write_multiple_choice_task(root / "tasks", "fam_cloze", cloze_questions([TEXT], 5, seed=3, min_words=6))
    write_perplexity_task(root / "tasks", "fam_ppl", [s.strip() + "." for s in TEXT.split(".")[:3]])
    return root


def _lm_eval(*args):
    return cli.main(["lm-eval", *map(str, args)])


def _csv(path):
    return {r["dir"]: r for r in csv.DictReader(path.open())}


def test_compact_family_in_memory_scores_equal_the_hf_model_on_the_full_export(family, tmp_path):
    """Sizes without copies: our backend builds each size of the compact family in memory (nothing written
    there but results) and scores it as the harness's `hf` model scores the full export's directories."""
    before = sorted(p.relative_to(family / "compact") for p in (family / "compact").rglob("*"))
    ours, ref = tmp_path / "ours.csv", tmp_path / "ref.csv"
    tasks = ("--tasks", "fam_cloze,fam_ppl", "--include-path", family / "tasks", "--batch-size", 4)
    assert _lm_eval(family / "compact", *tasks, "--results-csv", ours) == 0
    assert _lm_eval(family / "full", *tasks, "--backend", "hf", "--results-csv", ref) == 0
    assert sorted(p.relative_to(family / "compact") for p in (family / "compact").rglob("*")) == before
    a, b = _csv(ours), _csv(ref)
    assert list(a) == [s["dir"] for s in fam.read_family(family / "full")["sizes"]] == list(b) and len(a) == 3
    for d in a:
        assert a[d]["fam_cloze/acc"] == b[d]["fam_cloze/acc"]
        assert float(a[d]["fam_ppl/word_perplexity"]) == pytest.approx(float(b[d]["fam_ppl/word_perplexity"]),
                                                                        rel=1e-5)
    # the sizes differ from each other, so the comparison would see a size built wrong
    assert len({a[d]["fam_ppl/word_perplexity"] for d in a}) == 3
    full = json.loads((tmp_path / "ours" / f"{list(a)[0]}.json").read_text())
    assert set(full) == {"fam_cloze", "fam_ppl"} and "configs" in full["fam_cloze"]


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def test_a_killed_run_keeps_whole_rows_and_a_rerun_does_only_what_is_left(family, tmp_path, monkeypatch):
    out = tmp_path / "lm_eval.csv"
    calls, died = [], []
    real = lm_runs.harness_output

    def dies_on_the_fourth(model, tasks, **kw):
        calls.append(tasks[0])
        if len(calls) == 4 and not died:
            died.append(True)
            raise Killed  # a kill in the middle of the second size
        return real(model, tasks, **kw)

    monkeypatch.setattr(lm_runs, "harness_output", dies_on_the_fourth)
    args = ("--tasks", "fam_cloze,fam_ppl", "--include-path", family / "tasks", "--results-csv", out, "--limit", 3,
            "--num-fewshot", 1)
    with pytest.raises(Killed):
        _lm_eval(family / "compact", *args)
    rows = [json.loads(line) for line in (tmp_path / "lm_eval.jsonl").read_text().splitlines()]
    assert [(r["dir"], r["task"]) for r in rows] == [("k0-4L", "fam_cloze"), ("k0-4L", "fam_ppl"),
                                                     ("k1-5L", "fam_cloze")]
    assert rows[0]["settings"] == {"backend": "boomerang", "num_fewshot": 1, "limit": 3, "dtype": "float32"}
    table = _csv(out)
    assert list(table) == ["k0-4L", "k1-5L"] and table["k1-5L"]["fam_ppl-1shot/word_perplexity"] == ""
    assert 0 <= float(table["k1-5L"]["fam_cloze-1shot/acc"]) <= 1
    assert not list(tmp_path.glob(".*tmp*")), "a temporary file was left behind"
    calls.clear()
    assert _lm_eval(family / "compact", *args) == 0
    assert calls == ["fam_ppl", "fam_cloze", "fam_ppl"]  # k1-5L's ppl, then k2-6L
    table = _csv(out)
    assert list(table) == ["k0-4L", "k1-5L", "k2-6L"]
    assert all(r["fam_ppl-1shot/word_perplexity"] for r in table.values())
    calls.clear()
    assert _lm_eval(family / "compact", *args) == 0 and calls == []  # everything done
    assert _lm_eval(family / "compact", *args[:-2]) == 0 and len(calls) == 6  # other settings: run again
    assert "fam_cloze/acc" in _csv(out)["k0-4L"]


def test_hf_backend_on_a_compact_family_materialises_each_size_to_a_temporary_directory(family, tmp_path):
    """`--backend hf` on a compact family: each size is written to a temporary directory for the harness's `hf`
    model and removed after; the scores equal the full export's."""
    before = sorted(p.relative_to(family / "compact") for p in (family / "compact").rglob("*"))
    tasks = ("--tasks", "fam_ppl", "--include-path", family / "tasks", "--backend", "hf", "--limit", 2)
    assert _lm_eval(family / "compact", *tasks, "--results-csv", tmp_path / "c.csv") == 0
    assert _lm_eval(family / "full", *tasks, "--results-csv", tmp_path / "f.csv") == 0
    assert sorted(p.relative_to(family / "compact") for p in (family / "compact").rglob("*")) == before
    c, f = _csv(tmp_path / "c.csv"), _csv(tmp_path / "f.csv")
    assert list(c) == list(f) and len(c) == 3
    assert [c[d]["fam_ppl/word_perplexity"] for d in c] == [f[d]["fam_ppl/word_perplexity"] for d in f]

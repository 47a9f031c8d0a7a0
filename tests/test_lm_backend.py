"""Our JAX lm-eval model (`boomerang`) equals the harness's own `hf` model on the same exported size: every
request of a multiple-choice, a perplexity (loglikelihood_rolling, several windows) and a generate_until task
with stop sequences, for a tied and an untied tiny model, in float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from boomerang_jax.eval.harness import (  # noqa: E402
    cloze_questions,
    harness_output,
    write_generation_task,
    write_multiple_choice_task,
    write_perplexity_task,
)
from boomerang_jax.eval.lm_backend import BoomerangLM, bucket  # noqa: E402
from tests.conftest import TINY_CONFIGS, WORDS_TEXT, build_hf_model, word_tokenizer  # noqa: E402

TEXT = WORDS_TEXT
SENTENCES = [s.strip() for s in TEXT.replace("\n", " ").split(".") if s.strip()]
TASKS = ["bm_cloze", "bm_ppl", "bm_gen"]
MAX_LENGTH = 16  # short, so perplexity texts span several rolling windows and long contexts are truncated
LL_TOL = 2e-4  # |ours - hf| per loglikelihood (nats), float32; seen: ~1e-5


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    write_multiple_choice_task(d, "bm_cloze", cloze_questions([TEXT], 6, seed=2, min_words=6))
    write_perplexity_task(d, "bm_ppl", [s + "." for s in SENTENCES[:4]])
    gen = [{"context": " ".join(s.split()[:n]), "answer": " ".join(s.split()[n:n + 2])}
           for s, n in zip(SENTENCES[:5], (3, 4, 3, 5, 2))]
    write_generation_task(d, "bm_gen", gen, until=[".", "the", "a"], max_gen_toks=6)
    return d


def tiny_dir(root, name: str, seed: int):
    """A tiny HF directory (torch weights, our word tokenizer; eos = bos = 1) of TINY_CONFIGS[name]."""
    tok = word_tokenizer()
    spec = dict(TINY_CONFIGS[name], eos_token_id=1, bos_token_id=1)
    assert spec["vocab_size"] >= len(tok)
    model = build_hf_model(spec, seed, scale=0.5)
    out = root / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _resps(out, task):
    return {s["doc_id"]: s["filtered_resps"] for s in out["samples"][task]}


@pytest.mark.parametrize("name", ["qwen3-gqa2-tied", "llama-mha-untied-bias-headdim"])
def test_boomerang_equals_hf_backend_on_every_output_type(name, tasks, tmp_path):
    d = tiny_dir(tmp_path, name, seed=len(name))
    common = dict(include_path=tasks, log_samples=True, batch_size=3)
    ref = harness_output(str(d), TASKS, max_length=MAX_LENGTH, **common)
    lm = BoomerangLM(pretrained=str(d), batch_size=3, max_length=MAX_LENGTH)
    ours = harness_output(lm, TASKS, **common)
    # multiple choice: every choice's loglikelihood and greediness
    a, b = _resps(ref, "bm_cloze"), _resps(ours, "bm_cloze")
    assert a.keys() == b.keys() and len(a) == 6
    ll_ref = np.array([[r[0] for r in a[k]] for k in sorted(a)])
    ll_our = np.array([[r[0] for r in b[k]] for k in sorted(a)])
    assert np.abs(ll_ref - ll_our).max() < LL_TOL
    assert [[r[1] for r in a[k]] for k in sorted(a)] == [[r[1] for r in b[k]] for k in sorted(a)]
    assert ours["results"]["bm_cloze"]["acc,none"] == ref["results"]["bm_cloze"]["acc,none"]
    # perplexity over several windows of MAX_LENGTH tokens
    a, b = _resps(ref, "bm_ppl"), _resps(ours, "bm_ppl")
    diff = max(abs(a[k][0] - b[k][0]) for k in a)
    assert diff < LL_TOL and all(a[k][0] < -10 for k in a)  # real sums over many tokens
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["bm_ppl"][metric] == pytest.approx(ref["results"]["bm_ppl"][metric], rel=1e-5)
    # generation: the same strings, cut at the same stop sequences
    a, b = _resps(ref, "bm_gen"), _resps(ours, "bm_gen")
    assert a == b and len(a) == 5
    assert any(r[0] for r in a.values()), "every generation is empty: the test would not see a difference"
    # few programs: one per length bucket for loglikelihoods, one per prompt length for generation
    kinds = [p[0] for p in lm.programs]
    assert kinds.count("score") <= 2 and kinds.count("generate") <= 5
    assert lm.compiles > 0


def test_the_equality_check_sees_a_different_model(tasks, tmp_path):
    """The comparison can fail: another model's loglikelihoods differ far beyond the tolerance."""
    d = tiny_dir(tmp_path / "a", "qwen3-gqa2-tied", seed=1)
    other = tiny_dir(tmp_path / "b", "qwen3-gqa2-tied", seed=2)
    ref = harness_output(str(d), ["bm_cloze"], include_path=tasks, log_samples=True, max_length=MAX_LENGTH)
    ours = harness_output(BoomerangLM(pretrained=str(other), max_length=MAX_LENGTH), ["bm_cloze"],
                          include_path=tasks, log_samples=True)
    a, b = _resps(ref, "bm_cloze"), _resps(ours, "bm_cloze")
    assert max(abs(x[0] - y[0]) for k in a for x, y in zip(a[k], b[k])) > 100 * LL_TOL


def test_buckets_are_powers_of_two_within_max_length():
    assert [bucket(n, 2048) for n in (1, 16, 17, 33, 1000, 2048)] == [16, 16, 32, 64, 1024, 2048]
    assert bucket(20, 24) == 24


def test_rows_split_over_local_devices_give_the_same_scores(tasks, tmp_path):
    """Data parallel: on 2 forced CPU devices (a subprocess) the scores and generations equal one device's."""
    d = tiny_dir(tmp_path, "llama-mha-untied-bias-headdim", seed=3)
    script = textwrap.dedent(f"""
        import json, jax
        from boomerang_jax.eval.harness import harness_output
        from boomerang_jax.eval.lm_backend import BoomerangLM
        TASKS = {TASKS!r}
        lm = BoomerangLM(pretrained={str(d)!r}, batch_size=3, max_length={MAX_LENGTH})
        out = harness_output(lm, TASKS, include_path={str(tasks)!r}, log_samples=True)
        print("RESULT", json.dumps([len(jax.devices()), lm.batch, out["samples"]["bm_ppl"][0]["filtered_resps"],
                                    out["results"]["bm_cloze"]["acc,none"],
                                    [s["filtered_resps"] for s in out["samples"]["bm_gen"]]]))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_dev, batch, ppl, acc, gen = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert n_dev == 2 and batch == 4  # 3 rows rounded up to a multiple of the devices
    lm = BoomerangLM(pretrained=str(d), batch_size=3, max_length=MAX_LENGTH)
    out = harness_output(lm, TASKS, include_path=tasks, log_samples=True)
    assert abs(out["samples"]["bm_ppl"][0]["filtered_resps"][0] - ppl[0]) < LL_TOL
    assert out["results"]["bm_cloze"]["acc,none"] == acc
    assert [s["filtered_resps"] for s in out["samples"]["bm_gen"]] == gen

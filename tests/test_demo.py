"""`boomerang demo --quick` runs every stage end to end on the real embedded teacher; outputs are well formed."""

from __future__ import annotations

import csv
import json

import pytest

from boomerang_jax.cli import main as cli_main
from boomerang_jax.demo.settings import METHODS, STAGES

pytestmark = pytest.mark.slow


def test_quick_demo_writes_every_output_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out)]) == 0
    printed, progress = capsys.readouterr()
    for stage in STAGES:  # every stage says how long it should take before it starts
        assert f"[demo] {stage}: starting, expected ~" in printed
    for bar in ("teacher text", "kl-greedy order", "family export", "eval"):  # the long loops' ETAs, on stderr
        assert f"[demo] {bar}: 100%" in progress
    assert "\r" not in progress.split("distill:")[0].rstrip("\r")  # into a log: one line per redraw
    assert "[demo] compute dtype: " in printed  # auto, resolved and said
    settings = json.loads((out / "settings.json").read_text())
    assert settings["compute_dtype"] in ("float32", "bfloat16")
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == list(STAGES)
    assert stages["data"]["teacher_text"]["dtype"] == "float32"  # sampled in float32 whatever the compute dtype
    family = json.loads((out / "family" / "family.json").read_text())
    sizes = [s["num_layers"] for s in family["sizes"]]
    assert sizes[0] == 16 and sizes[-1] == 30
    # the default order is chosen on calibration text (KLPatch): every multi-layer block once, each greedy step
    # recorded with the size it gives
    assert (family["order"], sorted(family["patch_order"])) == ("custom", list(range(14)))
    steps = stages["family"]["kl_steps"]
    assert [st["block"] for st in steps] == family["patch_order"][:13]
    assert [st["num_layers"] for st in steps] == list(range(17, 30)) and all(st["kl"] >= 0 for st in steps)
    for s in family["sizes"]:
        assert (out / "family" / s["dir"] / "config.json").exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [int(r["num_layers"]) for r in rows] == sizes
    for r in rows:
        for m in METHODS:
            for text in ("", "shakespeare:"):  # the second held-out text's columns are prefixed
                lo, ppl, hi = (float(r[f"{text}{m}/{k}"]) for k in ("ci_low", "perplexity", "ci_high"))
                assert 1.0 < lo <= ppl <= hi
    # boomerang vs each baseline at the middle size: a paired interval around the log-perplexity difference
    for text in ("", "shakespeare:"):
        for m in ("naive-pruning", "shortgpt"):
            lo, d, hi = (float(rows[1][f"{text}vs-{m}/{k}"]) for k in ("diff_low", "logppl_diff", "diff_high"))
            assert lo <= d <= hi and rows[1][f"{text}vs-{m}/significant"] == str(lo > 0 or hi < 0).lower()
    # the paper's fixed order is evaluated alongside at the middle size
    assert float(rows[1]["boomerang-last-to-first/perplexity"]) > 1.0
    # patching every block gives back the teacher: all three methods coincide at full depth
    assert len({rows[-1][f"{m}/perplexity"] for m in METHODS}) == 1
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 2 * (len(sizes) + 1) and "Boomerang" in md  # one table per held-out text
    assert "- On wiki: Boomerang" in md and "- On shakespeare: Boomerang" in md
    assert md.count("layers vs naive-pruning: boomerang") == 2 and "significant" in md
    evals = {t: [json.loads(x) for x in (out / f).read_text().splitlines()]
             for t, f in (("wiki", "eval.jsonl"), ("shakespeare", "eval-shakespeare.jsonl"))}
    for t, ev in evals.items():
        assert len(ev) == 3 * len(sizes) + 1 and {r["text"] for r in ev} == {t}
        for r in ev:  # per-row NLL sums and token counts, kept for the paired comparisons
            assert len(r["row_nll"]) == len(r["row_tokens"]) == r["rows"] and sum(r["row_tokens"]) == r["tokens"]
    assert (out / "family.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "verify.txt").read_text().startswith("OK:")
    assert (out / "distill" / "metrics.jsonl").exists()
    # the teacher wrote part of the training text: a jsonl file, prepared and mixed into the training data
    text = stages["data"]["teacher_text"]
    lines = (out / "data" / "teacher-text.jsonl").read_text().splitlines()
    assert text["documents"] == len(lines) > 0 and all(json.loads(x)["text"].strip() for x in lines)
    assert text["meta"]["splits"]["train"]["num_docs"] == len(lines)
    capsys.readouterr()
    assert cli_main(["demo", "--quick", "--out", str(out)]) == 0  # a rerun skips every finished stage
    assert capsys.readouterr().out.count("done already") == len(STAGES)
    # resuming eval: the last two shakespeare rows lost, one wiki row written before rows kept row stats (no
    # row_nll, no text): exactly those three are evaluated again, and the report is rebuilt from every row
    wiki, plays = out / "eval.jsonl", out / "eval-shakespeare.jsonl"
    old_wiki, old_plays = wiki.read_text().splitlines(), plays.read_text().splitlines()
    legacy = {k: v for k, v in json.loads(old_wiki[0]).items() if k not in ("row_nll", "row_tokens", "text")}
    wiki.write_text("\n".join([json.dumps(legacy)] + old_wiki[1:]) + "\n")
    plays.write_text("\n".join(old_plays[:-2]) + "\n")
    stages = json.loads((out / "stages.json").read_text())
    (out / "stages.json").write_text(json.dumps({k: v for k, v in stages.items() if k not in ("eval", "report")}))
    capsys.readouterr()
    assert cli_main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    n = 2 * (3 * len(sizes) + 1)
    assert f"eval: 3 evaluations to run ({n - 3} done already)" in printed
    assert plays.read_text().splitlines()[:-2] == old_plays[:-2]
    again = [json.loads(x) for x in wiki.read_text().splitlines()]
    assert len(again) == len(old_wiki) + 1 and again[-1]["perplexity"] == pytest.approx(legacy["perplexity"])
    assert [json.loads(x)["perplexity"] for x in plays.read_text().splitlines()[-2:]] == \
        [json.loads(x)["perplexity"] for x in old_plays[-2:]]
    assert (out / "results.md").read_text() == md
    with pytest.raises(ValueError, match="other settings"):
        from boomerang_jax.demo.run import DemoSettings, run_demo

        run_demo(DemoSettings.quick_settings(out=str(out), steps=4))


def test_compute_dtype_auto_keeps_a_runs_own_dtype_and_refuses_another(tmp_path):
    import dataclasses

    from boomerang_jax.demo.run import _resolve_dtype, run_demo
    from boomerang_jax.demo.settings import DemoSettings

    assert _resolve_dtype(DemoSettings(compute_dtype="float32"), {"compute_dtype": "bfloat16"}).compute_dtype == \
        "float32"
    assert _resolve_dtype(DemoSettings(), {"compute_dtype": "bfloat16"}).compute_dtype == "bfloat16"
    assert _resolve_dtype(DemoSettings(), None).compute_dtype in ("float32", "bfloat16")  # this machine's
    with pytest.raises(ValueError, match="compute_dtype"):
        DemoSettings(compute_dtype="fp16")
    # a run begun before the setting existed ran in float32: bfloat16 is another setting, refused untouched
    out = tmp_path / "old"
    out.mkdir()
    legacy = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(DemoSettings(out=str(out))))).items()
              if k != "compute_dtype"}
    (out / "settings.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="other settings"):
        run_demo(DemoSettings(out=str(out), compute_dtype="bfloat16"))
    assert json.loads((out / "settings.json").read_text()) == legacy

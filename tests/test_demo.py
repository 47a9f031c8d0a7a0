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
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == list(STAGES)
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
            lo, ppl, hi = (float(r[f"{m}/{k}"]) for k in ("ci_low", "perplexity", "ci_high"))
            assert 1.0 < lo <= ppl <= hi
    # the paper's fixed order is evaluated alongside at the middle size
    assert float(rows[1]["boomerang-last-to-first/perplexity"]) > 1.0
    # patching every block gives back the teacher: all three methods coincide at full depth
    assert len({rows[-1][f"{m}/perplexity"] for m in METHODS}) == 1
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(sizes) + 1 and "Boomerang" in md
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
    with pytest.raises(ValueError, match="other settings"):
        from boomerang_jax.demo.run import DemoSettings, run_demo

        run_demo(DemoSettings.quick_settings(out=str(out), steps=4))

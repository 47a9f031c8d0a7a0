"""The family as a product: a compact family (teacher + student), any size materialised on demand (files and
logits equal to the full export's), sizes in memory (JAX params, a standard transformers model), picking a size
for a budget, model cards, and the upload plan."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from boomerang_jax import cli
from boomerang_jax.commands import family as fam_cli
from boomerang_jax.hf.export import save_hf
from boomerang_jax.hf.load import load_hf
from boomerang_jax.hf.verify import verify_export
from boomerang_jax.surgery import LayerPlan, Model, interpolate, patched_for, prune
from boomerang_jax.surgery import compact as cf
from boomerang_jax.surgery import family_export as fam
from boomerang_jax.surgery import pick as picking
from boomerang_jax.surgery.model_card import front_matter
from tests.conftest import EIGHT_LAYER_CONFIGS, build_hf_model, torch_logits

PLAN = LayerPlan.from_knobs(8)  # blocks {0,1},{2,3},{4,5},{6},{7}: sizes 5, 6, 7, 8 layers
TOKENS = np.random.RandomState(0).randint(0, 64, (2, 7))
NAMES = ("llama-tied", "qwen3-untied")


def files_of(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """name -> (root, student Model, teacher Model): teacher + perturbed pruned student, exported as a full
    family (every size, last-to-first) and as a compact one, under root/full and root/compact."""
    out = {}
    for name in NAMES:
        root = tmp_path_factory.mktemp(name)
        build_hf_model(EIGHT_LAYER_CONFIGS[name], seed=3).save_pretrained(root / "teacher")
        (root / "teacher" / "README.md").write_text("---\nlicense: mit\ntags:\n- x\n---\n# teacher\n")
        t = load_hf(root / "teacher", to_device=False)
        s_config, s_params = prune(t.params, t.config, PLAN)
        rng = np.random.RandomState(1)
        s_params = jax.tree.map(lambda x, r=rng: np.asarray(x) + 0.05 * r.standard_normal(x.shape).astype(x.dtype),
                                s_params)
        save_hf(root / "student", s_config, s_params, hf_config=t.hf_config, extra_files=fam.plan_files(PLAN))
        student, teacher = fam_cli.open_source(root / "student"), fam_cli.open_source(root / "teacher")
        fam.export_family(student, teacher, root / "full")
        cf.export_compact_family(student, teacher, root / "compact")
        out[name] = (root, Model(s_config, s_params), Model(t.config, t.params))
    return out


# ------------------------------------------------------------------------------------ compact + materialise
@pytest.mark.parametrize("name", NAMES)
def test_compact_family_stores_teacher_and_student_once_and_lists_every_size(families, name):
    root, _, _ = families[name]
    full = json.loads((root / "full" / "family.json").read_text())
    compact = json.loads((root / "compact" / "family.json").read_text())
    assert sorted(p.name for p in (root / "compact").iterdir()) == ["README.md", "family.json", "student", "teacher"]
    assert compact["compact"] is True and compact["stored"] == {"student": "student", "teacher": "teacher"}
    assert compact["sizes"] == full["sizes"] and compact["patch_order"] == full["patch_order"]
    assert compact["plan"] == PLAN.to_dict()
    assert (root / "compact" / "student" / "boomerang_plan.json").exists()
    full_bytes = sum((root / "full" / f).stat().st_size for f in files_of(root / "full"))
    compact_bytes = sum((root / "compact" / f).stat().st_size for f in files_of(root / "compact"))
    assert compact_bytes < 0.6 * full_bytes  # 4 sizes (5+6+7+8 layers) vs 5 + 8 layers


@pytest.mark.parametrize("name", NAMES)
def test_every_size_materialised_from_the_compact_family_equals_the_full_export_file_for_file(families, name,
                                                                                              tmp_path):
    root, _, _ = families[name]
    full = json.loads((root / "full" / "family.json").read_text())
    for size in full["sizes"]:
        out = tmp_path / size["dir"]
        entry = cf.materialise_size(root / "compact", out, size["patched"])
        assert entry == size
        want = root / "full" / size["dir"]
        assert files_of(out) == files_of(want)
        for f in files_of(want):
            assert (out / f).read_bytes() == (want / f).read_bytes(), f
        got = torch_logits(AutoModelForCausalLM.from_pretrained(out).eval(), TOKENS)
        ref = torch_logits(AutoModelForCausalLM.from_pretrained(want).eval(), TOKENS)
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", NAMES)
def test_sizes_in_memory_equal_the_full_export_as_jax_params_and_as_a_transformers_model(families, name):
    root, _, _ = families[name]
    for source in ("compact", "full"):
        for k in (1, 2):
            size = json.loads((root / "full" / "family.json").read_text())["sizes"][k]
            model = cf.build_size(root / source, k=k)
            reloaded = load_hf(root / "full" / size["dir"], to_device=False)
            assert model.config == reloaded.config
            for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reloaded.params)):
                np.testing.assert_array_equal(a, b)
            hf = cf.to_transformers(model)
            assert type(hf).__name__ == json.loads((root / "full" / size["dir"] / "config.json").read_text())[
                "architectures"][0]
            ref = AutoModelForCausalLM.from_pretrained(root / "full" / size["dir"]).eval()
            np.testing.assert_array_equal(torch_logits(hf, TOKENS), torch_logits(ref, TOKENS))


def test_any_patched_set_materialises_from_a_full_family_and_equals_in_memory_interpolation(families, tmp_path):
    root, student, teacher = families["llama-tied"]
    assert cf.open_family(root / "full").step_of(frozenset({0})) is None  # not a last-to-first step
    assert cli.main(["materialise", str(root / "full"), "--patched", "0", "--out", str(tmp_path / "p")]) == 0
    expected = interpolate(student, teacher, PLAN, {0})
    got = load_hf(tmp_path / "p", to_device=False)
    assert got.config == expected.config
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    record = json.loads((tmp_path / "p" / fam.SIZE_FILE).read_text())
    assert record["dir"] == "p0-6L" and record["k"] is None and record["patched"] == [0]
    assert verify_export(tmp_path / "p", num_sequences=1, seq_len=8).ok


def test_interpolate_compact_then_materialise_layers_on_the_command_line(families, tmp_path, capsys):
    root, _, _ = families["qwen3-untied"]
    assert cli.main(["interpolate", "--student", str(root / "student"), "--teacher", str(root / "teacher"),
                     "--compact", "--out", str(tmp_path / "fam")]) == 0
    assert cli.main(["materialise", str(tmp_path / "fam"), "--layers", "7", "--out", str(tmp_path / "7L")]) == 0
    full = root / "full" / "k2-7L"
    assert (tmp_path / "7L" / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    card = (tmp_path / "7L" / "README.md").read_text()
    assert "`boomerang materialise " in card and "--layers 7" in card
    assert verify_export(tmp_path / "7L", num_sequences=1, seq_len=8).ok
    # errors: exit 2 with a one-line message naming the value
    assert cli.main(["materialise", str(tmp_path / "fam"), "--layers", "99", "--out", str(tmp_path / "x")]) == 2
    assert "no size of the family's order has 99 layers (sizes: 5, 6, 7, 8)" in capsys.readouterr().err
    assert cli.main(["materialise", str(tmp_path / "fam"), "--k", "1", "--out", str(tmp_path / "fam")]) == 2
    assert cli.main(["interpolate", "--student", str(root / "student"), "--teacher", str(root / "teacher"),
                     "--compact", "--sizes", "k=1", "--out", str(tmp_path / "fam2")]) == 2


def test_a_full_family_without_its_student_and_teacher_sizes_cannot_build_others(families, tmp_path):
    root, _, _ = families["llama-tied"]
    s, t = fam_cli.open_source(root / "student"), fam_cli.open_source(root / "teacher")
    fam.export_family(s, t, tmp_path / "part", ks=[1, 2])
    with pytest.raises(fam.FamilyError, match=r"needs its student \(k=0\) and teacher \(k=3\) sizes.*k1-6L, k2-7L"):
        cf.open_family(tmp_path / "part")


def test_compact_family_on_a_bucket_materialises_like_a_local_one(families, bucket, tmp_path):
    root, _, _ = families["qwen3-untied"]
    s, t = fam_cli.open_source(root / "student"), fam_cli.open_source(root / "teacher")
    cf.export_compact_family(s, t, f"{bucket}/fam")
    cf.materialise_size(f"{bucket}/fam", tmp_path / "k1", patched_for(PLAN, "last-to-first", 1))
    want = root / "full" / "k1-6L" / "model.safetensors"
    assert (tmp_path / "k1" / "model.safetensors").read_bytes() == want.read_bytes()


# ---------------------------------------------------------------------------------------------- cards
def test_every_exported_size_has_a_model_card_with_hub_front_matter(families):
    root, _, _ = families["llama-tied"]
    family = json.loads((root / "full" / "family.json").read_text())
    for size in family["sizes"]:
        card = (root / "full" / size["dir"] / "README.md").read_text()
        meta = front_matter(card)
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert meta["license"] == "mit"  # from the teacher's own card
        assert "- boomerang-distillation" in card and "arXiv:2510.05064" in card
        assert f"{size['params']['total']:,}" in card and str(family["patch_order"]) in card
    k1 = (root / "full" / family["sizes"][1]["dir"] / "README.md").read_text()
    assert "- layers 0-1: student layers 0-1\n- layers 2-5: teacher layers 4-7\n" in k1
    assert "Patched student layers: [2, 3, 4]; 2 -> teacher 4-5; 3 -> teacher 6; 4 -> teacher 7" in k1


def test_teacher_facts_base_model_and_license_from_hub_id_and_overrides(tmp_path):
    from boomerang_jax.surgery.model_card import teacher_facts

    assert teacher_facts("Qwen/Qwen3-4B-Base") == {"base_model": "Qwen/Qwen3-4B-Base"}
    assert teacher_facts("smollm2-135m")["license"] == "apache-2.0"
    assert teacher_facts(str(tmp_path), {"_name_or_path": "org/m"}, license="mit") == {"base_model": "org/m",
                                                                                       "license": "mit"}


# ----------------------------------------------------------------------------------------------- pick
def write_results(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def test_pick_by_params_takes_the_largest_size_that_fits_without_results(families, capsys):
    root, _, _ = families["qwen3-untied"]
    sizes = json.loads((root / "compact" / "family.json").read_text())["sizes"]
    limit = sizes[2]["params"]["total"]  # exactly the third size
    assert cli.main(["pick", str(root / "compact"), "--max-params", str(limit)]) == 0
    out = capsys.readouterr().out
    assert f"picked {sizes[2]['dir']}" in out and "the deepest size that fits" in out
    assert cli.main(["pick", str(root / "compact"), "--max-params", "1k"]) == 2
    assert "no size fits 0.001M parameters" in capsys.readouterr().err


def test_pick_by_memory_counts_weights_and_kv_cache_and_prefers_the_best_score(families, tmp_path, capsys):
    root, _, teacher = families["llama-tied"]
    sizes = json.loads((root / "compact" / "family.json").read_text())["sizes"]
    c = teacher.config
    mem = [s["params"]["total"] * 2 + 2 * s["num_layers"] * c.num_kv_heads * c.head_dim * 256 * 2 * 2 for s in sizes]
    budget = picking.Budget("memory", mem[2], "bfloat16", 256, 2)
    assert [picking.memory_bytes(s, c, budget) for s in sizes] == mem
    # perplexity rows as `boomerang eval --json-out` writes them: the 6-layer size beats the 7-layer one
    res = write_results(tmp_path / "eval.json", [{"model": f"x/{s['dir']}", "num_layers": s["num_layers"],
                                                  "perplexity": p} for s, p in zip(sizes, [40.0, 20.0, 30.0, 10.0])])
    gb = mem[2] / 1e9
    assert cli.main(["pick", str(root / "compact"), "--max-memory-gb", f"{gb:.12f}", "--dtype", "bf16",
                     "--context", "256", "--batch", "2", "--results", res, "--out", str(tmp_path / "picked")]) == 0
    out = capsys.readouterr().out
    assert f"picked {sizes[1]['dir']}" in out and "best perplexity (20" in out and "3 of 4 sizes fit" in out
    card = (tmp_path / "picked" / "README.md").read_text()
    assert "Picked by `boomerang pick`" in card and "| 20 |" in card
    assert json.loads((tmp_path / "picked" / "config.json").read_text())["dtype"] == "bfloat16"


def test_pick_reads_the_demo_results_csv_and_lm_eval_csv(families, tmp_path):
    root, _, _ = families["llama-tied"]
    sizes = json.loads((root / "compact" / "family.json").read_text())["sizes"]
    demo = tmp_path / "results.csv"
    demo.write_text("dir,k,num_layers,params,non_embedding_params,boomerang/perplexity,shortgpt/perplexity\n"
                    + "".join(f"{s['dir']},{s['k']},{s['num_layers']},1,1,{50 - s['k']},1\n" for s in sizes))
    scores = picking.read_scores(demo, sizes)
    assert scores.metric == "boomerang/perplexity" and not scores.higher_is_better
    assert scores.by_dir == {s["dir"]: 50.0 - s["k"] for s in sizes}
    lm = tmp_path / "lm_eval.csv"
    lm.write_text("dir,num_layers,params,arc/acc,arc/acc_stderr,piqa/acc\n"
                  + "".join(f"{s['dir']},{s['num_layers']},1,0.{s['k']},0.9,0.5\n" for s in sizes))
    scores = picking.read_scores(lm, sizes)
    assert scores.metric == "mean-acc" and scores.higher_is_better
    assert scores.by_dir[sizes[2]["dir"]] == pytest.approx((0.2 + 0.5) / 2)
    assert picking.parse_count("1.5B") == 1_500_000_000 and picking.parse_count("80M") == 80_000_000


# --------------------------------------------------------------------------------------------- upload
def test_upload_dry_run_lists_exactly_which_files_go_to_which_repo(families, capsys):
    root, _, _ = families["llama-tied"]
    assert cli.main(["upload", str(root / "full"), "--repo", "org/fam", "--dry-run"]) == 0
    plans = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    size_files = ["README.md", "boomerang_size.json", "config.json", "generation_config.json", "model.safetensors"]
    assert [(p["repo"], p["files"]) for p in plans] == [(f"org/fam-{n}L", size_files) for n in (5, 6, 7, 8)]
    assert cli.main(["upload", str(root / "compact"), "--repo", "org/fam", "--dry-run", "--private"]) == 0
    [plan] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert plan["repo"] == "org/fam" and plan["private"] is True
    assert plan["files"] == ["README.md", "family.json"] + [f"student/{f}" for f in (
        "boomerang_plan.json", "config.json", "generation_config.json", "model.safetensors")] + [
        f"teacher/{f}" for f in ("config.json", "generation_config.json", "model.safetensors")]


def test_upload_without_a_token_is_a_clear_error_before_any_network(families, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    root, _, _ = families["llama-tied"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("reached the hub"))
    assert cli.main(["upload", str(root / "full" / "k1-6L"), "--repo", "org/m"]) == 2
    assert "no Hugging Face token configured: set HF_TOKEN" in capsys.readouterr().err
    assert cli.main(["upload", str(root), "--repo", "org/m", "--dry-run"]) == 2
    assert cli.main(["upload", str(root / "full"), "--repo", "bad", "--dry-run"]) == 2


def test_pick_finds_the_demo_run_results_beside_its_family_and_ranks_by_them(families, tmp_path, capsys):
    root, _, _ = families["llama-tied"]
    run = tmp_path / "run"
    assert cli.main(["interpolate", "--student", str(root / "student"), "--teacher", str(root / "teacher"),
                     "--compact", "--out", str(run / "family")]) == 0
    sizes = json.loads((run / "family" / "family.json").read_text())["sizes"]
    (run / "eval.jsonl").write_text("")  # what marks a demo run directory
    (run / "results.csv").write_text("dir,k,num_layers,params,non_embedding_params,boomerang/perplexity\n" + "".join(
        f"{s['dir']},{s['k']},{s['num_layers']},1,1,{p}\n" for s, p in zip(sizes, [9.0, 3.0, 5.0, 1.0])))
    capsys.readouterr()
    assert cli.main(["pick", str(run / "family"), "--max-memory-gb", "1"]) == 0  # every size fits
    out = capsys.readouterr().out
    assert f"picked {sizes[3]['dir']}" in out and f"scores from {run / 'results.csv'}" in out
    assert cli.main(["pick", str(run / "family"), "--max-params", str(sizes[2]["params"]["total"])]) == 0
    assert f"picked {sizes[1]['dir']}" in capsys.readouterr().out  # 3.0 beats 5.0 and 9.0 under the budget



def test_without_results_pick_prefers_depth_so_a_tied_teacher_beats_larger_untied_sizes(families):
    _, _, teacher = families["llama-tied"]
    untied = {"dir": "k13-29L", "num_layers": 29, "params": {"total": 159, "non_embedding": 102, "embedding": 57}}
    tied = {"dir": "k14-30L", "num_layers": 30, "params": {"total": 134, "non_embedding": 106, "embedding": 28}}
    choice = picking.pick([untied, tied], teacher.config, picking.Budget("params", 200), None)
    assert choice.entry is tied and "the deepest size that fits" in choice.why


@pytest.mark.parametrize("name", NAMES)
def test_eval_sees_every_size_of_a_compact_family_as_the_full_export_one_at_a_time(families, name):
    """`boomerang eval FAMILY` on a compact family builds each size in memory: the same sizes, configs and
    parameters as reading the full export's directories, yielded one at a time."""
    from boomerang_jax.commands.eval import _models
    from boomerang_jax.eval.perplexity import perplexity

    root, _, _ = families[name]
    compact_models = _models(str(root / "compact"))
    assert not isinstance(compact_models, list)  # a generator: one size in memory at a time
    full, small = list(_models(str(root / "full"))), list(compact_models)
    assert [m[0] for m in small] == [m[0] for m in full] and len(full) == len(fam.read_family(root / "full")["sizes"])
    batch = {"tokens": TOKENS, "targets": np.roll(TOKENS, -1, 1), "segment_ids": np.ones_like(TOKENS),
             "positions": np.broadcast_to(np.arange(TOKENS.shape[1]), TOKENS.shape),
             "loss_mask": np.ones_like(TOKENS)}
    for (_, fc, fp, _), (_, sc, sp, _) in zip(full, small):
        assert fc == sc
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fp, sp)
        assert perplexity(fp, fc, [batch]).perplexity == perplexity(sp, sc, [batch]).perplexity


@pytest.mark.parametrize("name", NAMES)
def test_verify_checks_a_compact_family_without_writing_its_sizes(families, name, capsys):
    """`boomerang verify COMPACT`: the stored teacher and student, then every size built in memory against the
    standard transformers class; all OK, and the family directory holds no new files."""
    root, _, _ = families[name]
    before = files_of(root / "compact")
    assert cli.main(["verify", str(root / "compact")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(("OK", "MISMATCH"))]
    sizes = fam.read_family(root / "compact")["sizes"]
    assert len(lines) == 2 + len(sizes) and all(ln.startswith("OK: ") for ln in lines), lines
    assert all(f"{root / 'compact'}:{s['dir']}:" in "\n".join(lines) for s in sizes)
    assert files_of(root / "compact") == before


def test_verify_of_a_compact_family_reports_a_size_that_differs(families, tmp_path, capsys, monkeypatch):
    """The in-memory check can fail: a perturbed transformers model is a MISMATCH (exit 1)."""
    import torch

    root, _, _ = families["llama-tied"]
    real = cf.to_transformers

    def perturbed(model, dtype=None):
        hf = real(model, dtype)
        with torch.no_grad():
            hf.model.norm.weight.mul_(1.01)
        return hf

    monkeypatch.setattr(cf, "to_transformers", perturbed)
    assert cli.main(["verify", str(root / "compact")]) == 1
    assert "MISMATCH: " in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["full", "compact"])
def test_eval_of_a_family_gives_each_sizes_own_perplexity(families, kind):
    """`boomerang eval FAMILY` runs the sizes' shared layers once (eval.shared_prefix): each row is still that of
    the size evaluated on its own, in the family's order."""
    from boomerang_jax.commands.eval import _models, evaluate_models
    from boomerang_jax.eval.perplexity import perplexity
    from tests.test_eval import pack_rows

    root, _, _ = families["qwen3-untied"]
    rng = np.random.RandomState(4)
    batches = [pack_rows([rng.randint(0, 64, n) for n in (9, 5, 12, 7)], seq_len=16, rows=3) for _ in range(2)]
    rows = evaluate_models(_models(str(root / kind)), batches, chunk=8)
    sizes = fam.read_family(root / kind)["sizes"]
    assert [(r["model"], r["num_layers"]) for r in rows] == [(s["dir"], s["num_layers"]) for s in sizes]
    for row, (_, config, params, _) in zip(rows, _models(str(root / kind))):
        want = perplexity(params, config, batches, chunk=8)
        assert row["tokens"] == want.tokens and row["rows"] == want.rows
        assert row["perplexity"] == pytest.approx(want.perplexity, rel=1e-5)
        assert row["ci_low"] == pytest.approx(want.ci_low, rel=1e-5)


def test_eval_results_go_into_the_full_familys_model_cards_and_nothing_else_changes(families, tmp_path):
    """`boomerang eval FAMILY --update-cards`: each evaluated size's card gets its perplexity row in place of
    'Not evaluated yet'; the rest of the card, the other files and a user's own README stay as they were."""
    import shutil

    from boomerang_jax.commands.eval import update_cards
    from boomerang_jax.surgery.model_card import README

    root, _, _ = families["qwen3-untied"]
    family = tmp_path / "family"
    shutil.copytree(root / "full", family)
    sizes = fam.read_family(family)["sizes"]
    own = family / sizes[1]["dir"] / README
    own.write_text("# my own notes\n")
    before = {p: p.read_bytes() for p in family.rglob("*") if p.is_file()}
    rows = [{"model": s["dir"], "num_layers": s["num_layers"], "perplexity": 10.0 + i, "ci_low": 9.5 + i,
             "ci_high": 10.5 + i, "tokens": 512} for i, s in enumerate(sizes)]
    written = update_cards(str(family), rows, "held-out.txt")
    assert len(written) == len(sizes) - 1 and own.read_text() == "# my own notes\n"
    card = (family / sizes[0]["dir"] / README).read_text()
    old = before[family / sizes[0]["dir"] / README].decode()
    assert "Not evaluated yet" in old and "Not evaluated yet" not in card
    assert f"| {sizes[0]['dir']} | 10 | 9.5-10.5 | 512 | held-out.txt |" in card
    assert card.split("## Evaluation")[0] == old.split("## Evaluation")[0]
    assert card.split("## How it was made")[1] == old.split("## How it was made")[1]
    changed = {p for p in before if p.read_bytes() != before[p]}
    assert changed == {family / s["dir"] / README for s in sizes if family / s["dir"] / README != own}


def test_the_card_command_line_leaves_out_empty_options_and_repeats_appended_ones():
    """The card's "How it was made" line is what a user would type: no `--results '[]'`."""
    import argparse

    ns = argparse.Namespace(family="fam", out="o", results=[], layers=23, overwrite=False, dtype=None)
    assert fam_cli.command_line("materialise", ns, ("family",)) == "boomerang materialise fam --out o --layers 23"
    ns.results = ["a.csv", "b c.csv"]
    assert fam_cli.command_line("materialise", ns, ("family",)) == \
        "boomerang materialise fam --out o --results a.csv --results 'b c.csv' --layers 23"

"""Family export: streamed sizes equal in-memory interpolation, reload in transformers, family.json, the
`interpolate`/`prune` commands, atomicity, dtypes and clear errors."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from boomerang_jax.commands import family as fam_cli
from boomerang_jax.hf.export import save_hf
from boomerang_jax.hf.load import CheckpointError, load_hf
from boomerang_jax.models.transformer import forward
from boomerang_jax.surgery import (
    LayerPlan,
    Model,
    PlanError,
    SurgeryError,
    count_params,
    interpolate,
    patched_for,
    prune,
)
from boomerang_jax.surgery import family_export as fam
from boomerang_jax.surgery import tensors
from tests.conftest import EIGHT_LAYER_CONFIGS, build_hf_model, torch_logits

SPECS = {k: EIGHT_LAYER_CONFIGS[k] for k in ("llama-tied", "qwen3-untied", "neox")}
PLAN = LayerPlan.from_knobs(8)  # blocks {0,1},{2,3},{4,5},{6},{7}
TOKENS = np.random.RandomState(0).randint(0, 72, (2, 6))


def host(tree):
    return jax.tree.map(np.asarray, tree)


def perturbed(params, seed: int = 0, scale: float = 0.05):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype), params)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (teacher dir, student dir, teacher Model, student Model); the student is a perturbed prune
    saved with its plan, as a distilled student would be."""
    out = {}
    for name, spec in SPECS.items():
        root = tmp_path_factory.mktemp(name)
        build_hf_model(spec, seed=2).save_pretrained(root / "teacher")
        ck = load_hf(root / "teacher", to_device=False)
        s_config, s_params = prune(ck.params, ck.config, PLAN)
        s_params = perturbed(s_params)
        save_hf(root / "student", s_config, s_params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files,
                extra_files=fam.plan_files(PLAN))
        out[name] = (root / "teacher", root / "student", Model(ck.config, ck.params), Model(s_config, s_params))
    return out


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def cli(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    fam_cli.add_interpolate_arguments(parser)
    argv = []
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("order", ["last-to-first", "first-to-last"])
def test_streamed_family_equals_in_memory_interpolation(pairs, tmp_path, name, order):
    t_dir, s_dir, teacher, student = pairs[name]
    out = tmp_path / "family"
    family = fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(t_dir), out, order=order)
    assert [s["k"] for s in family["sizes"]] == [0, 1, 2, 3]
    assert json.loads((out / "family.json").read_text()) == family
    for entry in family["sizes"]:
        patched = patched_for(PLAN, order, entry["k"])
        expected = interpolate(student, teacher, PLAN, patched)
        got = load_hf(out / entry["dir"], to_device=False)
        assert got.config == expected.config
        assert_trees_equal(got.params, expected.params)
        assert entry["num_layers"] == expected.config.num_layers == PLAN.num_layers(patched)
        assert entry["patched"] == sorted(patched)
        assert entry["params"] == count_params(expected.config).to_dict()
        assert entry["tie_word_embeddings"] == expected.config.tie_word_embeddings
        size_file = json.loads((out / entry["dir"] / fam.SIZE_FILE).read_text())
        assert size_file == {"order": order, **entry}
    first, last = family["sizes"][0], family["sizes"][-1]
    assert first["layers"] == [f"student:{i}" for i in range(5)]
    assert last["layers"] == [f"teacher:{j}" for j in range(8)]
    assert (first["embedding"], first["head"], last["embedding"], last["head"]) == (
        "student", "student", "teacher", "teacher")


@pytest.mark.parametrize("order, untied", [("last-to-first", True), ("first-to-last", True)])
def test_tied_teacher_sizes_reload_in_transformers_with_jax_logits(pairs, tmp_path, order, untied):
    t_dir, s_dir, teacher, student = pairs["llama-tied"]
    out = tmp_path / "family"
    family = fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(t_dir), out, order=order, ks=[1, 2])
    for entry in family["sizes"]:
        expected = interpolate(student, teacher, PLAN, patched_for(PLAN, order, entry["k"]))
        cfg = json.loads((out / entry["dir"] / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is (not untied) and cfg["num_hidden_layers"] == entry["num_layers"]
        reloaded = AutoModelForCausalLM.from_pretrained(out / entry["dir"]).eval()
        assert sum(p.numel() for p in reloaded.parameters()) == entry["params"]["total"]
        ours = np.asarray(forward(expected.params, expected.config, jnp.asarray(TOKENS)).logits)
        np.testing.assert_allclose(torch_logits(reloaded, TOKENS), ours, atol=1e-4, rtol=1e-4)


def test_sharded_family_sizes_reload_identically(pairs, tmp_path):
    t_dir, s_dir, teacher, student = pairs["neox"]
    out = tmp_path / "family"
    fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(t_dir), out, ks=[2], max_shard_bytes=30_000)
    size = next(p for p in out.iterdir() if p.is_dir())
    assert (size / "model.safetensors.index.json").exists()
    assert_trees_equal(load_hf(size, to_device=False).params,
                       interpolate(student, teacher, PLAN, patched_for(PLAN, "last-to-first", 2)).params)


# -------------------------------------------------------------------------------------------- dtypes
def test_auto_dtype_is_float32_for_mixed_inputs_and_explicit_bf16_is_honoured(pairs, tmp_path):
    t_dir, _, teacher, student = pairs["qwen3-untied"]
    save_hf(tmp_path / "s16", student.config, student.params, dtype="bfloat16", extra_files=fam.plan_files(PLAN))
    s16 = fam_cli.open_source(tmp_path / "s16")
    assert s16.dtype == np.dtype(ml_dtypes.bfloat16)
    family = fam.export_family(s16, fam_cli.open_source(t_dir), tmp_path / "a", ks=[1])
    assert family["dtype"] == "float32"
    family = fam.export_family(s16, fam_cli.open_source(t_dir), tmp_path / "b", ks=[1], dtype="bfloat16")
    got = load_hf(tmp_path / "b" / family["sizes"][0]["dir"], dtype="bfloat16", to_device=False)
    expected = interpolate(student, teacher, PLAN, patched_for(PLAN, "last-to-first", 1))
    assert_trees_equal(got.params, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), expected.params))


# ------------------------------------------------------------------------------------------ commands
def test_interpolate_command_sizes_and_plan_override(pairs, tmp_path, capsys):
    t_dir, s_dir, _, _ = pairs["llama-tied"]
    assert fam_cli.interpolate_command(cli(student=s_dir, teacher=t_dir, out=tmp_path / "a", sizes="k=0,2-3")) == 0
    assert [s["k"] for s in json.loads((tmp_path / "a" / "family.json").read_text())["sizes"]] == [0, 2, 3]
    assert "k=2" in capsys.readouterr().out
    args = cli(student=s_dir, teacher=t_dir, out=tmp_path / "b", sizes="6,8", order="first-to-last")
    assert fam_cli.interpolate_command(args) == 0
    sizes = json.loads((tmp_path / "b" / "family.json").read_text())["sizes"]
    assert [(s["k"], s["num_layers"]) for s in sizes] == [(1, 6), (3, 8)]
    # the plan may also come from --plan (a spec, or a family.json), overriding the student's file
    args = cli(student=s_dir, teacher=t_dir, out=tmp_path / "c", sizes="k=1", plan="every=2,first=1,last=2")
    assert fam_cli.interpolate_command(args) == 0
    args = cli(student=s_dir, teacher=t_dir, out=tmp_path / "d", sizes="k=1", plan=tmp_path / "a" / "family.json")
    assert fam_cli.interpolate_command(args) == 0
    with pytest.raises(SurgeryError, match="plan has 4 blocks .student layers., but the student has 5 layers"):
        fam_cli.interpolate_command(cli(student=s_dir, teacher=t_dir, out=tmp_path / "e", plan="every=3"))


def test_student_without_plan_needs_plan_flag(pairs, tmp_path):
    t_dir, _, _, student = pairs["llama-tied"]
    save_hf(tmp_path / "s", student.config, student.params)
    with pytest.raises(fam.FamilyError, match="no boomerang_plan.json; pass --plan"):
        fam_cli.interpolate_command(cli(student=tmp_path / "s", teacher=t_dir, out=tmp_path / "out"))
    assert fam_cli.interpolate_command(cli(student=tmp_path / "s", teacher=t_dir, out=tmp_path / "out",
                                       plan="every=2,first=1,last=2", sizes="k=1")) == 0


def test_prune_command_writes_the_student_with_its_plan(pairs, tmp_path):
    t_dir, _, teacher, _ = pairs["neox"]
    parser = argparse.ArgumentParser()
    fam_cli.add_prune_arguments(parser)
    args = parser.parse_args(["--teacher", str(t_dir), "--out", str(tmp_path / "s"), "--plan", "every=3"])
    assert fam_cli.prune_command(args) == 0
    plan = LayerPlan.from_knobs(8, every=3)
    src = fam_cli.open_source(tmp_path / "s")
    assert src.plan == plan
    assert_trees_equal(load_hf(tmp_path / "s", to_device=False).params, prune(teacher.params, teacher.config, plan).params)


@pytest.mark.parametrize("spec, message", [
    ("k=4", "k=4 is out of range; last-to-first has k = 0..3"),
    ("9", "no last-to-first size has 9 layers; sizes are 5, 6, 7, 8 layers"),
    ("k=x", "cannot read 'x'"),
    (",", "selects no size"),
])
def test_bad_sizes_are_clear_errors(spec, message):
    with pytest.raises(fam.FamilyError, match=message):
        fam.parse_sizes(spec, PLAN, "last-to-first")


def test_parse_sizes():
    assert fam.parse_sizes("all", PLAN, "last-to-first") == [0, 1, 2, 3]
    assert fam.parse_sizes("k=3,0-1,1", PLAN, "last-to-first") == [0, 1, 3]
    assert fam.parse_sizes("8,5", PLAN, "first-to-last") == [0, 3]


# ------------------------------------------------------------------------------- atomicity / errors
def test_existing_family_is_kept_unless_overwrite_and_a_failed_export_leaves_it_intact(pairs, tmp_path):
    t_dir, s_dir, _, _ = pairs["llama-tied"]
    out = tmp_path / "family"
    fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(t_dir), out, ks=[0])
    before = (out / "family.json").read_text()
    with pytest.raises(fam.FamilyError, match="already exists"):
        fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(t_dir), out, ks=[1])
    teacher = fam_cli.open_source(t_dir)
    good_get = teacher.get

    def failing_get(path, layer):
        if layer == 6:
            raise OSError("disk on fire")
        return good_get(path, layer)

    teacher.get = failing_get
    with pytest.raises(OSError, match="disk on fire"):
        fam.export_family(fam_cli.open_source(s_dir), teacher, out, overwrite=True)
    assert (out / "family.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["family"]  # no partial directories left
    fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(t_dir), out, ks=[1], overwrite=True)
    assert [s["k"] for s in json.loads((out / "family.json").read_text())["sizes"]] == [1]
    assert sorted(p.name for p in out.iterdir()) == ["family.json", "k1-6L"]


def test_mismatched_models_are_clear_errors(pairs, tmp_path):
    _, s_dir, _, _ = pairs["llama-tied"]
    q_dir = pairs["qwen3-untied"][0]
    with pytest.raises(SurgeryError, match="differ in model_type: 'llama' .student. vs 'qwen3' .teacher."):
        fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(q_dir), tmp_path / "x")
    spec = dict(SPECS["llama-tied"], hidden_size=48, head_dim=12)
    build_hf_model(spec).save_pretrained(tmp_path / "wide")
    with pytest.raises(SurgeryError, match="differ in hidden_size"):
        fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(tmp_path / "wide"), tmp_path / "x")
    build_hf_model(dict(SPECS["llama-tied"], num_hidden_layers=6)).save_pretrained(tmp_path / "short")
    with pytest.raises(SurgeryError, match="plan is for a 8-layer teacher, but the teacher has 6 layers"):
        fam.export_family(fam_cli.open_source(s_dir), fam_cli.open_source(tmp_path / "short"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unsupported_sources_are_clear_errors(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "500").mkdir(parents=True)
    (ckpt / "500" / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(fam.FamilyError, match="orbax training checkpoint"):
        fam_cli.open_source(ckpt)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(SPECS["llama-tied"]))
    with pytest.raises(CheckpointError, match=r"empty: no \*\.safetensors weights found"):
        fam_cli.open_source(tmp_path / "empty")


def test_corrupt_plan_file_names_the_file(pairs, tmp_path):
    _, _, _, student = pairs["llama-tied"]
    save_hf(tmp_path / "s", student.config, student.params,
            extra_files={fam.PLAN_FILE: b'{"num_teacher_layers": 8, "blocks": [[0, 1], [3]]}'})
    with pytest.raises(PlanError, match=r"s/boomerang_plan.json: teacher layer 2 is in no block"):
        fam_cli.open_source(tmp_path / "s")


def test_checkpoint_readers_hook_is_consulted_first(pairs, tmp_path, monkeypatch):
    _, s_dir, _, student = pairs["llama-tied"]
    calls = []

    def reader(path):
        calls.append(path)
        return tensors.source_from_params(student.config, student.params, where=str(path), plan=PLAN)

    monkeypatch.setattr(fam_cli, "CHECKPOINT_READERS", [reader])
    src = fam_cli.open_source(tmp_path / "anything")
    assert calls and src.plan == PLAN and src.config == student.config


def test_mis_shaped_tensor_in_a_source_names_file_and_tensor(pairs, tmp_path):
    _, _, _, student = pairs["llama-tied"]
    path = save_hf(tmp_path / "s", student.config, student.params, extra_files=fam.plan_files(PLAN))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=50)))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' "
                                              r"has shape \(48, 32\), expected \(50, 32\)"):
        fam_cli.open_source(path)

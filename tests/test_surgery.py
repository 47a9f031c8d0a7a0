"""prune / interpolate on tiny random models of every family: exact invariants, layer counts, exports that
transformers reloads with the same logits (tied teacher -> untied patched sizes), parameter counts, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from boomerang_jax.hf.export import save_hf
from boomerang_jax.hf.load import load_hf
from boomerang_jax.models.transformer import forward, param_shapes
from boomerang_jax.surgery import (
    LayerPlan,
    Model,
    SurgeryError,
    count_params,
    first_to_last,
    interpolate,
    last_to_first,
    prune,
)
from tests.conftest import EIGHT_LAYER_CONFIGS, build_hf_model, torch_logits

FAMILIES = EIGHT_LAYER_CONFIGS
TOKENS = np.random.RandomState(0).randint(0, 64, (2, 7))  # 64 <= every vocab
_forward = jax.jit(forward, static_argnums=(1,))  # one compile per config, shared by the tests


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """name -> (Model, torch model); built once per module."""
    out = {}
    for name, spec in FAMILIES.items():
        path = tmp_path_factory.mktemp(name)
        model = build_hf_model(spec, seed=1)
        model.save_pretrained(path)
        out[name] = (load_hf(path), model)
    return out


def perturbed(model: Model, seed: int = 0, scale: float = 0.05) -> Model:
    """A distinct 'distilled' student (host arrays): every parameter moved, so invariants can fail."""
    rng = np.random.RandomState(seed)
    moved = jax.tree.map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype), model.params)
    return Model(model.config, moved)


def on_host(model) -> Model:
    return Model(model.config, jax.tree.map(np.asarray, model.params))


def logits(model: Model) -> np.ndarray:
    return np.asarray(_forward(model.params, model.config, jnp.asarray(TOKENS)).logits)


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(params=sorted(FAMILIES))
def family_name(request) -> str:
    return request.param


@pytest.fixture
def setup(teachers, family_name):
    ck, torch_model = teachers[family_name]
    plan = LayerPlan.from_knobs(8)
    teacher = on_host(ck)  # host numpy keeps the many small surgeries fast; device arrays are tested below
    student = perturbed(prune(teacher.params, teacher.config, plan))
    return teacher, student, plan, torch_model


# -------------------------------------------------------------------------------------------- prune
def test_prune_keeps_each_blocks_first_layer(setup):
    teacher, _, plan, _ = setup
    config, params = prune(teacher.params, teacher.config, plan)
    assert config == teacher.config.replace(num_layers=5)
    assert plan.kept == (0, 2, 4, 6, 7)
    for s, t in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(teacher.params["layers"])):
        np.testing.assert_array_equal(s, np.asarray(t)[list(plan.kept)])
    assert params["embed"] is teacher.params["embed"] and params["final_norm"] is teacher.params["final_norm"]
    assert jax.tree.structure(params) == jax.tree.structure(param_shapes(config))


def test_prune_works_on_host_numpy_params(setup):
    teacher, _, plan, _ = setup
    host = jax.tree.map(np.asarray, teacher.params)
    _, params = prune(host, teacher.config, plan)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------- invariants
def test_patching_all_blocks_gives_teacher_logits(setup):
    teacher, student, plan, _ = setup
    out = interpolate(student, teacher, plan, range(plan.num_student_layers))
    assert out.config == teacher.config
    assert_trees_equal(out.params, teacher.params)
    np.testing.assert_array_equal(logits(out), logits(teacher))


def test_patching_nothing_gives_student_logits(setup):
    teacher, student, plan, _ = setup
    out = interpolate(student, teacher, plan, [])
    assert out.config == student.config
    assert_trees_equal(out.params, student.params)
    np.testing.assert_array_equal(logits(out), logits(student))
    assert not np.allclose(logits(student), logits(teacher))  # the student really differs


@pytest.mark.parametrize("patched", [{0}, {4}, {1, 2}, {0, 4}, {0, 1, 2}, {3}])
def test_any_subset_gives_expected_layers(setup, patched):
    teacher, student, plan, _ = setup
    out = interpolate(student, teacher, plan, patched)
    expected = [w for i, b in enumerate(plan.blocks) for w in ([("t", j) for j in b] if i in patched else [("s", i)])]
    assert out.config.num_layers == len(expected) == plan.num_layers(patched)
    assert jax.tree.structure(out.params) == jax.tree.structure(param_shapes(out.config))
    q = out.params["layers"]["attn"]["q_proj"]["kernel"]
    for pos, (who, j) in enumerate(expected):
        src = (teacher if who == "t" else student).params["layers"]["attn"]["q_proj"]["kernel"]
        np.testing.assert_array_equal(q[pos], src[j])
    emb_from = teacher if 0 in patched else student
    head_from = teacher if plan.num_student_layers - 1 in patched else student
    np.testing.assert_array_equal(out.params["embed"]["embedding"], emb_from.params["embed"]["embedding"])
    np.testing.assert_array_equal(out.params["final_norm"]["scale"], head_from.params["final_norm"]["scale"])
    tied = teacher.config.tie_word_embeddings
    assert out.config.tie_word_embeddings == (tied and emb_from is head_from)
    shape = jax.eval_shape(lambda p: forward(p, out.config, jnp.asarray(TOKENS)).logits, out.params).shape
    assert shape == (2, 7, teacher.config.vocab_size)


def test_device_arrays_give_the_same_result_as_host_arrays(teachers):
    ck, _ = teachers["qwen3-tied"]
    plan = LayerPlan.from_knobs(8)
    student = perturbed(prune(ck.params, ck.config, plan))
    on_device = Model(student.config, jax.tree.map(jnp.asarray, student.params))
    for patched in ([], [1, 2], range(5)):
        a = interpolate(on_device, ck, plan, patched)
        assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(a.params))
        assert_trees_equal(a.params, interpolate(student, on_host(ck), plan, patched).params)


def test_mixed_tied_model_is_untied_with_the_head_of_the_last_layers_owner(teachers):
    ck, _ = teachers["llama-tied"]
    plan = LayerPlan.from_knobs(8)
    teacher, student = Model(ck.config, ck.params), perturbed(prune(ck.params, ck.config, plan))
    out = interpolate(student, teacher, plan, last_to_first(plan, 1))
    assert not out.config.tie_word_embeddings
    np.testing.assert_array_equal(out.params["embed"]["embedding"], student.params["embed"]["embedding"])
    np.testing.assert_array_equal(out.params["lm_head"]["kernel"], teacher.params["embed"]["embedding"].T)


# --------------------------------------------------------------------------- exports vs transformers
@pytest.mark.parametrize("name, order, plan_knobs", [
    ("llama-tied", "last-to-first", dict()),
    ("llama-tied", "first-to-last", dict(first=2, last=1)),
    ("qwen3-tied", "last-to-first", dict()),
    ("qwen3-untied", "first-to-last", dict()),
    ("neox", "last-to-first", dict(every=3)),
])
def test_exported_interpolated_size_matches_transformers(teachers, tmp_path, name, order, plan_knobs):
    ck, _ = teachers[name]
    plan = LayerPlan.from_knobs(8, **plan_knobs)
    teacher, student = Model(ck.config, ck.params), perturbed(prune(ck.params, ck.config, plan))
    patched = (last_to_first if order == "last-to-first" else first_to_last)(plan, 1)
    out = interpolate(student, teacher, plan, patched)
    path = save_hf(tmp_path / "size", out.config, out.params, hf_config=ck.hf_config)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == out.config.num_layers == plan.num_layers(patched)
    assert cfg["tie_word_embeddings"] is out.config.tie_word_embeddings
    if teacher.config.tie_word_embeddings:
        assert cfg["tie_word_embeddings"] is False  # embedding and head come from different models
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == count_params(out.config).total
    np.testing.assert_allclose(torch_logits(reloaded, TOKENS), logits(out), atol=1e-4, rtol=1e-4)


def test_exported_pruned_student_is_a_valid_hf_model(teachers, tmp_path):
    ck, _ = teachers["llama-tied"]
    student = prune(ck.params, ck.config, LayerPlan.from_knobs(8))
    path = save_hf(tmp_path / "student", student.config, student.params, hf_config=ck.hf_config)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert reloaded.config.num_hidden_layers == 5 and reloaded.config.tie_word_embeddings
    np.testing.assert_allclose(torch_logits(reloaded, TOKENS), logits(student), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ counting
def test_param_counts_match_torch_and_the_tree(teachers, family_name):
    ck, torch_model = teachers[family_name]
    count = count_params(ck.config)
    assert count.total == sum(p.numel() for p in torch_model.parameters())  # torch dedups tied weights
    assert count.total == sum(x.size for x in jax.tree.leaves(ck.params))
    v, d = ck.config.vocab_size, ck.config.hidden_size
    assert count.embedding == v * d * (1 if ck.config.tie_word_embeddings else 2)
    assert count.non_embedding == count.total - count.embedding
    assert count.to_dict() == {"total": count.total, "non_embedding": count.non_embedding,
                               "embedding": count.embedding}


def test_untying_adds_one_head_matrix():
    from boomerang_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf(FAMILIES["llama-tied"])
    untied = cfg.replace(tie_word_embeddings=False)
    assert count_params(untied).total - count_params(cfg).total == cfg.vocab_size * cfg.hidden_size
    assert count_params(untied).non_embedding == count_params(cfg).non_embedding
    assert count_params(cfg).total == sum(x.size for x in jax.tree.leaves(param_shapes(cfg)))


# -------------------------------------------------------------------------------------------- errors
def _with_config(model: Model, **changes) -> Model:
    return Model(model.config.replace(**changes), model.params)


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=64), "differ in hidden_size: 64 .student. vs 32 .teacher."),
    (dict(vocab_size=97), "differ in vocab_size"),
    (dict(model_type="qwen3", qk_norm=True), "differ in model_type: 'qwen3'"),
    (dict(num_layers=6), "plan has 5 blocks .student layers., but the student has 6 layers"),
])
def test_mismatched_student_is_a_clear_error(teachers, change, message):
    ck, _ = teachers["llama-tied"]
    plan = LayerPlan.from_knobs(8)
    student = _with_config(prune(ck.params, ck.config, plan), **change)
    with pytest.raises(SurgeryError, match=message):
        interpolate(student, (ck.config, ck.params), plan, [0])


def test_plan_for_another_teacher_is_a_clear_error(teachers):
    ck, _ = teachers["llama-tied"]
    plan = LayerPlan.from_knobs(8)
    student = prune(ck.params, ck.config, plan)
    with pytest.raises(SurgeryError, match="plan is for a 9-layer teacher, but the teacher has 8 layers"):
        interpolate(student, ck, LayerPlan.from_knobs(9), [0])
    with pytest.raises(SurgeryError, match="plan is for a 9-layer teacher"):
        prune(ck.params, ck.config, LayerPlan.from_knobs(9))
    with pytest.raises(SurgeryError, match="student layer 5 does not exist"):
        interpolate(student, ck, plan, [5])


def test_dtype_mismatch_is_a_clear_error(teachers):
    ck, _ = teachers["llama-tied"]
    plan = LayerPlan.from_knobs(8)
    student = prune(ck.params, ck.config, plan)
    student = Model(student.config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), student.params))
    with pytest.raises(SurgeryError, match="bfloat16 in the student but float32 in the teacher"):
        interpolate(student, ck, plan, [0])

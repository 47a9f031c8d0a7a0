"""LayerPlan: the paper's examples, validation errors, serialisation, orders, and properties over random plans."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from boomerang_jax.surgery import (
    LayerPlan,
    PlanError,
    SurgeryError,
    family,
    first_to_last,
    last_to_first,
    layout,
    num_steps,
    patch_sequence,
    patched_for,
)


# ------------------------------------------------------------------------------------ paper examples
def test_qwen3_plan_keeps_every_other_layer_and_the_last_two():
    plan = LayerPlan.from_knobs(36)  # reference defaults every=2, first=1, last=2
    assert plan.kept == tuple(range(0, 35, 2)) + (35,)
    assert plan.num_student_layers == 19
    assert plan.blocks[:2] == ((0, 1), (2, 3))
    assert plan.blocks[-3:] == ((32, 33), (34,), (35,))
    assert plan.aligned_pairs()[:3] == ((0, 0), (1, 2), (2, 4))
    assert plan.aligned_pairs()[-3:] == ((17, 34), (18, 35), (19, 36))
    assert len(plan.aligned_pairs()) == 20  # w_cos = 2.0 / 20 = 0.1 per pair, as in the paper


def test_llama_plan_keeps_the_first_two_layers():
    plan = LayerPlan.from_knobs(28, every=2, first=2, last=1)
    assert plan.kept == (0, 1) + tuple(range(3, 28, 2))
    assert plan.num_student_layers == 15
    assert plan.blocks[:3] == ((0,), (1, 2), (3, 4))
    assert plan.blocks[-2:] == ((25, 26), (27,))
    assert plan.aligned_pairs()[:3] == ((0, 0), (1, 1), (2, 3))
    assert plan.aligned_pairs()[-1] == (15, 28)


def test_pythia_plan_has_seventeen_layers():
    assert LayerPlan.from_knobs(32).num_student_layers == 17


def test_hidden_indices_are_the_pairs_split():
    plan = LayerPlan.from_knobs(10)
    assert tuple(zip(plan.student_hidden_indices(), plan.teacher_hidden_indices())) == plan.aligned_pairs()


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("blocks, message", [
    ([[0, 1], [3]], "teacher layer 2 is in no block"),
    ([[0, 1], [1, 2, 3]], "teacher layer 1 is in blocks 0 and 1"),
    ([[0, 2], [1, 3]], r"block 0 \(student layer 0\) \[0, 2\] is not contiguous"),
    ([[0, 1], [], [2, 3]], r"block 1 \(student layer 1\) is empty"),
    ([[2, 3], [0, 1]], "out of order: block 1 starts at teacher layer 0"),
    ([[0, 1], [2, 3, 4]], "lists teacher layer 4, outside 0..3"),
    ([[1, 0], [2, 3]], "is not contiguous"),
    ([], "at least one block"),
])
def test_invalid_plans_fail_naming_the_layer(blocks, message):
    with pytest.raises(PlanError, match=message):
        LayerPlan(4, blocks)


@pytest.mark.parametrize("knobs, message", [
    (dict(every=0), "every must be >= 1"),
    (dict(first=0), "first must be in 1..8"),
    (dict(last=9), "last must be in 0..8"),
])
def test_invalid_knobs_fail_naming_the_knob(knobs, message):
    with pytest.raises(PlanError, match=message):
        LayerPlan.from_knobs(8, **knobs)


def test_non_integer_layer_ids_are_rejected():
    with pytest.raises(PlanError, match="must be an integer"):
        LayerPlan(2, [[0, 1.0]])


def test_json_roundtrip_and_corrupt_json():
    plan = LayerPlan.from_knobs(28, first=2, last=1)
    assert LayerPlan.from_json(plan.to_json()) == plan
    d = plan.to_dict()
    d["kept"] = [0, 2]
    with pytest.raises(PlanError, match="does not match"):
        LayerPlan.from_dict(d, source="x.json")
    d = plan.to_dict()
    d["blocks"][3] = [99]
    with pytest.raises(PlanError, match="x.json: .*teacher layer 99"):
        LayerPlan.from_dict(d, source="x.json")
    with pytest.raises(PlanError, match="not valid JSON"):
        LayerPlan.from_json("{")


def test_parse_specs():
    assert LayerPlan.parse("every=2,first=2,last=1", 28) == LayerPlan.from_knobs(28, 2, 2, 1)
    assert LayerPlan.parse("kept=0,3,5", 6).blocks == ((0, 1, 2), (3, 4), (5,))
    with pytest.raises(PlanError, match="cannot read 'stride=2'"):
        LayerPlan.parse("stride=2", 6)
    with pytest.raises(PlanError, match="start with teacher layer 0"):
        LayerPlan.parse("kept=1,3", 6)


# -------------------------------------------------------------------------------------------- orders
def test_last_to_first_patches_suffixes_and_ends_at_the_teacher():
    plan = LayerPlan.from_knobs(8)  # blocks {0,1},{2,3},{4,5},{6},{7}
    assert num_steps(plan) == 3
    assert [sorted(p) for p in family(plan, "last-to-first")] == [[], [2, 3, 4], [1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert [plan.num_layers(p) for p in family(plan)] == [5, 6, 7, 8]
    assert layout(plan, last_to_first(plan, 1), student_tied=True, teacher_tied=True).head == "teacher"
    assert layout(plan, last_to_first(plan, 1), student_tied=True, teacher_tied=True).embedding == "student"


def test_first_to_last_patches_prefixes_with_leading_single_blocks():
    plan = LayerPlan.from_knobs(8, first=2, last=1)  # blocks {0},{1,2},{3,4},{5,6},{7}
    assert plan.blocks == ((0,), (1, 2), (3, 4), (5, 6), (7,))
    assert [sorted(p) for p in family(plan, "first-to-last")] == [[], [0, 1], [0, 1, 2], [0, 1, 2, 3, 4]]
    lay = layout(plan, first_to_last(plan, 1), student_tied=True, teacher_tied=True)
    assert (lay.embedding, lay.head, lay.tie_word_embeddings) == ("teacher", "student", False)


def test_named_orders_are_the_sequences_they_name():
    plan = LayerPlan.from_knobs(8)  # multi-layer blocks 0, 1, 2
    assert patch_sequence(plan, "last-to-first") == (2, 1, 0)
    assert patch_sequence(plan, "first-to-last") == (0, 1, 2)
    for name in ("last-to-first", "first-to-last"):
        assert family(plan, name) == family(plan, list(patch_sequence(plan, name)))


def test_explicit_order_patches_its_blocks_in_sequence_with_single_blocks_following_the_later_neighbour():
    plan = LayerPlan.from_kept(10, [0, 1, 3, 5, 6, 8])  # blocks {0},{1,2},{3,4},{5},{6,7},{8,9}
    assert plan.multi_layer_blocks == (1, 2, 4, 5)
    sizes = family(plan, [4, 1, 5, 2])
    # {0} leads: it goes with block 1; {5} sits between blocks 2 and 4 and goes with whichever is patched later
    assert [sorted(p) for p in sizes] == [[], [4], [0, 1, 4], [0, 1, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert [plan.num_layers(p) for p in sizes] == [6, 7, 8, 9, 10]
    lay = layout(plan, sizes[1], student_tied=True, teacher_tied=True)  # a middle block: both ends student
    assert (lay.embedding, lay.head, lay.tie_word_embeddings) == ("student", "student", True)


@pytest.mark.parametrize("order, message", [
    ([2, 1], r"block\(s\) \[0\] are missing"),
    ([2, 1, 1, 0], r"block\(s\) \[1\] appear more than once"),
    ([2, 1, 0, 3], r"student layer\(s\) \[3\] are not multi-layer blocks"),
    ([2, "x", 0], "'x' is not a student layer id"),
])
def test_bad_explicit_orders_name_the_offending_block(order, message):
    with pytest.raises(SurgeryError, match=message):
        patched_for(LayerPlan.from_knobs(8), order, 1)


def test_orders_reject_bad_steps_and_plans_without_multi_layer_blocks():
    plan = LayerPlan.from_knobs(8)
    with pytest.raises(SurgeryError, match="k=4 is out of range"):
        last_to_first(plan, 4)
    with pytest.raises(SurgeryError, match="unknown order"):
        patched_for(plan, "middle-out", 1)
    with pytest.raises(SurgeryError, match="no multi-layer blocks"):
        family(LayerPlan.from_knobs(3, every=1))
    with pytest.raises(SurgeryError, match="student layer 5 does not exist"):
        plan.num_layers({5})


def test_tie_flag_of_layouts():
    plan = LayerPlan.from_knobs(8)
    everything = range(plan.num_student_layers)
    assert layout(plan, [], student_tied=True, teacher_tied=True).tie_word_embeddings
    assert layout(plan, everything, student_tied=True, teacher_tied=True).tie_word_embeddings
    assert not layout(plan, [4], student_tied=True, teacher_tied=True).tie_word_embeddings
    assert not layout(plan, everything, student_tied=True, teacher_tied=False).tie_word_embeddings


# ------------------------------------------------------------------------------------ properties
@st.composite
def plans(draw) -> LayerPlan:
    n = draw(st.integers(1, 40))
    starts = draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else set()
    return LayerPlan.from_kept(n, [0, *sorted(starts)])


@settings(max_examples=200, deadline=None)
@given(plans(), st.data())
def test_random_plans_add_up(plan, data):
    n, m = plan.num_teacher_layers, plan.num_student_layers
    assert sorted(j for b in plan.blocks for j in b) == list(range(n))
    assert sum(len(b) for b in plan.blocks) == n
    assert LayerPlan.from_json(plan.to_json()) == plan
    assert LayerPlan(n, [list(b) for b in plan.blocks]) == plan
    pairs = plan.aligned_pairs()
    assert len(pairs) == m + 1 and pairs[0] == (0, 0) and pairs[-1] == (m, n)
    s, t = zip(*pairs)
    assert list(s) == list(range(m + 1))
    assert all(a < b for a, b in zip(t, t[1:]))  # strictly increasing teacher indices
    assert all(t[i + 1] == plan.blocks[i][-1] + 1 for i in range(m))
    patched = data.draw(st.sets(st.integers(0, m - 1)))
    lay = layout(plan, patched, student_tied=True, teacher_tied=True)
    assert lay.num_layers == plan.num_layers(patched) == m + sum(len(plan.blocks[i]) - 1 for i in patched)
    assert [j for src, j in lay.layers if src == "teacher"] == sorted(j for i in patched for j in plan.blocks[i])
    assert [j for src, j in lay.layers if src == "student"] == sorted(set(range(m)) - patched)
    if plan.multi_layer_blocks:
        for order in ("last-to-first", "first-to-last"):
            fam = family(plan, order)
            sizes = [plan.num_layers(p) for p in fam]
            assert len(fam) == len(plan.multi_layer_blocks) + 1
            assert sizes[0] == m and sizes[-1] == n
            assert all(a < b for a, b in zip(sizes, sizes[1:]))
            assert all(a < b for a, b in zip(fam, fam[1:]))  # each step patches a strict superset


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 5), st.integers(1, 4), st.integers(0, 4))
def test_knob_plans_keep_first_last_and_stride(n, every, first, last):
    first, last = min(first, n), min(last, n)
    plan = LayerPlan.from_knobs(n, every, first, last)
    kept = set(plan.kept)
    assert set(range(first)) <= kept and set(range(n - last, n)) <= kept
    assert all(len(b) <= every for b in plan.blocks)
    assert json.loads(plan.to_json())["kept"] == list(plan.kept)

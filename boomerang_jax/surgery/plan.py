"""Layer plans and patch orders: which teacher block each student layer stands for, and in which sequence the
blocks are patched back (docs/METHOD.md, sections 1 and 3).

A `LayerPlan` cuts the teacher's layers into contiguous blocks, one per student layer. An order is the sequence
in which the multi-layer blocks are patched; step k patches its first k. The paper's two named orders are
`last-to-first` and `first-to-last` (the patched set is a suffix or prefix of the blocks); any other sequence of
the multi-layer blocks may be given explicitly, e.g. one chosen from data (`boomerang_jax.surgery.orders`).
Single-layer blocks change no size, so each is patched together with whichever of its neighbouring multi-layer
blocks the order patches later (a single-layer block stays the student's while a student layer is next to it);
for the named orders this keeps the patched set a suffix or prefix. The last step patches every block. Hence
k=0 is exactly the student and k=K exactly the teacher, where K is the number of multi-layer blocks; the paper
counts k the same way.

Nothing here touches tensors (`boomerang_jax.surgery.transforms` does); the only file read is a plan JSON
given to `LayerPlan.from_spec`, the one parser of user-given plans (CLI --plan, a run config's `plan:`).
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from boomerang_jax.infra import storage

STUDENT, TEACHER = "student", "teacher"
ORDERS = ("last-to-first", "first-to-last")
PLAN_FORMAT = "boomerang-layer-plan"
PLAN_VERSION = 1

class PlanError(ValueError):
    """A layer plan that is not a partition of the teacher's layers into contiguous, ordered blocks."""


class SurgeryError(ValueError):
    """Models or patched sets that do not fit together (architecture, layer counts, plan, indices)."""


# ------------------------------------------------------------------------------------------- layer plan
def _as_int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise PlanError(f"{what} must be an integer, got {value!r}") from None


def validate_blocks(num_teacher_layers: int, blocks: Sequence[Sequence[int]]) -> None:
    """Raise PlanError naming the offending block/layer unless `blocks` partition 0..N-1 contiguously, in order."""
    n = num_teacher_layers
    if n < 1:
        raise PlanError(f"a plan needs a teacher with at least one layer (num_teacher_layers={n})")
    if not blocks:
        raise PlanError("a plan needs at least one block (one per student layer)")
    owner: dict[int, int] = {}
    for i, block in enumerate(blocks):
        if not block:
            raise PlanError(f"block {i} (student layer {i}) is empty; every block needs at least one teacher layer")
        for j in block:
            if not 0 <= j < n:
                raise PlanError(f"block {i} (student layer {i}) lists teacher layer {j}, outside 0..{n - 1}")
            if j in owner:
                where = f"blocks {owner[j]} and {i}" if owner[j] != i else f"block {i} twice"
                raise PlanError(f"teacher layer {j} is in {where}; each teacher layer must be in exactly one block")
            owner[j] = i
        for a, b in zip(block, block[1:]):
            if b != a + 1:
                raise PlanError(f"block {i} (student layer {i}) {list(block)} is not contiguous: teacher layer "
                                f"{a} is followed by {b}, expected {a + 1}")
    missing = [j for j in range(n) if j not in owner]
    if missing:
        raise PlanError(f"teacher layer {missing[0]} is in no block"
                        + (f" (nor are {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for i in range(1, len(blocks)):
        if blocks[i][0] != blocks[i - 1][-1] + 1:
            raise PlanError(f"blocks are out of order: block {i} starts at teacher layer {blocks[i][0]} but block "
                            f"{i - 1} ends at teacher layer {blocks[i - 1][-1]}; blocks must follow the teacher's order")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """The teacher's layer count and, per student layer, the block of teacher layers it stands for.

    Student layer i is initialised from `blocks[i][0]` (see `kept`). Validated on construction.
    """

    num_teacher_layers: int
    blocks: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = _as_int(self.num_teacher_layers, "num_teacher_layers")
        try:
            blocks = tuple(tuple(_as_int(j, f"block {i} entry") for j in b) for i, b in enumerate(self.blocks))
        except TypeError:
            raise PlanError(f"blocks must be a list of lists of teacher layer ids, got {self.blocks!r}") from None
        object.__setattr__(self, "num_teacher_layers", n)
        object.__setattr__(self, "blocks", blocks)
        validate_blocks(n, blocks)

    # ---- constructors
    @classmethod
    def from_knobs(cls, num_teacher_layers: int, every: int = 2, first: int = 1, last: int = 2) -> LayerPlan:
        """The paper's knobs: keep layers 0..first-1, every `every`-th layer from first-1 on, and the last `last`.

        Defaults are the reference's (every=2, first=1, last=2); the paper's Llama student uses first=2, last=1.
        """
        n = _as_int(num_teacher_layers, "num_teacher_layers")
        every, first, last = (_as_int(v, k) for v, k in ((every, "every"), (first, "first"), (last, "last")))
        if n < 1:
            raise PlanError(f"a plan needs a teacher with at least one layer (num_teacher_layers={n})")
        if every < 1:
            raise PlanError(f"every must be >= 1 (got {every})")
        if not 1 <= first <= n:
            raise PlanError(f"first must be in 1..{n} (teacher layer 0 always starts the first block; got {first})")
        if not 0 <= last <= n:
            raise PlanError(f"last must be in 0..{n} (got {last})")
        kept = set(range(first)) | set(range(first - 1, n, every)) | set(range(n - last, n))
        return cls.from_kept(n, sorted(kept))

    @classmethod
    def from_kept(cls, num_teacher_layers: int, kept: Iterable[int]) -> LayerPlan:
        """Blocks that start at each kept teacher layer (which must include 0, ascending, no repeats)."""
        kept = [_as_int(j, "kept layer") for j in kept]
        if not kept or kept[0] != 0:
            raise PlanError(f"kept layers must start with teacher layer 0 (got {kept[:5]})")
        for a, b in zip(kept, kept[1:]):
            if b <= a:
                raise PlanError(f"kept layers must be strictly ascending: {a} is followed by {b}")
        if kept[-1] >= num_teacher_layers:
            raise PlanError(f"kept teacher layer {kept[-1]} is outside 0..{num_teacher_layers - 1}")
        ends = kept[1:] + [num_teacher_layers]
        return cls(num_teacher_layers, tuple(tuple(range(a, b)) for a, b in zip(kept, ends)))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "plan") -> LayerPlan:
        """Inverse of `to_dict`; `source` names the file in error messages."""
        if not isinstance(d, dict) or "blocks" not in d or "num_teacher_layers" not in d:
            raise PlanError(f"{source}: a layer plan needs 'num_teacher_layers' and 'blocks'")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"{source}: format {d.get('format')!r} is not {PLAN_FORMAT!r}")
        if int(d.get("version", PLAN_VERSION)) > PLAN_VERSION:
            raise PlanError(f"{source}: plan version {d['version']} is newer than this code ({PLAN_VERSION})")
        try:
            plan = cls(d["num_teacher_layers"], d["blocks"])
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        if "kept" in d and list(d["kept"]) != list(plan.kept):
            raise PlanError(f"{source}: 'kept' {d['kept']} does not match the blocks' first layers {list(plan.kept)}")
        return plan

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "plan") -> LayerPlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=source)

    @classmethod
    def parse(cls, spec: str, num_teacher_layers: int) -> LayerPlan:
        """A plan from a short spec: 'every=2,first=1,last=2' (any subset of knobs) or 'kept=0,2,4,...'."""
        spec = spec.strip()
        if spec.startswith("kept="):
            return cls.from_kept(num_teacher_layers, [_parse_int(x, spec) for x in spec[5:].split(",") if x.strip()])
        knobs: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("every", "first", "last"):
                raise PlanError(f"plan spec {spec!r}: expected 'every=E,first=F,last=L' or 'kept=0,2,...'; "
                                f"cannot read {part!r}")
            knobs[key.strip()] = _parse_int(value, spec)
        return cls.from_knobs(num_teacher_layers, **knobs)

    @classmethod
    def from_spec(cls, spec: Any, num_teacher_layers: int, *, source: str = "plan") -> LayerPlan:
        """The one reader of a plan as users give it: a spec string ('every=2,first=1,last=2', 'kept=0,2,...'),
        a plan JSON file (a plan, or a family.json holding one; local or gs://), or a mapping: a full plan
        (`blocks`), `{kept: [...]}` or the knobs `{every, first, last}` (a run config's `plan:`)."""
        if isinstance(spec, str):
            if storage.is_remote(spec) or Path(spec).is_file():
                try:
                    d = json.loads(storage.read_text(spec))
                except json.JSONDecodeError as e:
                    raise PlanError(f"{spec}: not valid JSON ({e})") from None
                if isinstance(d, dict) and "blocks" not in d and isinstance(d.get("plan"), dict):
                    d = d["plan"]  # a family.json (or any record) holding its plan
                return cls.from_dict(d, source=str(spec))
            return cls.parse(spec, num_teacher_layers)
        if isinstance(spec, Mapping) and "blocks" in spec:
            return cls.from_dict(dict(spec), source=source)
        if isinstance(spec, Mapping) and "kept" in spec:
            return cls.from_kept(num_teacher_layers, spec["kept"])
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"every", "first", "last"})
            if unknown:
                raise PlanError(f"{source}: unknown key(s) {unknown}; expected the knobs every, first, last, "
                                "or kept: [...], or a full plan with blocks")
            return cls.from_knobs(num_teacher_layers, **spec)
        raise PlanError(f"{source}: cannot read {spec!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for checkpoints and exports); `kept` is informational and checked on load."""
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "num_teacher_layers": self.num_teacher_layers,
                "num_student_layers": self.num_student_layers, "kept": list(self.kept),
                "blocks": [list(b) for b in self.blocks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    # ---- derived
    @property
    def num_student_layers(self) -> int:
        return len(self.blocks)

    @property
    def kept(self) -> tuple[int, ...]:
        """Teacher layer that initialises each student layer (its block's first)."""
        return tuple(b[0] for b in self.blocks)

    @property
    def multi_layer_blocks(self) -> tuple[int, ...]:
        """Student layers whose block has more than one teacher layer (the ones patching changes size with)."""
        return tuple(i for i, b in enumerate(self.blocks) if len(b) > 1)

    def aligned_pairs(self) -> tuple[tuple[int, int], ...]:
        """(student, teacher) HF hidden-state indices compared by the cosine loss.

        (0, 0) for the embedding outputs, then student layer i's output with the output of the last teacher
        layer of block i: (i + 1, blocks[i][-1] + 1). In HF indexing the last pair, (M, N), is the final-norm
        output of both models, so there are M + 1 pairs.
        """
        return ((0, 0),) + tuple((i + 1, b[-1] + 1) for i, b in enumerate(self.blocks))

    def student_hidden_indices(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.aligned_pairs())

    def teacher_hidden_indices(self) -> tuple[int, ...]:
        return tuple(t for _, t in self.aligned_pairs())

    def num_layers(self, patched: Iterable[int]) -> int:
        """Layer count of the model with `patched` student layers replaced by their blocks."""
        p = check_patched(self, patched)
        return self.num_student_layers + sum(len(self.blocks[i]) - 1 for i in p)


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise PlanError(f"plan spec {spec!r}: {text.strip()!r} is not an integer") from None


# -------------------------------------------------------------------------------------- patched sets
def check_patched(plan: LayerPlan, patched: Iterable[int]) -> frozenset[int]:
    """`patched` as a frozenset of student layer ids, each checked to exist."""
    out = set()
    m = plan.num_student_layers
    for i in patched:
        try:
            i = operator.index(i)
        except TypeError:
            raise SurgeryError(f"patched student layer {i!r} is not an integer") from None
        if not 0 <= i < m:
            raise SurgeryError(f"patched student layer {i} does not exist (the student has {m} layers: 0..{m - 1})")
        out.add(i)
    return frozenset(out)


def num_steps(plan: LayerPlan) -> int:
    """K: the number of multi-layer blocks, so an order has sizes k = 0..K."""
    return len(plan.multi_layer_blocks)


Order = str | Sequence[int]  # a named order (ORDERS) or the multi-layer blocks in the sequence they are patched


def patch_sequence(plan: LayerPlan, order: Order) -> tuple[int, ...]:
    """The multi-layer blocks (student layer ids) in the sequence `order` patches them."""
    multi = plan.multi_layer_blocks
    if not multi:
        raise SurgeryError("the plan has no multi-layer blocks, so patching never changes the size; "
                           "pass explicit patched sets instead of an order")
    if isinstance(order, str):
        if order not in ORDERS:
            raise SurgeryError(f"unknown order {order!r}; known: {', '.join(ORDERS)}, or an explicit sequence "
                               "of the multi-layer blocks")
        return tuple(reversed(multi)) if order == "last-to-first" else tuple(multi)
    seq = []
    for i in order:
        try:
            seq.append(operator.index(i))
        except TypeError:
            raise SurgeryError(f"order {list(order)!r}: {i!r} is not a student layer id") from None
    single = sorted(set(seq) - set(multi))
    if single:
        raise SurgeryError(f"order {seq}: student layer(s) {single} are not multi-layer blocks of the plan "
                           f"(those are {list(multi)})")
    repeated = sorted({i for i in seq if seq.count(i) > 1})
    if repeated:
        raise SurgeryError(f"order {seq}: block(s) {repeated} appear more than once")
    missing = sorted(set(multi) - set(seq))
    if missing:
        raise SurgeryError(f"order {seq}: multi-layer block(s) {missing} are missing; an order lists all of "
                           f"{list(multi)}")
    return tuple(seq)


def patched_for(plan: LayerPlan, order: Order, k: int) -> frozenset[int]:
    """Student layers patched at step k of `order` (see the module docstring for single-layer blocks)."""
    seq = patch_sequence(plan, order)
    k = operator.index(k)
    if not 0 <= k <= len(seq):
        raise SurgeryError(f"step k={k} is out of range for this plan: k runs from 0 (student) to "
                           f"{len(seq)} (teacher)")
    rank = {block: n for n, block in enumerate(seq)}  # when each multi-layer block is patched
    patched = set(seq[:k])
    for i in range(plan.num_student_layers):
        if i in rank:
            continue
        before = [j for j in seq if j < i]
        after = [j for j in seq if j > i]
        neighbours = ([max(before)] if before else []) + ([min(after)] if after else [])
        if all(rank[j] < k for j in neighbours):  # patched once the later of its neighbours is
            patched.add(i)
    return frozenset(patched)


def patched_first(plan: LayerPlan, blocks: Sequence[int]) -> frozenset[int]:
    """The patched set once the multi-layer `blocks` are patched, in any order: step len(blocks) of every
    order that starts with them (single-layer blocks closed as `patched_for` closes them)."""
    first = list(blocks)
    return patched_for(plan, first + [b for b in plan.multi_layer_blocks if b not in first], len(first))


def last_to_first(plan: LayerPlan, k: int) -> frozenset[int]:
    """Patch the last k multi-layer blocks (and the single-layer blocks after them); k=K is the teacher."""
    return patched_for(plan, "last-to-first", k)


def first_to_last(plan: LayerPlan, k: int) -> frozenset[int]:
    """Patch the first k multi-layer blocks (and the single-layer blocks before them); k=K is the teacher."""
    return patched_for(plan, "first-to-last", k)


def family(plan: LayerPlan, order: Order = "last-to-first") -> list[frozenset[int]]:
    """Every size of `order`, smallest first: element k is the patched set of step k (0 = student, K = teacher)."""
    return [patched_for(plan, order, k) for k in range(num_steps(plan) + 1)]



"""Layer plans, pruning and zero-shot interpolation: pure functions on parameter pytrees (ALGORITHM.md 1 and 3).

A `LayerPlan` cuts the teacher's layers into contiguous blocks, one per student layer. `prune` keeps the first
layer of every block; `interpolate` swaps any subset of student layers back for their teacher blocks. The
embedding comes from whoever supplies the first layer, the final norm and LM head from whoever supplies the
last; a tied model whose embedding and head come from different models becomes untied.

Orders: an order is the sequence in which the multi-layer blocks are patched; step k patches its first k.
The paper's two named orders are `last-to-first` and `first-to-last` (the patched set is a suffix or prefix
of the blocks); any other sequence of the multi-layer blocks may be given explicitly, e.g. one chosen from
data (`boomerang_jax.eval.patch_order`). Single-layer blocks change no size, so each is patched together with
whichever of its neighbouring multi-layer blocks the order patches later (a single-layer block stays the
student's while a student layer is next to it); for the named orders this keeps the patched set a suffix or
prefix. The last step patches every block. Hence k=0 is exactly the student and k=K exactly the teacher,
where K is the number of multi-layer blocks; the paper counts k the same way.

Nothing here does I/O (see `boomerang_jax.family` for exports).
"""

from __future__ import annotations

import dataclasses
import json
import operator
from typing import Any, Iterable, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from boomerang_jax.hf import names
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params

STUDENT, TEACHER = "student", "teacher"
ORDERS = ("last-to-first", "first-to-last")
PLAN_FORMAT = "boomerang-layer-plan"
PLAN_VERSION = 1

# ModelConfig fields that may differ between a student and its teacher (everything else is the architecture).
_NON_ARCH_FIELDS = {"num_layers", "tie_word_embeddings", "max_position_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id"}


class PlanError(ValueError):
    """A layer plan that is not a partition of the teacher's layers into contiguous, ordered blocks."""


class SurgeryError(ValueError):
    """Models or patched sets that do not fit together (architecture, layer counts, plan, indices)."""


class Model(NamedTuple):
    """A model as surgery sees it: its config and its (stacked) parameter tree."""

    config: ModelConfig
    params: Params


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
    def from_knobs(cls, num_teacher_layers: int, every: int = 2, first: int = 1, last: int = 2) -> "LayerPlan":
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
    def from_kept(cls, num_teacher_layers: int, kept: Iterable[int]) -> "LayerPlan":
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
    def from_dict(cls, d: dict[str, Any], *, source: str = "plan") -> "LayerPlan":
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
    def from_json(cls, text: str | bytes, *, source: str = "plan") -> "LayerPlan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=source)

    @classmethod
    def parse(cls, spec: str, num_teacher_layers: int) -> "LayerPlan":
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


# ----------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every part of one interpolated model comes from ("student" or "teacher")."""

    patched: tuple[int, ...]  # student layers replaced by their teacher blocks, ascending
    layers: tuple[tuple[str, int], ...]  # per output layer: (model, layer index in that model)
    embedding: str  # source of the input embedding (whoever supplies the first layer)
    head: str  # source of the final norm and LM head (whoever supplies the last layer)
    tie_word_embeddings: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def layout(plan: LayerPlan, patched: Iterable[int], *, student_tied: bool, teacher_tied: bool) -> Layout:
    """The layout of the model with `patched` student layers replaced in place by their teacher blocks.

    The result is tied only if embedding and head come from the same model and that model is tied.
    """
    p = check_patched(plan, patched)
    layers: list[tuple[str, int]] = []
    for i, block in enumerate(plan.blocks):
        layers += [(TEACHER, j) for j in block] if i in p else [(STUDENT, i)]
    embedding, head = layers[0][0], layers[-1][0]
    tied = embedding == head and (student_tied if embedding == STUDENT else teacher_tied)
    return Layout(tuple(sorted(p)), tuple(layers), embedding, head, tied)


@dataclasses.dataclass(frozen=True)
class HybridIndex:
    """Where an interpolated model's parts sit in the student and teacher stacks, as arrays a jitted step can
    gather with (so one compiled step serves every patched set of the same size).

    `layers[l]`: layer l's index in concat(student layers, teacher layers) (a teacher layer j is M + j);
    `hidden[i]`: the model's HF hidden-state index of the student's aligned index i (`plan.aligned_pairs`);
    `teacher_embedding` / `teacher_head`: whether the embedding / final norm and head are the teacher's.
    """

    layers: np.ndarray
    hidden: np.ndarray
    teacher_embedding: np.ndarray
    teacher_head: np.ndarray


def hybrid_index(plan: LayerPlan, patched: Iterable[int]) -> HybridIndex:
    """The gather indices of the model `interpolate(student, teacher, plan, patched)` builds (see HybridIndex)."""
    lay = layout(plan, patched, student_tied=True, teacher_tied=True)
    m = plan.num_student_layers
    layers = [j if src == STUDENT else m + j for src, j in lay.layers]
    sizes = [len(b) if i in lay.patched else 1 for i, b in enumerate(plan.blocks)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    hidden = [int(bounds[s]) for s, _ in plan.aligned_pairs()]
    return HybridIndex(np.asarray(layers, np.int32), np.asarray(hidden, np.int32),
                       np.asarray(lay.embedding == TEACHER), np.asarray(lay.head == TEACHER))


# ------------------------------------------------------------------------------------ model surgery
def _model(x: Any, what: str) -> Model:
    if hasattr(x, "config") and hasattr(x, "params"):
        return Model(x.config, x.params)
    try:
        config, params = x
    except (TypeError, ValueError):
        raise SurgeryError(f"{what} must be (config, params) or have .config and .params, got {type(x)}") from None
    return Model(config, params)


def check_compatible(student: ModelConfig, teacher: ModelConfig, plan: LayerPlan) -> None:
    """Raise SurgeryError unless student and teacher share the architecture and fit `plan`."""
    for f in dataclasses.fields(ModelConfig):
        if f.name in _NON_ARCH_FIELDS:
            continue
        a, b = getattr(student, f.name), getattr(teacher, f.name)
        if a != b:
            raise SurgeryError(f"student and teacher differ in {f.name}: {a!r} (student) vs {b!r} (teacher); "
                               "interpolation needs the same architecture")
    if plan.num_teacher_layers != teacher.num_layers:
        raise SurgeryError(f"the plan is for a {plan.num_teacher_layers}-layer teacher, but the teacher has "
                           f"{teacher.num_layers} layers")
    if plan.num_student_layers != student.num_layers:
        raise SurgeryError(f"the plan has {plan.num_student_layers} blocks (student layers), but the student has "
                           f"{student.num_layers} layers")


def interpolated_config(student: ModelConfig, teacher: ModelConfig, lay: Layout) -> ModelConfig:
    """Config of an interpolated model: the embedding source's, with the new layer count and tie flag."""
    base = student if lay.embedding == STUDENT else teacher
    return base.replace(num_layers=lay.num_layers, tie_word_embeddings=lay.tie_word_embeddings)


def _xp(*arrays: Any) -> Any:
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def _take_layers(leaf: Any, idx: Sequence[int]) -> Any:
    return leaf[np.asarray(idx, dtype=np.int32)]


def _leaf_paths(tree: Params, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        out += _leaf_paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)]
    return out


def _get(tree: Params, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def prune(teacher_params: Params, teacher_config: ModelConfig, plan: LayerPlan) -> Model:
    """The student: the teacher's kept layers (each block's first), embedding, final norm and LM head.

    Non-layer leaves are shared with the teacher, not copied (arrays are never mutated here).
    """
    if plan.num_teacher_layers != teacher_config.num_layers:
        raise SurgeryError(f"the plan is for a {plan.num_teacher_layers}-layer teacher, but the teacher has "
                           f"{teacher_config.num_layers} layers")
    params = {k: v for k, v in teacher_params.items() if k != "layers"}
    layers: dict = {}
    for path in _leaf_paths(teacher_params["layers"]):
        _set(layers, path, _take_layers(_get(teacher_params["layers"], path), plan.kept))
    params["layers"] = layers
    return Model(teacher_config.replace(num_layers=plan.num_student_layers), params)


def _runs(sources: Sequence[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """Consecutive layers from the same model grouped: [(model, [layer ids]), ...]."""
    runs: list[tuple[str, list[int]]] = []
    for model, layer in sources:
        if runs and runs[-1][0] == model:
            runs[-1][1].append(layer)
        else:
            runs.append((model, [layer]))
    return runs


def interpolate(student: Any, teacher: Any, plan: LayerPlan, patched: Iterable[int]) -> Model:
    """The model with `patched` student layers (any subset) replaced in place by their teacher blocks.

    `student`/`teacher` are (config, params) pairs or objects with .config and .params (e.g. a Checkpoint).
    Patching nothing gives the student exactly; patching everything gives the teacher exactly.
    """
    s, t = _model(student, "student"), _model(teacher, "teacher")
    check_compatible(s.config, t.config, plan)
    lay = layout(plan, patched, student_tied=s.config.tie_word_embeddings,
                 teacher_tied=t.config.tie_word_embeddings)
    models = {STUDENT: s, TEACHER: t}
    runs = _runs(lay.layers)
    layers: dict = {}
    for path in _leaf_paths(t.params["layers"]):
        leaves = {name: _get(m.params["layers"], path) for name, m in models.items()}
        if leaves[STUDENT].dtype != leaves[TEACHER].dtype:
            raise SurgeryError(f"layers/{'/'.join(path)} is {leaves[STUDENT].dtype} in the student but "
                               f"{leaves[TEACHER].dtype} in the teacher; load both in the same dtype")
        pieces = [_take_layers(leaves[name], idx) for name, idx in runs]
        _set(layers, path, pieces[0] if len(pieces) == 1 else _xp(*pieces).concatenate(pieces, axis=0))
    emb, head = models[lay.embedding], models[lay.head]
    params: dict = {"embed": emb.params["embed"], "final_norm": head.params["final_norm"], "layers": layers}
    if not lay.tie_word_embeddings:
        kernel = head.params["lm_head"]["kernel"] if not head.config.tie_word_embeddings \
            else head.params["embed"]["embedding"].T
        params["lm_head"] = {"kernel": kernel}
    return Model(interpolated_config(s.config, t.config, lay), params)


# --------------------------------------------------------------------------------------- counting
@dataclasses.dataclass(frozen=True)
class ParamCount:
    """Unique parameters of one model (a tied embedding counts once).

    `embedding` counts the input embedding plus an untied LM head; `non_embedding` is everything else.
    """

    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "non_embedding": self.non_embedding, "embedding": self.embedding}


_EMBEDDING_TARGETS = {("embed", "embedding"), ("lm_head", "kernel")}


def count_params(config: ModelConfig) -> ParamCount:
    """Parameter count of a model with this config, from shapes alone (no arrays needed)."""
    total = embedding = 0
    for e in names.entries(config):
        n = int(np.prod(e.hf_shape, dtype=np.int64)) * (config.num_layers if e.per_layer else 1)
        total += n
        if not e.per_layer and set(e.targets) <= _EMBEDDING_TARGETS:
            embedding += n
    return ParamCount(total, embedding)

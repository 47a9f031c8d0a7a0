"""The sharded distillation train step: frozen bf16 teacher + fp32-master student, AdamW, micro-batching.

Batch contract (what the data pipeline yields, one dict per step, every array [B, T], B = global batch):

    tokens       int32  input token ids
    targets      int32  next token at each position (any id where loss_mask is 0)
    segment_ids  int32  document id within the packed row, 1, 2, ...; 0 = padding
    positions    int32  position within the document (restarts at 0 at each segment start)
    loss_mask    bool or float32; 0 on padding and on the last token of each segment (it has no next token
                 in its segment), 1 (or a weight) elsewhere

The step (`Distiller.step`) is one `jax.jit` with explicit NamedShardings: the batch is split over
("data", "fsdp"), parameters follow `boomerang_jax.infra.parallel`'s rules, the teacher lives on the same mesh in
bf16 and the train state is donated. Each micro-batch runs the teacher forward (no gradient, no logits), the
student forward (remat policy configurable) and the chunked loss from final hidden states + LM heads; the
gradients of k micro-batches are accumulated in a `lax.scan`, weighted so that the result equals one step on
the whole batch (every loss term is a mean over real tokens of the whole batch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from boomerang_jax.distill.loss import LossConfig, distill_loss
from boomerang_jax.infra import parallel
from boomerang_jax.models import sharding
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import (
    REMAT_POLICIES,
    Params,
    forward,
    head_kernel,
    param_shapes,
)
from boomerang_jax.surgery import LayerPlan, hybrid_index, patched_first

Batch = dict[str, jax.Array]
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, precision and step layout (defaults: the paper's recipe, ALGORITHM.md section 2)."""

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    total_steps: int = 500
    warmup_steps: int | None = None  # None: 1% of total_steps, rounded up
    end_lr_ratio: float = 0.0  # cosine decays to lr * end_lr_ratio at total_steps
    clip_norm: float = 1.0
    micro_batches: int = 1
    compute_dtype: str = "bfloat16"  # activations / matmul operands of both models
    teacher_dtype: str = "bfloat16"  # storage of the frozen teacher
    param_dtype: str = "float32"  # student master weights and optimiser moments
    remat: str = "full"  # student layer remat policy: one of models.transformer.REMAT_POLICIES
    # Patch-aware distillation (docs/DECISIONS.md): step s trains the student with patch_sizes[s % len] random
    # multi-layer blocks patched by their frozen teacher blocks (0 = the plain student). () = the paper's recipe.
    patch_sizes: tuple[int, ...] = ()
    patch_seed: int = 0

    def __post_init__(self) -> None:
        for name, ok, rule in _TRAIN_RULES:
            _check_number("train", name, getattr(self, name), ok, rule)
        try:
            sizes = tuple(int(m) for m in self.patch_sizes)
        except (TypeError, ValueError):
            raise ValueError(f"patch_sizes must be a list of block counts, got {self.patch_sizes!r}") from None
        if any(m < 0 for m in sizes):
            raise ValueError(f"patch_sizes must be >= 0, got {list(sizes)}")
        object.__setattr__(self, "patch_sizes", sizes)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        for name in ("compute_dtype", "teacher_dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return max(0, int(self.warmup_steps))
        return math.ceil(0.01 * self.total_steps)


def _check_number(section: str, name: str, value: Any, ok: Callable[[float], bool], rule: str,
                  integer: bool = False) -> None:
    """Raise ValueError naming `section.name` unless `value` is a real number (an int if `integer`) obeying `rule`."""
    kinds = (int,) if integer else (int, float)
    if value is None and name == "warmup_steps":
        return
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not ok(value):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{section}.{name} must be {kind} {rule}, got {value!r}")


# (field, check, rule as the error says it): nonsense values fail before anything runs, naming the key
_TRAIN_RULES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("lr", lambda v: v > 0, "> 0"),
    ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("eps", lambda v: v > 0, "> 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("end_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1] (the cosine's final share of lr)"),
    ("clip_norm", lambda v: v > 0, "> 0"),
    ("warmup_steps", lambda v: v >= 0 and float(v).is_integer(), ">= 0 (whole steps) or null for 1%"),
)


class TrainState(NamedTuple):
    """Everything that changes during training: a plain pytree, so orbax can checkpoint it as is."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array


# ------------------------------------------------------------------------------------------- optimiser
def lr_schedule(cfg: TrainConfig) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup to cfg.lr over `warmup` steps (step 0 already gets lr/warmup), then cosine to the end."""
    peak, end, warm, total = cfg.lr, cfg.lr * cfg.end_lr_ratio, cfg.warmup, cfg.total_steps

    def schedule(step: jax.Array) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        warm_lr = peak * (s + 1.0) / max(warm, 1)
        progress = jnp.clip((s - warm) / max(total - warm, 1), 0.0, 1.0)
        cos_lr = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(s < warm, warm_lr, cos_lr)

    return schedule


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on every parameter, as the reference does)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


# ------------------------------------------------------------------------------------ patched hybrids
Hybrid = dict[str, jax.Array]  # surgery.HybridIndex as arrays: layers, hidden, teacher_embedding, teacher_head


def hybrid_arrays(plan: LayerPlan, patched: Any) -> Hybrid:
    """The gather indices of the student with `patched` blocks replaced by their teacher blocks."""
    return dataclasses.asdict(hybrid_index(plan, patched))


def hybrid_model(student_params: Params, teacher_params: Params, hybrid: Hybrid, *, student_config: ModelConfig,
                 teacher_config: ModelConfig) -> tuple[Params, ModelConfig, jax.Array]:
    """(params, config, LM head) of the interpolated model `hybrid` describes, built by gathers so that the
    patched set is data, not structure. The teacher's parts are frozen (no gradient); the result's layers are in
    the student's dtype. Matches `surgery.interpolate` (tested)."""
    frozen = jax.lax.stop_gradient(teacher_params)
    idx = hybrid["layers"]
    m = jax.tree.leaves(student_params["layers"])[0].shape[0]
    from_teacher = idx >= m

    def gather(s: jax.Array, t: jax.Array) -> jax.Array:  # each stack gathered at hybrid size, then selected
        t_rows = t[jnp.clip(idx - m, 0, t.shape[0] - 1)].astype(s.dtype)
        s_rows = s[jnp.clip(idx, 0, m - 1)]
        return jnp.where(from_teacher.reshape((-1,) + (1,) * (s.ndim - 1)), t_rows, s_rows)

    layers = jax.tree.map(gather, student_params["layers"], frozen["layers"])
    pick = lambda flag, t, s: jnp.where(flag, t.astype(s.dtype), s)  # noqa: E731
    embedding = pick(hybrid["teacher_embedding"], frozen["embed"]["embedding"], student_params["embed"]["embedding"])
    final_norm = jax.tree.map(lambda t, s: pick(hybrid["teacher_head"], t, s), frozen["final_norm"],
                              student_params["final_norm"])
    head = pick(hybrid["teacher_head"], head_kernel(frozen, teacher_config), head_kernel(student_params, student_config))
    params = {"embed": {"embedding": embedding}, "final_norm": final_norm, "layers": layers}
    # logits are never asked of this forward (the loss uses `head`), so the config stays tied: no lm_head needed
    config = student_config.replace(num_layers=int(hybrid["layers"].shape[0]), tie_word_embeddings=True)
    return params, config, head


def check_patch_sizes(plan: LayerPlan, sizes: tuple[int, ...]) -> None:
    """Raise ValueError naming the first entry of `sizes` that `plan` cannot draw (0 = the plain student)."""
    n = len(plan.multi_layer_blocks)
    for m in sizes:
        if m and not 0 < m < n:
            raise ValueError(f"train.patch_sizes entry {m}: a hybrid patches 1..{n - 1} of the plan's "
                             f"{n} multi-layer blocks (0 = the plain student)")


def patch_schedule(plan: LayerPlan, sizes: tuple[int, ...], seed: int, step: int) -> frozenset[int] | None:
    """The blocks patched at training step `step` (0-based) of patch-aware distillation: `sizes[step % len]`
    multi-layer blocks drawn uniformly (fixed by seed and step, so a resumed run draws the same), closed the way
    a family closes them (`surgery.patched_first`). None (the plain student) when that size is 0 or sizes is
    empty."""
    m = sizes[step % len(sizes)] if sizes else 0
    if m == 0:
        return None
    check_patch_sizes(plan, (m,))
    multi = plan.multi_layer_blocks
    rng = np.random.default_rng([seed, step])
    return patched_first(plan, [multi[i] for i in rng.choice(len(multi), size=m, replace=False)])


# ----------------------------------------------------------------------------------------------- loss
def distill_forward(
    student_params: Params,
    teacher_params: Params,
    batch: Batch,
    *,
    student_config: ModelConfig,
    teacher_config: ModelConfig,
    plan: LayerPlan,
    loss_cfg: LossConfig,
    compute_dtype: Any = jnp.bfloat16,
    remat: str = "none",
    activation_sharding: NamedSharding | None = None,
    hybrid: Hybrid | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one (micro-)batch: teacher forward without gradient, student forward, chunked loss.
    With `hybrid` (`hybrid_arrays`), the model trained is the student with those blocks patched."""
    dtype = jnp.dtype(compute_dtype)
    common = dict(segment_ids=batch["segment_ids"], positions=batch["positions"], return_logits=False, dtype=dtype)
    teacher = forward(teacher_params, teacher_config, batch["tokens"],
                      hidden_indices=plan.teacher_hidden_indices(), hidden_buffer=True, **common)
    teacher = jax.lax.stop_gradient(teacher)
    if hybrid is None:
        student = forward(student_params, student_config, batch["tokens"],
                          hidden_indices=plan.student_hidden_indices(), remat=remat, **common)
        student_hidden, student_head = student.hidden_states, head_kernel(student_params, student_config)
    else:  # the student with some blocks patched: gradients reach the student layers through frozen teacher blocks
        params, config, student_head = hybrid_model(student_params, teacher_params, hybrid,
                                                    student_config=student_config, teacher_config=teacher_config)
        student = forward(params, config, batch["tokens"], hidden_indices=tuple(range(config.num_layers + 1)),
                          remat=remat, **common)
        student_hidden = list(jnp.take(jnp.stack(student.hidden_states), hybrid["hidden"], axis=0))

    def constrain(x: jax.Array) -> jax.Array:
        return x if activation_sharding is None else jax.lax.with_sharding_constraint(x, activation_sharding)

    return distill_loss(
        loss_cfg,
        student_final=constrain(student.final_hidden),
        student_head=student_head,
        teacher_final=constrain(teacher.final_hidden),
        teacher_head=jax.lax.stop_gradient(head_kernel(teacher_params, teacher_config)),
        targets=batch["targets"],
        loss_mask=batch["loss_mask"],
        student_hidden=[constrain(h) for h in student_hidden],
        teacher_hidden=[constrain(h) for h in teacher.hidden_states],
    )


# ----------------------------------------------------------------------------------------------- step
class Distiller:
    """The sharded train step and its shardings for one (student, teacher, plan, mesh) setup.

    Typical use::

        d = Distiller(student_cfg, teacher_cfg, plan, mesh, TrainConfig(...), LossConfig())
        teacher = d.put_teacher(teacher_params)          # bf16, sharded on the mesh
        state = d.init_state(student_params)             # fp32 master weights + AdamW state, sharded
        for batch in data:
            state, metrics = d.step(state, teacher, d.put_batch(batch))   # state is donated
    """

    def __init__(
        self,
        student_config: ModelConfig,
        teacher_config: ModelConfig,
        plan: LayerPlan,
        mesh: Mesh,
        train_cfg: TrainConfig | None = None,
        loss_cfg: LossConfig | None = None,
    ) -> None:
        train_cfg = TrainConfig() if train_cfg is None else train_cfg
        loss_cfg = LossConfig() if loss_cfg is None else loss_cfg
        if plan.num_student_layers != student_config.num_layers or plan.num_teacher_layers != teacher_config.num_layers:
            raise ValueError(f"plan ({plan.num_student_layers} <- {plan.num_teacher_layers} layers) does not fit "
                             f"student ({student_config.num_layers}) / teacher ({teacher_config.num_layers})")
        self.student_config, self.teacher_config, self.plan = student_config, teacher_config, plan
        check_patch_sizes(plan, train_cfg.patch_sizes)  # a bad size is an error now, not at its first step
        self.mesh, self.train_cfg, self.loss_cfg = mesh, train_cfg, loss_cfg
        self.optimizer = make_optimizer(train_cfg)
        self.schedule = lr_schedule(train_cfg)

        student_shapes = param_shapes(student_config, jnp.dtype(train_cfg.param_dtype))
        teacher_shapes = param_shapes(teacher_config, jnp.dtype(train_cfg.teacher_dtype))
        self._shapes = {"student": student_shapes, "teacher": teacher_shapes}
        self.param_shardings = sharding.param_shardings(student_shapes, student_config, mesh)
        self.teacher_shardings = sharding.param_shardings(teacher_shapes, teacher_config, mesh)
        opt_shapes = jax.eval_shape(self.optimizer.init, student_shapes)
        self.state_shardings = TrainState(
            params=self.param_shardings,
            opt_state=_opt_state_shardings(opt_shapes, student_shapes, self.param_shardings, mesh),
            step=parallel.replicated(mesh),
        )
        self.batch_sharding = parallel.batch_sharding(mesh)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.teacher_shardings, self.batch_sharding,
                          parallel.replicated(mesh)),
            out_shardings=(self.state_shardings, parallel.replicated(mesh)),
            donate_argnums=(0,),
        )
        self._eval = jax.jit(
            self._eval_step,
            in_shardings=(self.param_shardings, self.teacher_shardings, self.batch_sharding),
            out_shardings=parallel.replicated(mesh),
        )
        self._init_opt = jax.jit(self.optimizer.init, in_shardings=(self.param_shardings,),
                                 out_shardings=self.state_shardings.opt_state)

    # ---- placing things on the mesh
    def put_teacher(self, teacher_params: Params) -> Params:
        """The frozen teacher in `teacher_dtype`, sharded by the partition rules (never replicated per device)."""
        _check_tree(teacher_params, self._shapes["teacher"], "teacher")
        return parallel.put(teacher_params, self.teacher_shardings, self.train_cfg.teacher_dtype)

    def init_state(self, student_params: Params) -> TrainState:
        """Fresh train state: student master weights in `param_dtype`, zero AdamW moments, step 0, all sharded."""
        _check_tree(student_params, self._shapes["student"], "student")
        params = parallel.put(student_params, self.param_shardings, self.train_cfg.param_dtype)
        step = parallel.put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(params=params, opt_state=self._init_opt(params), step=step)

    def put_batch(self, batch: dict[str, Any], *, micro_batches: int | None = None) -> Batch:
        """This process's rows of the global batch (all of it on one process) -> a global sharded batch.

        The batch must split into `micro_batches` (default: train.micro_batches, for `step`) micro-batches that
        each divide over data x fsdp; pass `micro_batches=1` for a held-out batch (`evaluate` never splits).
        """
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; a batch needs {list(BATCH_KEYS)}")
        local = {k: batch[k] for k in BATCH_KEYS}
        global_rows = parallel.global_batch_size(next(iter(local.values())).shape[0], self.mesh)
        k = self.train_cfg.micro_batches if micro_batches is None else micro_batches
        parallel.check_batch_size(global_rows, self.mesh, k)
        return parallel.global_batch(local, self.mesh, global_rows)

    def put_eval_batch(self, batch: dict[str, Any]) -> Batch:
        """`put_batch` for a held-out batch: one piece over the mesh, whatever train.micro_batches is."""
        return self.put_batch(batch, micro_batches=1)

    # ---- the step
    def step(self, state: TrainState, teacher_params: Params, batch: Batch, *, step: int | None = None
             ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimiser step on a global batch; `state` is donated (do not reuse it). `step` (0-based, needed
        with train.patch_sizes) picks the patched blocks of patch-aware distillation."""
        b = batch["tokens"].shape[0]
        parallel.check_batch_size(b, self.mesh, self.train_cfg.micro_batches)
        if not self.train_cfg.patch_sizes:
            return self._step(state, teacher_params, {k: batch[k] for k in BATCH_KEYS}, None)
        if step is None:
            raise ValueError("train.patch_sizes is set: Distiller.step needs the step number")
        patched = patch_schedule(self.plan, self.train_cfg.patch_sizes, self.train_cfg.patch_seed, step)
        hybrid = None if patched is None else hybrid_arrays(self.plan, patched)
        state, metrics = self._step(state, teacher_params, {k: batch[k] for k in BATCH_KEYS}, hybrid)
        # the loss terms of a hybrid step are the hybrid's: log its size next to them
        layers = self.plan.num_layers(patched or ())
        return state, dict(metrics, model_layers=jnp.asarray(layers, jnp.float32))

    def evaluate(self, params: Params, teacher_params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Loss metrics of the current student on a batch (from `put_eval_batch`), without updating anything.
        The whole batch runs at once: train.micro_batches does not apply."""
        parallel.check_batch_size(batch["tokens"].shape[0], self.mesh)
        return self._eval(params, teacher_params, {k: batch[k] for k in BATCH_KEYS})

    def _gather_embedding(self, params: Params, shardings: Params) -> Params:
        """Gather the embedding over fsdp before use (kept vocab-parallel over tensor): the token lookup then
        yields batch-sharded activations directly instead of an fsdp-sharded hidden dim."""
        emb = shardings["embed"]["embedding"]
        gathered = NamedSharding(self.mesh, sharding.without_fsdp(emb.spec))
        return {**params, "embed": {**params["embed"], "embedding": jax.lax.with_sharding_constraint(
            params["embed"]["embedding"], gathered)}}

    def _loss(self, params: Params, teacher_params: Params, batch: Batch, hybrid: Hybrid | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.train_cfg
        params = self._gather_embedding(params, self.param_shardings)
        teacher_params = self._gather_embedding(teacher_params, self.teacher_shardings)
        return distill_forward(
            params, teacher_params, batch, student_config=self.student_config, teacher_config=self.teacher_config,
            plan=self.plan, loss_cfg=self.loss_cfg, compute_dtype=cfg.compute_dtype, remat=cfg.remat,
            activation_sharding=NamedSharding(self.mesh, P(parallel.BATCH_AXES, None, None)), hybrid=hybrid,
        )

    def _eval_step(self, params: Params, teacher_params: Params, batch: Batch) -> dict[str, jax.Array]:
        return self._loss(params, teacher_params, batch)[1]

    def _grads(self, params: Params, teacher_params: Params, batch: Batch, hybrid: Hybrid | None = None
               ) -> tuple[Params, dict[str, jax.Array]]:
        """Token-weighted gradient and metrics, accumulated over micro-batches (equal to the whole batch's)."""
        k = self.train_cfg.micro_batches
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

        def one(mb: Batch) -> tuple[Params, dict[str, jax.Array]]:
            def weighted(p: Params) -> tuple[jax.Array, dict[str, jax.Array]]:
                loss, metrics = self._loss(p, teacher_params, mb, hybrid)
                w = metrics["tokens"] / total_tokens  # each term is a mean over this micro-batch's tokens
                return loss * w, {n: v if n == "tokens" else v * w for n, v in metrics.items()}

            grads, metrics = jax.grad(weighted, has_aux=True)(params)
            return jax.lax.with_sharding_constraint(grads, self.param_shardings), metrics

        if k == 1:
            return one(batch)
        # Row r of micro-batch j is global row r * k + j: each device keeps exactly its own rows (no resharding).
        split = NamedSharding(self.mesh, P(None, parallel.BATCH_AXES, None))
        micro = jax.tree.map(
            lambda x: jax.lax.with_sharding_constraint(
                jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1), split), batch)

        def body(acc, mb):
            g, m = one(mb)
            return jax.tree.map(jnp.add, acc, (g, m)), None

        zeros = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
        acc0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        acc0 = (jax.lax.with_sharding_constraint(acc0[0], self.param_shardings), acc0[1])
        (grads, metrics), _ = jax.lax.scan(body, acc0, micro)
        return grads, metrics

    def _train_step(self, state: TrainState, teacher_params: Params, batch: Batch, hybrid: Hybrid | None
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        grads, metrics = self._grads(state.params, teacher_params, batch, hybrid)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=self.schedule(state.step))
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics


    # ---- ahead-of-time compilation (boomerang compile): shapes with shardings, nothing allocated
    def abstract_state(self) -> TrainState:
        """The train state as ShapeDtypeStructs carrying their shardings (for `jax.jit(...).lower`)."""
        params = self._shapes["student"]
        shapes = TrainState(params=params, opt_state=jax.eval_shape(self.optimizer.init, params),
                            step=jax.ShapeDtypeStruct((), jnp.int32))
        return _with_shardings(shapes, self.state_shardings)

    def abstract_teacher(self) -> Params:
        """The frozen teacher as ShapeDtypeStructs in `teacher_dtype` with its shardings."""
        return _with_shardings(self._shapes["teacher"], self.teacher_shardings)

    def abstract_batch(self, rows: int, seq_len: int) -> Batch:
        """A global batch of `rows` x `seq_len` (the data contract's int32 arrays) sharded over the batch axes."""
        return {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=self.batch_sharding)
                for k in BATCH_KEYS}

    def lower_step(self, rows: int, seq_len: int, hybrid: Hybrid | None = None) -> jax.stages.Lowered:
        """The train step lowered for a global batch of `rows` x `seq_len` (with `hybrid`: a patch-aware step)."""
        parallel.check_batch_size(rows, self.mesh, self.train_cfg.micro_batches)
        return self._step.lower(self.abstract_state(), self.abstract_teacher(), self.abstract_batch(rows, seq_len),
                                hybrid)

    def lower_eval(self, rows: int, seq_len: int) -> jax.stages.Lowered:
        """The held-out evaluation step lowered for a global batch of `rows` x `seq_len` (never micro-batched)."""
        parallel.check_batch_size(rows, self.mesh)
        return self._eval.lower(self.abstract_state().params, self.abstract_teacher(),
                                self.abstract_batch(rows, seq_len))


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` that carry the matching leaf of `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _opt_state_shardings(opt_shapes: Any, param_shapes: Params, param_shardings: Params, mesh: Mesh) -> Any:
    """Shardings of an optax state: a leaf that mirrors a parameter (same trailing dict path and shape, e.g.
    an Adam moment) gets that parameter's sharding; everything else (counters) is replicated."""
    flat = lambda tree: {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    shardings, shapes = flat(param_shardings), flat(param_shapes)

    def one(path: tuple, leaf: Any) -> NamedSharding:
        tail: list[str] = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            tail.insert(0, k.key)
        key = tuple(tail)
        if key in shardings and tuple(shapes[key].shape) == tuple(leaf.shape):
            return shardings[key]
        return parallel.replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, opt_shapes)


def _check_tree(params: Params, shapes: Params, what: str) -> None:
    """Raise ValueError naming the first parameter that is missing, extra or of the wrong shape."""
    def flat(tree: Any) -> dict[str, tuple[int, ...]]:
        return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    got, want = flat(params), flat(shapes)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            raise ValueError(f"{what} parameters lack {name} {want[name]} (does the config match the weights?)")
        if name not in want:
            raise ValueError(f"{what} parameters have an unexpected {name} {got[name]} for this config")
        if got[name] != want[name]:
            raise ValueError(f"{what} parameter {name} has shape {got[name]}, the config expects {want[name]}")

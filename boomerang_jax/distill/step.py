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

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from boomerang_jax.distill.hybrid import Hybrid, check_patch_sizes, hybrid_arrays, hybrid_model, patch_schedule
from boomerang_jax.distill.loss import LossConfig, distill_loss
from boomerang_jax.distill.optim import (
    TrainConfig, TrainState, abstract_train_state, lr_schedule, make_optimizer, opt_state_shardings,
)
from boomerang_jax.infra import parallel
from boomerang_jax.models import sharding
from boomerang_jax.models.batch import BATCH_KEYS
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import (
    Params,
    forward,
    head_kernel,
    param_shapes,
)
from boomerang_jax.surgery import LayerPlan

Batch = dict[str, jax.Array]


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
    residual_dtype: Any = None,
    activation_sharding: NamedSharding | None = None,
    hybrid: Hybrid | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss and metrics of one (micro-)batch: teacher forward without gradient, student forward, chunked loss.
    With `hybrid` (`hybrid_arrays`), the model trained is the student with those blocks patched."""
    dtype = jnp.dtype(compute_dtype)
    common = dict(segment_ids=batch["segment_ids"], positions=batch["positions"], return_logits=False, dtype=dtype,
                  residual_dtype=residual_dtype)
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
        if train_cfg.attention is not None:  # train.attention: how both models compute attention in the step
            student_config = student_config.replace(attention=train_cfg.attention)
            teacher_config = teacher_config.replace(attention=train_cfg.attention)
        if plan.num_student_layers != student_config.num_layers or plan.num_teacher_layers != teacher_config.num_layers:
            raise ValueError(f"plan ({plan.num_student_layers} <- {plan.num_teacher_layers} layers) does not fit "
                             f"student ({student_config.num_layers}) / teacher ({teacher_config.num_layers})")
        self.student_config, self.teacher_config, self.plan = student_config, teacher_config, plan
        # A Pallas kernel (splash attention) is placed per device under shard_map, which needs the mesh as the
        # context while the step is traced and lowered; Mosaic also refuses float32-precision dots on bf16
        # operands, so a global "highest" matmul precision is lifted there. The xla path traces as it always has.
        kernel = any(c.attention != "xla" for c in (student_config, teacher_config))
        self.mesh_context = _kernel_context(mesh) if kernel else contextlib.nullcontext
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
            opt_state=opt_state_shardings(opt_shapes, student_shapes, self.param_shardings, mesh),
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
            with self.mesh_context():
                return self._step(state, teacher_params, {k: batch[k] for k in BATCH_KEYS}, None)
        if step is None:
            raise ValueError("train.patch_sizes is set: Distiller.step needs the step number")
        patched = patch_schedule(self.plan, self.train_cfg.patch_sizes, self.train_cfg.patch_seed, step)
        hybrid = None if patched is None else hybrid_arrays(self.plan, patched)
        with self.mesh_context():
            state, metrics = self._step(state, teacher_params, {k: batch[k] for k in BATCH_KEYS}, hybrid)
        # the loss terms of a hybrid step are the hybrid's: log its size next to them
        layers = self.plan.num_layers(patched or ())
        return state, dict(metrics, model_layers=jnp.asarray(layers, jnp.float32))

    def evaluate(self, params: Params, teacher_params: Params, batch: Batch) -> dict[str, jax.Array]:
        """Loss metrics of the current student on a batch (from `put_eval_batch`), without updating anything.
        The whole batch runs at once: train.micro_batches does not apply."""
        parallel.check_batch_size(batch["tokens"].shape[0], self.mesh)
        with self.mesh_context():
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
            residual_dtype=cfg.residual_dtype,
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
        return _with_shardings(abstract_train_state(self._shapes["student"], self.train_cfg), self.state_shardings)

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
        with self.mesh_context():
            return self._step.lower(self.abstract_state(), self.abstract_teacher(),
                                    self.abstract_batch(rows, seq_len), hybrid)

    def lower_eval(self, rows: int, seq_len: int) -> jax.stages.Lowered:
        """The held-out evaluation step lowered for a global batch of `rows` x `seq_len` (never micro-batched)."""
        parallel.check_batch_size(rows, self.mesh)
        with self.mesh_context():
            return self._eval.lower(self.abstract_state().params, self.abstract_teacher(),
                                    self.abstract_batch(rows, seq_len))


def _kernel_context(mesh: Mesh) -> Any:
    """A context factory: `mesh` as JAX's context mesh and the default matmul precision (what Pallas TPU needs)."""
    @contextlib.contextmanager
    def context() -> Any:
        with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
            yield

    return context


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `shapes` that carry the matching leaf of `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


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

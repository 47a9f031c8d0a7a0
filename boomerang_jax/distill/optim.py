"""What the optimiser is and what it keeps: the step's settings (TrainConfig, the paper's recipe by default), the
train state, AdamW with a warmup-cosine schedule, and where the optimiser state lives on the mesh."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from boomerang_jax.infra import parallel
from boomerang_jax.models.config import ATTENTION_IMPLEMENTATIONS
from boomerang_jax.models.transformer import REMAT_POLICIES, Params


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, precision and step layout (defaults: the paper's recipe, docs/METHOD.md section 2)."""

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
    # the residual stream of both models between layers (None: compute_dtype); float32 with bf16 compute keeps
    # the layers' sums and their gradients in float32, every matmul still bf16 (docs/DECISIONS.md, measured)
    residual_dtype: str | None = None
    remat: str = "full"  # student layer remat policy: one of models.transformer.REMAT_POLICIES
    # Patch-aware distillation (docs/DECISIONS.md): step s trains the student with patch_sizes[s % len] random
    # multi-layer blocks patched by their frozen teacher blocks (0 = the plain student). () = the paper's recipe.
    patch_sizes: tuple[int, ...] = ()
    patch_seed: int = 0
    # Attention implementation of both models in the step (models/attention.py: xla, splash, auto); None keeps
    # what their ModelConfigs say. Not part of either model: the same math either way.
    attention: str | None = None

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
        if self.attention is not None and self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} is not one of {list(ATTENTION_IMPLEMENTATIONS)}")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        for name in ("compute_dtype", "teacher_dtype", "param_dtype", "residual_dtype"):
            if getattr(self, name) is not None:
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


def opt_state_shardings(opt_shapes: Any, param_shapes: Params, param_shardings: Params, mesh: Mesh) -> Any:
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


def abstract_train_state(param_shapes: Params, cfg: TrainConfig) -> TrainState:
    """The train state of a student with parameters `param_shapes` as ShapeDtypeStructs (nothing allocated): what
    checkpoint restore, planning and the ahead-of-time compile need to know about it."""
    return TrainState(params=param_shapes, opt_state=jax.eval_shape(make_optimizer(cfg).init, param_shapes),
                      step=jax.ShapeDtypeStruct((), jnp.int32))

"""Surgery on layer stacks: plans and orders, the pytree transforms (prune, interpolate), the family export.

The public names of `plan` and `transforms` are re-exported here; `orders`, `baselines`, `tensors` and
`family_export` are imported by path.
"""

from boomerang_jax.models.model import Model  # noqa: F401
from boomerang_jax.surgery.plan import (  # noqa: F401
    ORDERS,
    PLAN_FORMAT,
    PLAN_VERSION,
    STUDENT,
    TEACHER,
    LayerPlan,
    Order,
    PlanError,
    SurgeryError,
    check_patched,
    family,
    first_to_last,
    last_to_first,
    num_steps,
    patch_sequence,
    patched_first,
    patched_for,
    validate_blocks,
)
from boomerang_jax.surgery.transforms import (  # noqa: F401
    HybridIndex,
    Layout,
    ParamCount,
    check_compatible,
    count_params,
    hybrid_index,
    interpolate,
    interpolated_config,
    layout,
    prune,
)

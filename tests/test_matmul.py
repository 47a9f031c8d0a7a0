"""mixed_dot: the models' one matmul (compute-dtype operands, float32 accumulation), forward and backward."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from boomerang_jax.models.matmul import fast_compute_dtype, mixed_dot


def _dots(jaxpr) -> list:
    """Every dot_general in a jaxpr, nested ones (custom_vjp, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_dots(sub))
    return found


def _loss(x, w, dtype):
    return jnp.sum(jnp.sin(mixed_dot(x, w, dtype)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_value_and_gradients_match_a_float64_reference(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 24)).astype(np.float32)
    w = (rng.standard_normal((24, 40)) * 0.2).astype(np.float32)
    # the reference sees the operands as rounded to the compute dtype, then works in float64
    xr = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)
    wr = np.asarray(jnp.asarray(w).astype(dtype).astype(jnp.float32), np.float64)
    y = xr @ wr
    g = np.cos(y)
    want_dx, want_dw = g @ wr.T, np.einsum("btk,btn->kn", xr, g)
    got = mixed_dot(jnp.asarray(x), jnp.asarray(w), dtype)
    assert got.dtype == jnp.float32
    dx, dw = jax.grad(_loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w), dtype)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32  # back to the inputs' dtypes through the casts
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the cotangent is rounded to 8 bits of mantissa
    np.testing.assert_allclose(np.asarray(got), y, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=tol, atol=tol * np.abs(want_dx).max())
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=tol, atol=tol * np.abs(want_dw).max())


def test_bf16_forward_and_backward_dots_take_bf16_operands_and_accumulate_in_float32():
    x = jnp.ones((4, 8, 16), jnp.float32)
    w = jnp.ones((16, 32), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(_loss, argnums=(0, 1)), static_argnums=2)(x, w, jnp.bfloat16).jaxpr
    dots = _dots(jaxpr)
    assert len(dots) == 3  # one forward, two backward
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


def test_fast_compute_dtype_follows_the_measured_ratio_and_its_threshold():
    name, ratio = fast_compute_dtype()
    assert ratio > 0 and name == ("bfloat16" if ratio >= 1.5 else "float32")  # a CPU: measured
    assert fast_compute_dtype(min_speedup=0.0)[0] == "bfloat16"
    assert fast_compute_dtype(min_speedup=float("inf"))[0] == "float32"

"""Attention implementations: splash (Pallas interpret mode on CPU) equals the xla reference on packed rows, forward
and gradients, alone and inside a whole model; the TPU kernel compiles ahead of time with smaller temporaries."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from boomerang_jax.distill.loss import LossConfig, distill_loss
from boomerang_jax.models import attention
from boomerang_jax.models.config import ConfigError, ModelConfig, to_hf
from boomerang_jax.models.transformer import REMAT_POLICIES, forward, head_kernel, init_params
from boomerang_jax.surgery.plan import LayerPlan
from boomerang_jax.surgery.transforms import check_compatible
from tests.conftest import TINY_CONFIGS

# Tolerances (max abs error against xla, values and gradients of O(1)): float32 ~1e-6 observed, bf16 one or two
# bf16 ulps of the output.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def packed_segments(b: int, t: int) -> jax.Array:
    """Row 0: three documents then padding (id 0); the other rows: one document then a short pad."""
    rows = []
    cuts = [0, t // 4, t // 2 + 7, t - 19, t]
    ids = np.zeros(t, np.int32)
    for s, (lo, hi) in enumerate(zip(cuts[:-2], cuts[1:-1]), start=1):
        ids[lo:hi] = s
    rows.append(ids)
    for _ in range(1, b):
        rows.append(np.r_[np.ones(t - 5, np.int32), np.zeros(5, np.int32)])
    return jnp.asarray(np.stack(rows))


def qkv(b: int, t: int, h: int, hkv: int, hd: int, dtype: jnp.dtype) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(hd * 10 + hkv), 4)
    q = jax.random.normal(keys[0], (b, t, h, hd), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, hkv, hd), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, hkv, hd), jnp.float32).astype(dtype)
    ct = jax.random.normal(keys[3], (b, t, h, hd), jnp.float32).astype(dtype)
    return q, k, v, ct


def value_and_grads(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, ct: jax.Array, seg: jax.Array,
                    dtype: jnp.dtype, block: int | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    def f(q, k, v):
        if impl == "xla":
            return attention.attend(q, k, v, implementation="xla", dtype=dtype, segment_ids=seg)
        return attention.splash_attention(q, k, v, seg, dtype, interpret=True, block=block)

    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)


# Every GQA ratio (1/2/4), head_dim (64/128) and dtype at least once (each case is a few seconds of compiling
# interpret-mode kernels); T = 256 with 128-blocks in one case, so the kernel skips blocks above the diagonal and
# carries its softmax across key blocks.
@pytest.mark.parametrize("groups,hd,dtype,block", [
    (1, 64, jnp.float32, 128), (2, 128, jnp.bfloat16, None), (4, 64, jnp.bfloat16, None),
    (4, 128, jnp.float32, None),
])
def test_splash_equals_xla_forward_and_gradients(groups: int, hd: int, dtype: jnp.dtype, block: int | None) -> None:
    b, h = 2, 4
    t = 256 if block else 128
    q, k, v, ct = qkv(b, t, h, h // groups, hd, dtype)
    seg = packed_segments(b, t)
    ref, ref_grads = jax.jit(lambda *a: value_and_grads("xla", *a, seg, dtype))(q, k, v, ct)
    out, grads = jax.jit(lambda *a: value_and_grads("splash", *a, seg, dtype, block))(q, k, v, ct)
    tol = TOL[dtype]
    assert out.dtype == ref.dtype == dtype
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
    assert err < tol, f"output differs by {err}"
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape
        gerr = float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
        scale = max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))
        assert gerr < tol * scale, f"d{name} differs by {gerr} (scale {scale})"


def tiny_pair() -> tuple[ModelConfig, dict, dict]:
    """A tiny Qwen3 (GQA 2, qk-norm) and two random parameter sets: a 'student' and a 'teacher'."""
    cfg = ModelConfig.from_hf(TINY_CONFIGS["qwen3-gqa2-tied"])
    init = jax.jit(lambda key: init_params(cfg, key))  # one compile instead of seconds of eager Flax init
    return cfg, init(jax.random.key(1)), init(jax.random.key(2))


def model_loss(cfg: ModelConfig, student: dict, teacher: dict, tokens: jax.Array, seg: jax.Array, pos: jax.Array,
               remat: str) -> tuple[jax.Array, jax.Array]:
    """(student logits, distillation loss with CE + KL + one hidden-state pair), masked to real tokens."""
    so = forward(student, cfg, tokens, segment_ids=seg, positions=pos, hidden_indices=(2,), remat=remat)
    to = forward(teacher, cfg, tokens, segment_ids=seg, positions=pos, hidden_indices=(2,), hidden_buffer=True)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = (seg != 0) & (jnp.roll(seg, -1, axis=1) == seg)
    loss, _ = distill_loss(LossConfig(chunk=64), student_final=so.final_hidden, student_head=head_kernel(student, cfg),
                           teacher_final=to.final_hidden, teacher_head=head_kernel(teacher, cfg), targets=targets,
                           loss_mask=mask, student_hidden=so.hidden_states, teacher_hidden=to.hidden_states)
    return so.logits, loss


def _positions(seg: np.ndarray) -> np.ndarray:
    pos = np.zeros_like(seg)
    for i in range(1, len(seg)):
        pos[i] = pos[i - 1] + 1 if seg[i] == seg[i - 1] else 0
    return pos


def test_tiny_model_splash_equals_xla_logits_and_loss_and_lowers_with_every_remat() -> None:
    """The whole model (scanned layers; student and teacher, hidden-state pair, CE + KL) with splash gives xla's
    logits and distillation loss; its gradient traces and lowers inside the layer scan with every remat policy.
    (Gradient numerics are the kernel-level test above: compiling a whole model's backward costs ~10 s per case.)"""
    cfg, student, teacher = tiny_pair()
    b, t = 2, 128
    tokens = jax.random.randint(jax.random.key(3), (b, t), 0, cfg.vocab_size)
    seg = packed_segments(b, t)
    pos = jnp.asarray(np.stack([_positions(r) for r in np.asarray(seg)]))

    def run(impl: str) -> tuple[jax.Array, jax.Array]:
        return jax.jit(lambda s: model_loss(cfg.replace(attention=impl), s, teacher, tokens, seg, pos, "none"))(student)

    ref_logits, ref_loss = run("xla")
    logits, loss = run("splash-interpret")
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=0)
    np.testing.assert_allclose(loss, ref_loss, atol=2e-6, rtol=2e-6)
    splash = cfg.replace(attention="splash-interpret")
    for remat in REMAT_POLICIES:
        def hidden_sum(s: dict, remat: str = remat) -> jax.Array:
            out = forward(s, splash, tokens, segment_ids=seg, positions=pos, return_logits=False, remat=remat)
            return out.final_hidden.sum()

        jax.jit(jax.grad(hidden_sum)).trace(student)  # traces the kernel's backward inside the remat'd scan body


# ----------------------------------------------------------------------------------- choice and config
def test_resolve_auto_is_xla_on_cpu_and_splash_errors_name_t() -> None:
    assert attention.resolve("auto", 256, 128) == "xla"
    assert attention.resolve(ModelConfig.attention, 256, 128) == "xla"  # the default, here
    assert attention.resolve("splash", 256, 128) == "splash"
    assert attention.splash_block(2048, 128) == 512 and attention.splash_block(384, 64) == 128
    assert attention.splash_block(1024, 256) == 256
    with pytest.raises(attention.AttentionError, match=r"T=200.*128"):
        attention.resolve("splash", 200, 64)
    with pytest.raises(attention.AttentionError, match="unknown attention"):
        attention.resolve("flash", 256, 64)


def test_attention_config_field_validated_not_exported_not_architecture() -> None:
    cfg = ModelConfig.from_hf(TINY_CONFIGS["qwen3-gqa2-tied"])
    assert cfg.attention == "auto"  # the default: xla on this CPU (see the test above), splash on TPU
    with pytest.raises(ConfigError, match="attention='flash'"):
        cfg.replace(attention="flash")
    splash = cfg.replace(attention="splash")
    assert "attention" not in to_hf(splash) and to_hf(splash) == to_hf(cfg)
    assert dataclasses.replace(cfg, attention="auto").attention == "auto"
    identity = LayerPlan.from_kept(cfg.num_layers, range(cfg.num_layers))
    check_compatible(splash, cfg, identity)  # students and teachers may differ in how they compute attention


def test_auto_is_splash_for_tpu_topology_devices_and_xla_for_cpu_devices() -> None:
    """What `auto` resolves to, from the devices alone (no compile): libtpu's v5p-8 devices on this CPU host are
    TPUs, so a run compiled for that slice gets splash; this host's CPU devices get xla."""
    aot = pytest.importorskip("boomerang_jax.pod.aot")
    try:
        tpu = aot.topology_devices("v5p-8")
    except aot.CompileError as e:
        pytest.skip(str(e))
    from boomerang_jax.infra.parallel import make_mesh

    cpu = jax.devices()
    assert attention.on_tpu(tpu) and not attention.on_tpu(cpu)
    assert attention.resolve_on(tpu, "auto", 2048, 128) == "splash"
    assert attention.resolve_on(tpu, "auto", 2000, 128) == "xla"  # T fits no block: auto falls back
    assert attention.resolve_on(tpu, "xla", 2048, 128) == "xla"  # train.attention=xla is kept
    assert attention.resolve_on(cpu, "auto", 2048, 128) == "xla"
    mesh = make_mesh("data=-1", tpu)
    assert attention.on_tpu(mesh)
    with jax.set_mesh(mesh):  # how the Distiller traces for a TPU mesh: the forward's own resolve agrees
        assert attention.resolve("auto", 2048, 128) == "splash"
    with jax.set_mesh(make_mesh("data=-1", cpu[:1])):
        assert attention.resolve("auto", 2048, 128) == "xla"


# ------------------------------------------------------------------------------------- TPU, ahead of time
def test_splash_compiles_for_tpu_under_a_mesh_with_smaller_temporaries() -> None:
    """Forward + backward of one attention layer compiled for a v5e-4 (no TPU needed: libtpu describes it), rows over
    data and heads over tensor: splash runs under shard_map as a Mosaic kernel, and XLA's memory analysis shows the
    xla path's [B, H, T, T] float32 temporaries (hundreds of MiB per device) gone."""
    aot = pytest.importorskip("boomerang_jax.pod.aot")
    try:
        devices = aot.topology_devices("v5e-4")
    except aot.CompileError as e:
        pytest.skip(str(e))
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from boomerang_jax.infra.parallel import AXES, BATCH_AXES

    mesh = Mesh(np.array(devices).reshape(2, 1, 2), AXES)
    b, t, h, hkv, hd, dtype = 4, 2048, 8, 2, 128, jnp.bfloat16
    heads = NamedSharding(mesh, P(BATCH_AXES, None, "tensor", None))
    q = jax.ShapeDtypeStruct((b, t, h, hd), dtype, sharding=heads)
    kv = jax.ShapeDtypeStruct((b, t, hkv, hd), dtype, sharding=heads)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P(BATCH_AXES, None)))
    temps, texts = {}, {}
    for impl in ("xla", "splash"):
        def grads(q: jax.Array, k: jax.Array, v: jax.Array, s: jax.Array, ct: jax.Array, impl: str = impl) -> tuple:
            _, vjp = jax.vjp(lambda *a: attention.attend(*a, implementation=impl, dtype=dtype, segment_ids=s), q, k, v)
            return vjp(ct)

        # conftest's "highest" matmul precision would ask Mosaic for float32 dots on bf16 operands, which it refuses
        with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
            lowered = jax.jit(grads).lower(q, kv, kv, seg, q)
        texts[impl] = lowered.as_text()
        temps[impl] = lowered.compile().memory_analysis().temp_size_in_bytes
    assert "tpu_custom_call" in texts["splash"] and "tpu_custom_call" not in texts["xla"]
    assert "shard_map" in texts["splash"] or "sdy.manual_computation" in texts["splash"]
    scores = (b // 2) * (h // 2) * t * t * 4  # one float32 [B, H, T, T] per device
    assert temps["xla"] >= scores, temps
    assert temps["splash"] < scores / 16, temps


def test_train_attention_sets_both_models_of_the_step() -> None:
    from boomerang_jax.distill.optim import TrainConfig
    from boomerang_jax.distill.step import Distiller
    from boomerang_jax.infra.parallel import make_mesh

    cfg = ModelConfig.from_hf(TINY_CONFIGS["qwen3-gqa2-tied"])
    plan = LayerPlan.from_kept(cfg.num_layers, [0, 2])
    student = cfg.replace(num_layers=2)
    mesh = make_mesh("data=1", jax.devices()[:1])
    d = Distiller(student, cfg, plan, mesh, TrainConfig(attention="splash"))
    assert d.student_config.attention == d.teacher_config.attention == "splash"
    assert Distiller(student, cfg, plan, mesh, TrainConfig()).student_config.attention == "auto"
    xla = Distiller(student, cfg, plan, mesh, TrainConfig(attention="xla"))
    assert xla.student_config.attention == xla.teacher_config.attention == "xla"
    with pytest.raises(ValueError, match="attention 'flash'"):
        TrainConfig(attention="flash")


_MESH_CHILD = r"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from boomerang_jax.infra.parallel import BATCH_AXES, make_mesh
from boomerang_jax.models import attention
from tests.test_attention import packed_segments, qkv
jax.config.update("jax_default_matmul_precision", "highest")
mesh = make_mesh("data=2,fsdp=1,tensor=2")
q, k, v, ct = qkv(4, 128, 4, 2, 64, jnp.float32)
seg = jnp.concatenate([packed_segments(2, 128)] * 2)
put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
heads = P(BATCH_AXES, None, "tensor", None)
q, k, v, ct, seg = put(q, heads), put(k, heads), put(v, heads), put(ct, heads), put(seg, P(BATCH_AXES, None))
def grads(impl):
    def f(q, k, v):
        return attention.attend(q, k, v, implementation=impl, dtype=jnp.float32, segment_ids=seg)
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(ct)
with jax.set_mesh(mesh):
    assert attention.resolve("auto", 128, 64) == "xla"  # a CPU mesh
    splash = jax.jit(lambda: grads("splash-interpret"))
    text = splash.lower().as_text()
    got = splash()
ref = jax.jit(lambda: grads("xla"))()
errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, ref)]
print("RESULT " + json.dumps({"errs": errs, "manual": "sdy.manual_computation" in text or "shard_map" in text}))
"""


def test_splash_under_a_four_device_mesh_equals_xla() -> None:
    """On 4 CPU devices (data 2 x tensor 2) splash runs per device under shard_map and equals xla, gradients too."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _MESH_CHILD], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["manual"]
    assert max(result["errs"]) < 2e-5, result

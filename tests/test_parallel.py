"""Mesh construction, partition rules (incl. the replication fallback) and array placement helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from boomerang_jax.infra import parallel
from boomerang_jax.infra.parallel import MeshConfig, MeshError
from boomerang_jax.models import sharding
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.sharding import partition_spec
from boomerang_jax.models.transformer import param_shapes
from tests.conftest import TINY_CONFIGS

REPO = Path(__file__).resolve().parents[1]
MESH222 = {"data": 2, "fsdp": 2, "tensor": 2}


def _cfg(**kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return ModelConfig.from_hf({**base, **kw})


# ------------------------------------------------------------------------------------------- mesh sizes
def test_mesh_config_fills_the_minus_one_axis():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).sizes(8) == (2, 2, 2)
    assert MeshConfig(data=1, fsdp=-1, tensor=1).sizes(16) == (1, 16, 1)
    assert MeshConfig().sizes(1) == (1, 1, 1)


def test_mesh_config_parses_strings_and_mappings():
    assert MeshConfig.parse("data=2, fsdp=-1") == MeshConfig(data=2, fsdp=-1, tensor=1)
    assert MeshConfig.parse({"tensor": 4, "data": 1}) == MeshConfig(data=1, fsdp=1, tensor=4)
    with pytest.raises(MeshError, match="unknown mesh axes.*pipeline"):
        MeshConfig.parse("pipeline=2")
    with pytest.raises(MeshError, match="cannot read"):
        MeshConfig.parse("data=two")


@pytest.mark.parametrize("cfg, n, message", [
    (MeshConfig(data=2, fsdp=2, tensor=4), 8, r"data=2, fsdp=2, tensor=4 needs 16 devices, but 8 are available"),
    (MeshConfig(data=-1, fsdp=3, tensor=1), 8, r"fixed axes multiply to 3, which does not divide the 8"),
    (MeshConfig(data=-1, fsdp=-1, tensor=1), 8, r"at most one mesh axis may be -1"),
    (MeshConfig(data=0, fsdp=1, tensor=1), 8, r"positive or -1"),
])
def test_mesh_that_does_not_fit_names_the_sizes(cfg, n, message):
    with pytest.raises(MeshError, match=message):
        cfg.sizes(n)


def test_make_mesh_on_too_few_devices_is_a_clear_error():
    with pytest.raises(MeshError, match=f"needs {2 * len(jax.devices())} devices"):
        parallel.make_mesh(MeshConfig(data=2 * len(jax.devices())))


# ------------------------------------------------------------------------------------------ partition rules
def test_rules_shard_heads_and_mlp_over_tensor_and_largest_dim_over_fsdp():
    c = _cfg()
    spec = lambda path, shape: partition_spec(path, shape, c, MESH222)
    assert spec("layers/attn/q_proj/kernel", (4, 32, 32)) == P(None, "fsdp", "tensor")
    assert spec("layers/attn/k_proj/kernel", (4, 32, 16)) == P(None, "fsdp", "tensor")
    assert spec("layers/attn/o_proj/kernel", (4, 32, 32)) == P(None, "tensor", "fsdp")
    assert spec("layers/mlp/up_proj/kernel", (4, 32, 64)) == P(None, "fsdp", "tensor")
    assert spec("layers/mlp/down_proj/kernel", (4, 64, 32)) == P(None, "tensor", "fsdp")
    assert spec("embed/embedding", (128, 32)) == P("tensor", "fsdp")
    assert spec("lm_head/kernel", (32, 128)) == P("fsdp", "tensor")
    assert spec("layers/attn_norm/scale", (4, 32)) == P(None, "fsdp")
    assert spec("final_norm/scale", (32,)) == P("fsdp")
    # no tensor axis: fsdp takes the largest dim, here the vocabulary
    assert partition_spec("embed/embedding", (128, 32), c, {"fsdp": 4}) == P("fsdp", None)


def test_layer_axis_is_never_sharded_even_when_it_is_the_only_dim_that_divides():
    c = _cfg(hidden_size=3, num_attention_heads=1, num_key_value_heads=1, head_dim=4)
    assert partition_spec("layers/attn_norm/scale", (8, 3), c, MESH222) == P(None, None)


def test_dims_that_do_not_divide_fall_back_to_replication():
    # SmolLM2-like head counts: 9 query heads, 3 kv heads do not split over tensor=2.
    c = _cfg(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536)
    spec = lambda path, shape, mesh=MESH222: partition_spec(path, shape, c, mesh)
    assert spec("layers/attn/q_proj/kernel", (2, 576, 576)) == P(None, "fsdp", None)
    assert spec("layers/attn/k_proj/kernel", (2, 576, 192)) == P(None, "fsdp", None)
    assert spec("layers/mlp/gate_proj/kernel", (2, 576, 1536)) == P(None, "fsdp", "tensor")
    # fsdp=5 divides neither 576 nor 192: replicated; vocab 49152 % 5 != 0 either
    assert spec("layers/attn/k_proj/kernel", (2, 576, 192), {"fsdp": 5}) == P(None, None, None)
    # fsdp=7 divides no dim: replicated
    assert spec("layers/mlp/up_proj/kernel", (2, 576, 1536), {"fsdp": 7}) == P(None, None, None)
    # 1536 % 3 == 0 and 576 % 3 == 0: the largest (1536) wins; with tensor on 1536, fsdp moves to 576
    assert spec("layers/mlp/up_proj/kernel", (2, 576, 1536), {"fsdp": 3}) == P(None, None, "fsdp")
    assert spec("layers/mlp/up_proj/kernel", (2, 576, 1536), {"fsdp": 3, "tensor": 2}) == P(None, "fsdp", "tensor")
    # the largest dim does not divide, the second does: fsdp takes the second
    assert spec("embed/embedding", (49153, 576), {"fsdp": 2}) == P(None, "fsdp")


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_every_parameter_of_every_family_has_a_rule(name):
    c = ModelConfig.from_hf(TINY_CONFIGS[name])
    specs = sharding.param_specs(param_shapes(c), c, MESH222)
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert flat and all(isinstance(s, P) for s in flat)
    for path, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]:
        if path[0].key == "layers":
            assert s[0] is None, path


def test_unknown_parameter_has_no_rule():
    with pytest.raises(MeshError, match="no partition rule for parameter 'layers/attn/rotary/inv_freq'"):
        partition_spec("layers/attn/rotary/inv_freq", (4, 8), _cfg(), MESH222)


def test_without_fsdp_drops_only_fsdp():
    assert sharding.without_fsdp(P("tensor", "fsdp")) == P("tensor", None)
    assert sharding.without_fsdp(P(None, "fsdp", "tensor")) == P(None, None, "tensor")


# -------------------------------------------------------------------------------------------------- batch
def test_batch_size_checks_name_the_sizes():
    mesh = parallel.make_mesh(MeshConfig(data=-1))
    n = len(jax.devices())
    parallel.check_batch_size(4 * n, mesh, micro_batches=4)
    with pytest.raises(MeshError, match="not divisible into 3 micro-batches"):
        parallel.check_batch_size(4 * n, mesh, micro_batches=3)


def test_single_process_loads_the_whole_batch_and_gets_it_back():
    mesh = parallel.make_mesh()
    assert parallel.process_batch_rows(8, mesh) == slice(0, 8)
    assert parallel.global_batch_size(8, mesh) == 8
    assert parallel.process_data_shard(mesh) == (0, 1)
    local = {"tokens": np.arange(16, dtype=np.int32).reshape(8, 2)}
    g = parallel.global_batch(local, mesh)
    assert g["tokens"].shape == (8, 2) and g["tokens"].sharding.spec == P(parallel.BATCH_AXES, None)
    np.testing.assert_array_equal(parallel.to_host(g)["tokens"], local["tokens"])


def test_put_casts_floats_only_and_never_aliases_its_input():
    mesh = parallel.make_mesh()
    x = jax.numpy.ones((4, 4), jax.numpy.float32)
    tree = {"w": x, "i": np.arange(3, dtype=np.int32), "h": np.ones(2, np.float32)}
    out = parallel.put(tree, parallel.replicated(mesh), "bfloat16")
    assert out["w"].dtype == jax.numpy.bfloat16 and out["h"].dtype == jax.numpy.bfloat16
    assert out["i"].dtype == np.int32
    same = parallel.put({"w": x}, parallel.replicated(mesh))["w"]
    same.delete()
    assert not x.is_deleted()


def test_initialize_distributed_is_a_no_op_on_a_single_host(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0")  # a single-host TPU VM: nothing to start
    assert parallel.initialize_distributed() is False
    with pytest.raises(MeshError, match="needs coordinator_address, num_processes and process_id"):
        parallel.initialize_distributed("127.0.0.1:1234")


def test_main_process_helpers_on_one_process(capsys):
    assert parallel.is_main_process()
    parallel.main_print("hello")
    assert capsys.readouterr().out == "hello\n"


# ------------------------------------------------------------------------------------- 8 forced CPU devices
_EIGHT_DEVICE_CHECKS = r"""
import json
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from boomerang_jax.infra import parallel
from boomerang_jax.models import sharding
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import init_params

assert len(jax.devices()) == 8, jax.devices()
out = {}
mesh = parallel.make_mesh("data=-1,fsdp=2,tensor=2")
out["shape"] = parallel.mesh_shape(mesh)
cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))
params = init_params(cfg, jax.random.key(0))
sharded = parallel.put(params, sharding.param_shardings(params, cfg, mesh), "bfloat16")
full = sum(x.size * 2 for x in jax.tree.leaves(sharded))
per_device = parallel.bytes_per_device(sharded)
out["full_bytes"], out["max_device_bytes"] = full, max(per_device.values())
q = sharded["layers"]["attn"]["q_proj"]["kernel"]
out["q_spec"] = str(q.sharding.spec)
out["q_shard_shape"] = list(q.addressable_shards[0].data.shape)
np.testing.assert_array_equal(np.asarray(parallel.to_host(sharded)["embed"]["embedding"], np.float32),
                              np.asarray(params["embed"]["embedding"].astype("bfloat16"), np.float32))
batch = {"tokens": np.arange(32, dtype=np.int32).reshape(8, 4)}
g = parallel.global_batch(batch, mesh)["tokens"]
out["rows_per_device"] = sorted({s.data.shape[0] for s in g.addressable_shards})
out["rows"] = [parallel.process_batch_rows(8, mesh).start, parallel.process_batch_rows(8, mesh).stop]
out["global_size"] = parallel.global_batch_size(8, mesh)
try:
    parallel.check_batch_size(6, mesh)
except parallel.MeshError as e:
    out["batch_error"] = str(e)
print("RESULT " + json.dumps(out))
"""


def run_with_devices(code: str, n: int = 8, timeout: int = 80) -> str:
    """Run `code` in a fresh Python with `n` forced CPU devices (XLA_FLAGS set before jax is imported)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_parameters_and_batches_are_sharded_on_eight_cpu_devices():
    stdout = run_with_devices(_EIGHT_DEVICE_CHECKS)
    out = json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert out["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert out["q_spec"] == str(P(None, "fsdp", "tensor")) and out["q_shard_shape"] == [2, 16, 16]
    # every weight is split 4 ways (fsdp x tensor); only tiny 1-D norms might not be
    assert out["max_device_bytes"] <= out["full_bytes"] / 4 + 1024
    assert out["rows_per_device"] == [2]  # 8 rows over data x fsdp = 4
    assert out["rows"] == [0, 8] and out["global_size"] == 8
    assert "not divisible by data x fsdp = 4" in out["batch_error"]

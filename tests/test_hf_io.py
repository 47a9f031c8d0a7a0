"""HF import/export: exact round trips, sharding, dtypes, atomicity, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from boomerang_jax.hf import names
from boomerang_jax.hf.export import ExportError, params_getter, save_hf
from boomerang_jax.hf.load import CheckpointError, load_hf
from boomerang_jax.hf.safetensors_io import SafetensorsError, SafetensorsFile
from boomerang_jax.models.config import ConfigError, ModelConfig
from boomerang_jax.models.transformer import forward
from tests.conftest import TINY_CONFIGS, save_tiny, torch_logits


def _listing(path):
    return sorted(p.name for p in path.iterdir())


def test_export_round_trip_gives_identical_weights_and_logits(tmp_path, tiny_name):
    model = save_tiny(tmp_path / "src", tiny_name)
    ck = load_hf(tmp_path / "src")
    out = save_hf(tmp_path / "out", ck.config, ck.params, hf_config=ck.hf_config)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = {k: v.numpy() for k, v in model.state_dict().items()}
    ours = {k: v.numpy() for k, v in reloaded.state_dict().items()}
    assert set(ours) == set(theirs)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    tokens = np.random.RandomState(0).randint(0, ck.config.vocab_size, (2, 9))
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(model, tokens))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == ck.config.num_layers
    assert config["tie_word_embeddings"] == ck.config.tie_word_embeddings
    assert config["dtype"] == "float32"
    assert (out / "generation_config.json").exists()


def test_sharded_export_writes_index_and_reloads(tmp_path):
    model = save_tiny(tmp_path / "src", "llama-mha-untied-bias-headdim")
    ck = load_hf(tmp_path / "src")
    out = save_hf(tmp_path / "out", ck.config, ck.params, hf_config=ck.hf_config, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    assert set(index["weight_map"]) == {e.name(i) for e, i in names.export_order(ck.config)}
    assert index["metadata"]["total_size"] == sum(os.path.getsize(out / s) for s in shards) - sum(
        8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards)
    tokens = np.random.RandomState(0).randint(0, ck.config.vocab_size, (1, 6))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(model, tokens))
    again = load_hf(out)
    np.testing.assert_array_equal(np.asarray(forward(again.params, again.config, jnp.asarray(tokens)).logits),
                                  np.asarray(forward(ck.params, ck.config, jnp.asarray(tokens)).logits))


def test_bf16_export_and_import_cast(tmp_path):
    save_tiny(tmp_path / "src", "qwen3-gqa2-tied")
    ck = load_hf(tmp_path / "src")
    out = save_hf(tmp_path / "out", ck.config, ck.params, hf_config=ck.hf_config, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with SafetensorsFile(out / "model.safetensors") as f:
        assert {s.dtype for s in f.specs()} == {np.dtype(ml_dtypes.bfloat16)}
    back = load_hf(out, dtype="bfloat16")
    emb = np.asarray(back.params["embed"]["embedding"])
    assert emb.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(emb, np.asarray(ck.params["embed"]["embedding"]).astype(ml_dtypes.bfloat16))


def test_tokenizer_and_extra_files_are_carried(tmp_path):
    save_tiny(tmp_path / "src", "qwen3-gqa2-tied")
    (tmp_path / "src" / "tokenizer.json").write_text('{"fake": true}')
    ck = load_hf(tmp_path / "src")
    assert ck.tokenizer_files == {"tokenizer.json": b'{"fake": true}'}
    out = save_hf(tmp_path / "out", ck.config, ck.params, tokenizer_files=ck.tokenizer_files,
                  extra_files={"boomerang_plan.json": b"{}"})
    assert (out / "tokenizer.json").read_bytes() == b'{"fake": true}'
    assert (out / "boomerang_plan.json").exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "mistral"}, "model_type 'mistral' is not supported; supported: llama, qwen3, gpt_neox"),
        ({"hidden_act": "swiglu_x"}, "hidden_act 'swiglu_x' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding-window"),
        ({"pretraining_tp": 2}, "pretraining_tp=2"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ],
)
def test_unsupported_config_is_a_clear_error_naming_it(tmp_path, change, match):
    save_tiny(tmp_path / "src", "qwen3-gqa2-tied")
    cfg_path = tmp_path / "src" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(change)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match) as err:
        load_hf(tmp_path / "src")
    assert str(cfg_path) in str(err.value)


def test_legacy_config_keys_are_read():
    cfg = dict(TINY_CONFIGS["neox-partial-parallel"])
    cfg.pop("rope_parameters")
    cfg.update(rotary_pct=0.5, rotary_emb_base=500.0)
    c = ModelConfig.from_hf(cfg)
    assert (c.rotary_dim, c.rope_theta) == (4, 500.0)
    llama = dict(TINY_CONFIGS["llama-gqa3-tied-llama3rope"])
    rp = dict(llama.pop("rope_parameters"))  # a copy: TINY_CONFIGS is shared by every test
    llama.update(rope_theta=rp.pop("rope_theta"), rope_scaling={"type": rp.pop("rope_type"), **rp})
    c = ModelConfig.from_hf(llama)
    assert (c.rope_type, c.rope_factor, c.rope_original_max_positions) == ("llama3", 8.0, 16)


def _rewrite_safetensors(path, mutate):
    """Rewrite a safetensors file with tensors changed by `mutate(dict)` (via the safetensors library)."""
    from safetensors.numpy import save_file

    with SafetensorsFile(path) as f:
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
    mutate(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_names_it(tmp_path):
    save_tiny(tmp_path / "src", "llama-mha-untied-bias-headdim")
    _rewrite_safetensors(tmp_path / "src" / "model.safetensors",
                         lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model.layers.1.self_attn.k_proj.weight"):
        load_hf(tmp_path / "src")


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    save_tiny(tmp_path / "src", "llama-mha-untied-bias-headdim")

    def cut(t):
        t["model.layers.2.mlp.up_proj.weight"] = t["model.layers.2.mlp.up_proj.weight"][:-1]

    _rewrite_safetensors(tmp_path / "src" / "model.safetensors", cut)
    with pytest.raises(CheckpointError, match=r"'model.layers.2.mlp.up_proj.weight' has shape \(71, 32\), expected \(72, 32\)"):
        load_hf(tmp_path / "src")


def test_unexpected_tensor_names_it(tmp_path):
    save_tiny(tmp_path / "src", "qwen3-gqa4-untied")
    _rewrite_safetensors(tmp_path / "src" / "model.safetensors",
                         lambda t: t.update({"model.layers.9.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.mlp.up_proj.weight'"):
        load_hf(tmp_path / "src")


def test_truncated_safetensors_names_the_file(tmp_path):
    save_tiny(tmp_path / "src", "qwen3-gqa4-untied")
    path = tmp_path / "src" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match=f"{path}: truncated"):
        load_hf(tmp_path / "src")
    path.write_bytes(data[:5])
    with pytest.raises(SafetensorsError, match="truncated"):
        load_hf(tmp_path / "src")


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path):
    save_tiny(tmp_path / "src", "qwen3-gqa4-untied")
    (tmp_path / "src" / "model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    (tmp_path / "src" / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    before = _listing(tmp_path / "src")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*never unpickles"):
        load_hf(tmp_path / "src")
    assert not (tmp_path / "PWNED").exists()
    assert _listing(tmp_path / "src") == before


def test_missing_directory_and_hub_id_offline_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="could not be fetched from the hub"):
        load_hf("no-such-org-xyz/no-such-model")


def test_export_refuses_to_overwrite_and_a_crash_leaves_nothing(tmp_path):
    save_tiny(tmp_path / "src", "qwen3-gqa4-untied")
    ck = load_hf(tmp_path / "src")
    good = save_hf(tmp_path / "out", ck.config, ck.params)
    good_bytes = (good / "model.safetensors").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        save_hf(tmp_path / "out", ck.config, ck.params)

    real = params_getter(ck.params)

    def dying(path, layer):
        if layer == 2:
            raise KeyboardInterrupt("killed mid-export")
        return real(path, layer)

    for target in ("out", "fresh"):
        with pytest.raises(KeyboardInterrupt):
            save_hf(tmp_path / target, ck.config, get=dying, overwrite=True)
    assert _listing(tmp_path) == ["out", "src"]  # no partial directory, no half-written 'fresh'
    assert (good / "model.safetensors").read_bytes() == good_bytes  # the good export is untouched
    save_hf(tmp_path / "out", ck.config, ck.params, overwrite=True)
    assert _listing(tmp_path) == ["out", "src"]


def test_load_refuses_a_non_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "file")
    shutil.rmtree(tmp_path)


def test_neox_without_rotary_keys_uses_transformers_default_quarter_rotary():
    cfg = {k: v for k, v in TINY_CONFIGS["neox-partial-parallel"].items() if k != "rope_parameters"}
    assert ModelConfig.from_hf(cfg).rope_dim == 8 // 4


# --------------------------------------------------------------------------- file-to-file copies of tensors
def _two_tensor_file(path, seed: int = 0) -> dict[str, np.ndarray]:
    from boomerang_jax.hf.safetensors_io import TensorSpec, write_safetensors

    rng = np.random.default_rng(seed)
    tensors = {"a": rng.standard_normal((64, 48)).astype(np.float32),
               "b": rng.standard_normal((1000,)).astype(ml_dtypes.bfloat16)}
    write_safetensors(path, [TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.items())
    return tensors


def _copy_through(src, dst, monkeypatch, *, cast_b: bool = False) -> list[int]:
    """Write dst from src's mapped tensors (b cast to float32 when asked); the byte counts copied by the kernel."""
    from boomerang_jax.hf import safetensors_io as sio

    calls: list[int] = []
    real = os.copy_file_range

    def counting(fd_in, fd_out, count, offset_src=None, offset_dst=None):
        n = real(fd_in, fd_out, count, offset_src, offset_dst)
        calls.append(n)
        return n

    monkeypatch.setattr(sio.os, "copy_file_range", counting)
    with SafetensorsFile(src) as f:
        a, b = f.get("a"), f.get("b")
        b = b.astype(np.float32) if cast_b else b
        sio.write_safetensors(dst, [sio.TensorSpec("a", a.shape, a.dtype), sio.TensorSpec("b", b.shape, b.dtype)],
                              [("a", a), ("b", b)])
    return calls


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="os.copy_file_range (Linux) is needed")
def test_unchanged_mapped_tensors_are_copied_by_the_kernel_and_read_back_equal(tmp_path, monkeypatch):
    want = _two_tensor_file(tmp_path / "src.safetensors")
    calls = _copy_through(tmp_path / "src.safetensors", tmp_path / "dst.safetensors", monkeypatch)
    assert sum(calls) == want["a"].nbytes + want["b"].nbytes  # both tensors went file to file
    assert (tmp_path / "dst.safetensors").read_bytes() == (tmp_path / "src.safetensors").read_bytes()
    with SafetensorsFile(tmp_path / "dst.safetensors") as f:
        assert np.array_equal(f.get("a"), want["a"]) and np.array_equal(f.get("b"), want["b"])


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="os.copy_file_range (Linux) is needed")
def test_a_cast_tensor_is_written_and_only_the_unchanged_one_is_copied(tmp_path, monkeypatch):
    want = _two_tensor_file(tmp_path / "src.safetensors")
    calls = _copy_through(tmp_path / "src.safetensors", tmp_path / "dst.safetensors", monkeypatch, cast_b=True)
    assert sum(calls) == want["a"].nbytes
    with SafetensorsFile(tmp_path / "dst.safetensors") as f:
        assert np.array_equal(f.get("a"), want["a"])
        assert f.get("b").dtype == np.float32 and np.array_equal(f.get("b"), want["b"].astype(np.float32))


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="os.copy_file_range (Linux) is needed")
def test_a_source_replaced_after_mapping_is_never_copied_from_its_new_file(tmp_path, monkeypatch):
    """The path now names another file (an export renamed over it): the mapped (old) bytes are written."""
    from boomerang_jax.hf import safetensors_io as sio

    src = tmp_path / "src.safetensors"
    want = _two_tensor_file(src, seed=0)
    with SafetensorsFile(src) as f:
        a, b = f.get("a"), f.get("b")
        _two_tensor_file(tmp_path / "new.safetensors", seed=1)
        os.replace(tmp_path / "new.safetensors", src)
        monkeypatch.setattr(sio.os, "copy_file_range", lambda *a: pytest.fail("copied from the replacing file"))
        sio.write_safetensors(tmp_path / "dst.safetensors", [sio.TensorSpec("a", a.shape, a.dtype),
                              sio.TensorSpec("b", b.shape, b.dtype)], [("a", a), ("b", b)])
    with SafetensorsFile(tmp_path / "dst.safetensors") as f:
        assert np.array_equal(f.get("a"), want["a"]) and np.array_equal(f.get("b"), want["b"])


def test_where_the_kernel_cannot_copy_the_tensor_is_written_instead(tmp_path, monkeypatch):
    import errno

    from boomerang_jax.hf import safetensors_io as sio

    _two_tensor_file(tmp_path / "src.safetensors")

    def cross_device(*a):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(sio.os, "copy_file_range", cross_device, raising=False)
    with SafetensorsFile(tmp_path / "src.safetensors") as f:
        a, b = f.get("a"), f.get("b")
        sio.write_safetensors(tmp_path / "dst.safetensors", [sio.TensorSpec("a", a.shape, a.dtype),
                              sio.TensorSpec("b", b.shape, b.dtype)], [("a", a), ("b", b)])
    assert (tmp_path / "dst.safetensors").read_bytes() == (tmp_path / "src.safetensors").read_bytes()

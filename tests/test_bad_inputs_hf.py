"""Hostile or broken HF inputs (issue 19), met where a user meets them: through `boomerang` (cli.main, or a
subprocess where stdin matters). Each is refused with exit 2 and a one-line message naming the file, key or
value, and nothing good is damaged (no export written, an existing one left as it was)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from boomerang_jax.cli import main
from boomerang_jax.hf.safetensors_io import (
    SafetensorsFile,
    TensorSpec,
    write_safetensors,
)
from boomerang_jax.infra import storage
from boomerang_jax.surgery.family_export import FAMILY_FORMAT
from tests.conftest import save_tiny

NAME = "llama-mha-untied-bias-headdim"  # untied, 3 layers, hidden 32


def _run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    save_tiny(tmp_path / "model", NAME)
    return tmp_path / "model"


@pytest.fixture
def sharded_dir(tmp_path, model_dir, capsys) -> Path:
    """The tiny model re-exported by us in several shards (with an index)."""
    out = tmp_path / "sharded"
    assert main(["export", str(model_dir), "--out", str(out), "--max-shard-gb", "0.00002"]) == 0
    capsys.readouterr()
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    return out


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d: Path, index: dict) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _rewrite_header(path: Path, edit) -> None:
    """Replace the JSON header of a safetensors file by edit(header), keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    new = json.dumps(edit(header)).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


# --------------------------------------------------------------------------- A: names that leave their directory
@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_shard_outside_the_model_dir_is_refused(tmp_path, sharded_dir, capsys, kind):
    index = _index(sharded_dir)
    shard = next(iter(index["weight_map"].values()))
    outside = tmp_path / "outside.safetensors"
    shutil.move(sharded_dir / shard, outside)
    ref = "../outside.safetensors" if kind == "dotdot" else str(outside)
    index["weight_map"] = {t: (ref if s == shard else s) for t, s in index["weight_map"].items()}
    _write_index(sharded_dir, index)
    rc, err = _run(["export", sharded_dir, "--out", tmp_path / "copy"], capsys)
    assert rc == 2, err
    assert "model.safetensors.index.json" in err and repr(ref) in err and "leaves its directory" in err
    assert not (tmp_path / "copy").exists()


def _family_with_dir(tmp_path: Path, model_dir: Path, entry: str) -> Path:
    fam = tmp_path / "family"
    fam.mkdir()
    (fam / "family.json").write_text(json.dumps({"format": FAMILY_FORMAT, "sizes": [
        {"k": 0, "dir": entry, "num_layers": 3, "params": {"total": 1}}]}))
    return fam


@pytest.mark.parametrize("command", ["verify", "lm-eval"])
def test_family_dir_outside_the_family_is_refused(tmp_path, model_dir, capsys, command):
    fam = _family_with_dir(tmp_path, model_dir, "../model")
    argv = [command, fam] + (["--tasks", "arc_easy", "--results-csv", tmp_path / "scores.csv"] if command == "lm-eval" else [])
    rc, err = _run(argv, capsys)
    assert rc == 2, err
    assert "family.json" in err and "sizes[0].dir" in err and "'../model'" in err
    assert not (tmp_path / "scores.csv").exists()


def test_family_absolute_dir_is_refused_by_eval(tmp_path, model_dir, capsys):
    fam = _family_with_dir(tmp_path, model_dir, str(model_dir))
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n" * 50)
    rc, err = _run(["eval", fam, "--data", tmp_path / "text.txt", "--seq", "8"], capsys)
    assert rc == 2, err
    assert "family.json" in err and repr(str(model_dir)) in err


class _FakeFs:
    def __init__(self):
        self.gets: list = []

    def get(self, src, dst):
        self.gets.append((src, dst))
        for d in dst:
            Path(d).parent.mkdir(parents=True, exist_ok=True)
            Path(d).write_bytes(b"{}")


@pytest.mark.parametrize("bad", ["../../escaped.json", "a/../../escaped.json", "/etc/escaped.json"])
def test_remote_listing_with_names_outside_the_prefix_is_refused(tmp_path, monkeypatch, bad):
    fs = _FakeFs()
    listing = {"config.json": {"size": 2, "version": "1"}, bad: {"size": 2, "version": "1"}}
    monkeypatch.setattr(storage, "list_files", lambda url: dict(listing))
    monkeypatch.setattr(storage, "_fs", lambda url: fs)
    dest = tmp_path / "cache" / "copy"
    with pytest.raises(ValueError, match=r"gs://bucket/model \(listing\): object name .*escaped"):
        storage.local_copy("gs://bucket/model", dest=dest, require="config.json")
    with pytest.raises(ValueError, match="escaped"):
        storage.download_dir("gs://bucket/model", tmp_path / "dl")
    assert fs.gets == [] and not (tmp_path / "escaped.json").exists() and not dest.exists()


# --------------------------------------------------------------------------- B: remote code is never run
def test_tokenizer_asking_for_remote_code_is_refused_without_prompting(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok_dir = tmp_path / "tok"
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "cat": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(tok_dir)
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    cfg_path.write_text(json.dumps(cfg))
    marker = tmp_path / "ran.txt"
    (tok_dir / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('remote code ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (tmp_path / "text.txt").write_text("cat cat cat\n")
    proc = subprocess.run(
        [sys.executable, "-m", "boomerang_jax.cli", "prepare-data", str(tmp_path / "text.txt"), "--tokenizer",
         str(tok_dir), "--eos-token", "</s>", "--out", str(tmp_path / "data")],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, env={**os.environ})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert not marker.exists()
    assert "[y/N]" not in out and "Do you wish to run the custom code" not in out
    assert "tokenizer_config.json" in out and "auto_map" in out and "evil.EvilTokenizer" in out
    assert not (tmp_path / "data").exists()


def test_every_transformers_load_passes_trust_remote_code_false():
    """No from_pretrained in the package without trust_remote_code=False (a prompt or remote code otherwise)."""
    import re

    root = Path(__file__).resolve().parents[1] / "boomerang_jax"
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"\.from_pretrained\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if "trust_remote_code=False" not in text[m.end():i]:
                offenders.append(f"{path.relative_to(root)}:{text[:m.start()].count(chr(10)) + 1}")
    assert not offenders, offenders


# --------------------------------------------------------------------------- C: malformed safetensors headers
def _two_same_shape(header: dict) -> tuple[str, str]:
    by_shape: dict = {}
    for k, v in header.items():
        if k != "__metadata__":
            by_shape.setdefault((tuple(v["shape"]), v["dtype"]), []).append(k)
    return next(v[:2] for v in by_shape.values() if len(v) >= 2)


def _alias(header: dict) -> dict:
    a, b = _two_same_shape(header)
    header[a]["data_offsets"] = list(header[b]["data_offsets"])
    return header


def _negative(header: dict) -> dict:
    name = "model.layers.0.input_layernorm.weight"
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [-(end - begin), 0]
    return header


@pytest.mark.parametrize("edit, message", [
    (_alias, "overlaps tensor"),
    (_negative, "'model.layers.0.input_layernorm.weight': data_offsets [-128, 0] must satisfy 0 <= begin <= end"),
    (lambda h: [h], "header is a JSON list, expected an object"),
    (lambda h: {**h, "model.norm.weight": "F32"}, "tensor 'model.norm.weight': entry is a JSON str"),
    (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [-32]}},
     "tensor 'model.norm.weight': shape [-32] is not a list of integers >= 0"),
    (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "dtype": "F8_E9"}},
     "tensor 'model.norm.weight': unsupported dtype 'F8_E9'"),
    (lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": ["0", "128"]}},
     "tensor 'model.norm.weight': data_offsets ['0', '128'] is not a pair of integers"),
], ids=["alias", "negative", "list-header", "string-entry", "negative-dim", "unknown-dtype", "string-offsets"])
def test_malformed_safetensors_header_is_refused(tmp_path, model_dir, capsys, edit, message):
    _rewrite_header(model_dir / "model.safetensors", edit)
    rc, err = _run(["export", model_dir, "--out", tmp_path / "copy"], capsys)
    assert rc == 2, err
    assert "model.safetensors" in err and message in err
    assert not (tmp_path / "copy").exists()


def test_safetensors_hidden_bytes_and_duplicate_keys_are_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, [TensorSpec("a", (2,), np.dtype(np.float32))], [("a", np.ones(2, np.float32))])
    good = path.read_bytes()
    path.write_bytes(good + b"\0" * 8)  # bytes no tensor accounts for
    with pytest.raises(ValueError, match=r"t.safetensors: tensors cover 8 data bytes but the file holds 16"):
        SafetensorsFile(path)
    (n,) = struct.unpack("<Q", good[:8])
    dup = good[8:8 + n].decode().rstrip().replace('"a":', '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":', 1)
    dup = dup.encode() + b" " * (-len(dup) % 8)
    path.write_bytes(struct.pack("<Q", len(dup)) + dup + good[8 + n:])
    with pytest.raises(ValueError, match=r"t.safetensors: key 'a' appears twice in the header"):
        SafetensorsFile(path)


# --------------------------------------------------------------------------- D: smaller holes in the HF path
def test_nan_weights_are_refused_at_import_naming_the_tensor(tmp_path, capsys):
    model = save_tiny(tmp_path / "src", NAME)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[0, 1] = float("inf")
    model.save_pretrained(tmp_path / "src")
    rc, err = _run(["export", tmp_path / "src", "--out", tmp_path / "copy"], capsys)
    assert rc == 2, err
    assert "model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight': 2 non-finite value(s) (1 NaN, 1 inf)" in err
    assert not (tmp_path / "copy").exists()


def test_tensor_in_two_shards_is_refused_naming_both(tmp_path, sharded_dir, capsys):
    index = _index(sharded_dir)
    shards = sorted(set(index["weight_map"].values()))
    first, last = sharded_dir / shards[0], sharded_dir / shards[-1]
    with SafetensorsFile(first) as f:
        name = f.keys()[0]
        extra = np.zeros_like(f.get(name))
    with SafetensorsFile(last) as f:
        specs = f.specs()
        tensors = [(s.name, np.array(f.get(s.name))) for s in specs]
    write_safetensors(last, [*specs, TensorSpec(name, extra.shape, extra.dtype)], [*tensors, (name, extra)])
    rc, err = _run(["export", sharded_dir, "--out", tmp_path / "copy"], capsys)
    assert rc == 2, err
    assert f"tensor {name!r} is stored twice: in {first} and in {last}" in err
    assert not (tmp_path / "copy").exists()


def test_float16_export_that_overflows_is_refused_and_publishes_nothing(tmp_path, capsys):
    model = save_tiny(tmp_path / "src", NAME)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[3, 4] = 1e6
    model.save_pretrained(tmp_path / "src")
    good = tmp_path / "good"
    assert _run(["export", tmp_path / "src", "--out", good, "--dtype", "bfloat16"], capsys)[0] == 0
    before = _tree(good)
    for out, extra in [(tmp_path / "new", []), (good, ["--overwrite"])]:
        rc, err = _run(["export", tmp_path / "src", "--out", out, "--dtype", "float16", *extra], capsys)
        assert rc == 2, err
        assert ("tensor 'model.layers.2.self_attn.o_proj.weight' cast to float16: 1 value(s) overflow to inf "
                "(max |value| 1e+06, largest finite 6.55e+04)") in err
    assert not (tmp_path / "new").exists()
    assert _tree(good) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "src"]  # no staging left behind


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_shard_gb_must_be_positive(tmp_path, model_dir, capsys, value):
    rc, err = _run(["export", model_dir, "--out", tmp_path / "copy", "--max-shard-gb", value], capsys)
    assert rc == 2, err
    assert "--max-shard-gb must be > 0" in err
    assert not (tmp_path / "copy").exists()


def test_interpolate_max_shard_gb_zero_is_refused(tmp_path, capsys):
    from tests.conftest import EIGHT_LAYER_CONFIGS, build_hf_model

    build_hf_model(EIGHT_LAYER_CONFIGS["llama-tied"]).save_pretrained(tmp_path / "teacher")
    assert main(["prune", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "student")]) == 0
    rc, err = _run(["interpolate", "--student", tmp_path / "student", "--teacher", tmp_path / "teacher",
                    "--order", "last-to-first", "--sizes", "all", "--out", tmp_path / "family",
                    "--max-shard-gb", "0"], capsys)
    assert rc == 2, err
    assert "--max-shard-gb must be > 0" in err
    assert not (tmp_path / "family").exists()


@pytest.mark.parametrize("flag", ["--num-sequences", "--seq-len"])
def test_verify_needs_at_least_one_sequence_and_token(model_dir, capsys, flag):
    rc, err = _run(["verify", model_dir, flag, "0"], capsys)
    assert rc == 2, err
    assert f"{flag} must be >= 1 (got 0)" in err


def test_verify_judges_the_difference_relative_to_the_logits(model_dir, capsys):
    from boomerang_jax.hf.verify import VerifyReport

    # the hardening report's case: 9.3e-4 on logits of magnitude 0.44 passed an absolute 1e-3; it is 2e-3 relative
    report = VerifyReport("m", max_abs_diff=9.3e-4, max_abs_logit=0.44, num_sequences=1, seq_len=8, atol=1e-3)
    assert not report.ok and "MISMATCH" in str(report) and "2.1e-03 of max |logit|" in str(report)
    # an exact export passes both tolerances, and the ratio is printed
    rc, out = main(["verify", str(model_dir), "--num-sequences", "1", "--seq-len", "8"]), capsys.readouterr().out
    assert rc == 0 and out.startswith("OK:") and "of max |logit|" in out and "rtol 0.0001" in out
    # a tighter --rtol than float32 rounding can meet is a mismatch (exit 1), whatever --atol says
    assert main(["verify", str(model_dir), "--num-sequences", "1", "--seq-len", "8", "--rtol", "1e-12"]) == 1

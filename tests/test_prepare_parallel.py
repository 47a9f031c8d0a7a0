"""`prepare-data` in work shards (issue 21): 1 vs 2 processes and shares of a slice give the same dataset byte for
byte, a kill -9 mid-preparation resumes from the published shards, broken sources and --overwrite keep the
issue-19 guarantees. Runs the command's own functions (parser + prepare_command) on a tiny word tokenizer."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from boomerang_jax.commands.data import add_prepare_arguments, prepare_command
from boomerang_jax.data.pipeline import open_documents
from boomerang_jax.data.shards import IncompleteBuild
from tests.conftest import WORDS, word_model

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _prepare(*argv) -> int:
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    return prepare_command(parser.parse_args([str(a) for a in argv]))


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 25)))) for _ in range(n)]


def _builds(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    word_model(d, 1)
    return d


@pytest.fixture
def text_source(tmp_path) -> Path:
    src = tmp_path / "corpus.txt"
    texts = _texts(150)
    texts[7] = texts[40] = "   "  # empty paragraphs are dropped by --paragraphs itself
    src.write_text("\n\n".join(texts) + "\n")
    return src


def test_one_or_two_processes_or_two_shares_give_the_same_dataset_byte_for_byte(tmp_path, tok, text_source, capsys):
    common = [text_source, "--tokenizer", tok, "--paragraphs", "--val-fraction", "0.2", "--shard-tokens", "120",
              "--shard-docs", "16", "--seed", "3"]
    assert _prepare(*common, "--out", tmp_path / "one") == 0
    assert _prepare(*common, "--out", tmp_path / "two", "--workers", "2") == 0
    assert _prepare(*common, "--out", tmp_path / "shares", "--shard-of", "1/2") == 0
    assert "share 1/2 of the work shards done" in capsys.readouterr().out and not (tmp_path / "shares").exists()
    with pytest.raises(IncompleteBuild, match="5 of 10 shards are not done"):
        _prepare(*common, "--out", tmp_path / "shares", "--finish")
    assert _prepare(*common, "--out", tmp_path / "shares", "--shard-of", "0/2") == 0
    one = _tree(tmp_path / "one")
    assert len(one) > 10 and _tree(tmp_path / "two") == one and _tree(tmp_path / "shares") == one
    assert all(_builds(tmp_path / n) == [] for n in ("one", "two", "shares"))
    # the documents, and their train/validation split, are those of a single pass (one work shard)
    assert _prepare(*common[:-4], "--seed", "3", "--out", tmp_path / "single") == 0
    for split in ("train", "validation"):
        a, _ = open_documents(str(tmp_path / "one"), split)
        b, _ = open_documents(str(tmp_path / "single"), split)
        assert [d.tolist() for d in a] == [d.tolist() for d in b] and len(a) > 10
    rng = np.random.default_rng(3)  # today's draw: the i-th non-empty document takes the i-th draw
    n_val = sum(rng.random() < 0.2 for _ in range(148))
    assert json.loads((tmp_path / "one" / "metadata.json").read_text())["splits"]["validation"]["num_docs"] == n_val


_SLOW = """import sys, time
import boomerang_jax.commands.data as d
real = d.read_documents
def blocked(*a, **k):  # the source stalls at document STOP, as a preempted host would
    for i, text in enumerate(real(*a, **k)):
        if i == STOP:
            print("stalled", flush=True)
            time.sleep(600)
        yield text
d.read_documents = blocked
from tests.test_prepare_parallel import _prepare
sys.exit(_prepare(*sys.argv[1:]))
"""


def test_kill_9_mid_preparation_then_a_rerun_skips_the_finished_shards_and_gives_the_same_bytes(tmp_path, tok):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in _texts(120, seed=1)))
    common = [src, "--tokenizer", tok, "--text-field", "body", "--val-fraction", "0.1", "--shard-docs", "10"]
    out = tmp_path / "data"
    script = tmp_path / "slow.py"
    script.write_text(_SLOW.replace("STOP", "55"))
    proc = subprocess.Popen([sys.executable, str(script), *map(str, common), "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "stalled"  # documents 0..54 read: shards 0..4 published
        (build,) = _builds(out)
        markers = sorted((build / "pieces").glob("piece-*.json"))
        assert [m.name for m in markers] == [f"piece-{k:05d}.json" for k in range(5)]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists() and list((build / "tmp").iterdir())  # the killed shard's staging is left behind
    inodes = {p.stat().st_ino for p in (build / "pieces").glob("*.array_record")}
    assert _prepare(*common, "--out", out) == 0
    assert _builds(out) == []
    assert _prepare(*common, "--out", tmp_path / "whole") == 0
    assert _tree(out) == _tree(tmp_path / "whole")
    # the shards published before the kill are in the dataset as they were (hard links: same inodes)
    assert inodes <= {p.stat().st_ino for p in out.glob("*.array_record")}
    assert not inodes & {p.stat().st_ino for p in (tmp_path / "whole").glob("*.array_record")}


def test_a_rerun_takes_over_another_share_and_only_writes_the_missing_shards(tmp_path, tok, text_source, capsys):
    common = [text_source, "--tokenizer", tok, "--paragraphs", "--shard-docs", "30", "--out", tmp_path / "d"]
    assert _prepare(*common, "--shard-of", "0/2") == 0
    capsys.readouterr()
    assert _prepare(*common) == 0
    err = capsys.readouterr().err
    assert "3 finished shard(s) of this process are skipped" in err and "2 written now, 3 done before" in err


def test_a_broken_source_in_two_workers_is_an_error_naming_the_file_and_keeps_the_old_dataset(tmp_path, tok):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("the cat sat on a mat\n\nthe dog ran to a big red house\n")
    bad.write_bytes(b"the cat sat\n\n" + b"\xff\xfe not utf-8\n")
    out = tmp_path / "data"
    assert _prepare(good, "--tokenizer", tok, "--out", out) == 0
    before = _tree(out)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        _prepare(good, bad, "--tokenizer", tok, "--out", out, "--overwrite", "--workers", "2", "--shard-docs", "1")
    assert _tree(out) == before and _builds(out) == []


def test_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete_and_other_settings_build_apart(
        tmp_path, tok, text_source):
    common = [text_source, "--tokenizer", tok, "--paragraphs", "--shard-docs", "40", "--val-fraction", "0.1"]
    out = tmp_path / "data"
    assert _prepare(*common, "--out", out) == 0
    before = _tree(out)
    assert _prepare(*common, "--out", out, "--overwrite", "--seed", "1", "--shard-of", "0/2") == 0
    assert _tree(out) == before  # half of the new dataset is built: the old one is still whole
    (seed1,) = _builds(out)
    seed1_files = _tree(seed1)
    assert _prepare(*common, "--out", out, "--overwrite", "--seed", "2") == 0  # other settings: another build
    assert _builds(out) == [seed1] and _tree(seed1) == seed1_files
    assert _prepare(*common, "--out", tmp_path / "fresh", "--seed", "2") == 0
    assert _tree(out) == _tree(tmp_path / "fresh") != before
    with pytest.raises(FileExistsError, match="overwrite"):
        _prepare(*common, "--out", out)


def test_a_local_hf_datasets_source_in_two_shares(tmp_path, tok):
    pytest.importorskip("datasets")
    data = tmp_path / "hfdata"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(40, seed=2)))
    common = [f"hf:{data}", "--tokenizer", tok, "--shard-docs", "7"]
    assert _prepare(*common, "--out", tmp_path / "one") == 0
    for share in ("1/2", "0/2"):
        assert _prepare(*common, "--out", tmp_path / "two", "--shard-of", share) == 0
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")
    docs, meta = open_documents(str(tmp_path / "one"))
    assert len(docs) == 40 and len(meta.splits["train"]["shards"]) == 6


def test_two_shares_into_a_bucket_give_the_local_dataset_and_leave_no_build(tmp_path, tok, text_source, bucket):
    from boomerang_jax.infra import storage

    common = [text_source, "--tokenizer", tok, "--paragraphs", "--shard-docs", "50", "--val-fraction", "0.1"]
    assert _prepare(*common, "--out", tmp_path / "local") == 0
    out = f"{bucket}/data/sotu"
    assert _prepare(*common, "--out", out, "--shard-of", "0/2") == 0
    assert not storage.exists(f"{out}/metadata.json")
    assert [n for n in storage.listdir(f"{bucket}/data") if n.startswith(".sotu.partial-build-")]
    assert _prepare(*common, "--out", out, "--shard-of", "1/2") == 0
    local = _tree(tmp_path / "local")
    assert {r: storage.read_bytes(f"{out}/{r}") for r in storage.list_files(out)} == local
    assert storage.listdir(f"{bucket}/data") == ["sotu"]

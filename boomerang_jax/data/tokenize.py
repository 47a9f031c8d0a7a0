"""Turn documents into token ids with the teacher's tokenizer: BOS (optional) + text + EOS, per document."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from boomerang_jax.hf.gguf import default_teacher_path, read_gguf
from boomerang_jax.hf.load import EMBEDDED_TEACHER, TOKENIZER_FILES
from boomerang_jax.infra import storage


def refuse_remote_code(tokenizer_dir: str | os.PathLike) -> None:
    """A ValueError naming the file and key when a local tokenizer directory asks for custom code
    (`auto_map` in tokenizer_config.json or config.json): boomerang-jax never runs code from a model
    directory (every transformers load passes trust_remote_code=False; this makes the refusal say why)."""
    for fname in ("tokenizer_config.json", "config.json"):
        path = Path(tokenizer_dir) / fname
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        auto_map = cfg.get("auto_map") if isinstance(cfg, dict) else None
        if auto_map:
            raise ValueError(f"{path}: auto_map {json.dumps(auto_map)} asks to run custom Python code from the "
                             "model directory; boomerang-jax never runs it (trust_remote_code=False). Use a "
                             "tokenizer that transformers supports natively.")


def tokenizer_from_files(files: dict[str, bytes]) -> Any:
    """A transformers tokenizer from in-memory tokenizer files (as a Model or a GGUF file carries them)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        for fname, data in files.items():
            (Path(d) / fname).write_bytes(data)
        refuse_remote_code(d)
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False)


def load_tokenizer(spec: str | os.PathLike) -> Any:
    """The tokenizer of a model spec: an HF dir (local or gs://) or hub id, a .gguf file, or the embedded
    teacher's name."""
    spec = str(spec)
    if spec == EMBEDDED_TEACHER or spec.endswith(".gguf"):
        g = read_gguf(default_teacher_path() if spec == EMBEDDED_TEACHER else spec)
        return tokenizer_from_files(g.tokenizer_files)
    from transformers import AutoTokenizer

    if "://" in spec:  # gs://: fetch only the tokenizer files (cached), not the weights
        scheme, bucket, key = storage.split_url(spec)
        spec = str(storage.local_copy(spec, include=[*TOKENIZER_FILES, "config.json"], what="tokenizer directory",
                                      dest=storage.cache_root() / "tokenizers" / scheme / bucket / key))
    if Path(spec).is_dir():
        refuse_remote_code(spec)
    return AutoTokenizer.from_pretrained(spec, trust_remote_code=False)


def _token_id(tokenizer: Any, token: str, what: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = tokenizer.unk_token_id
    if tid is None or (unk is not None and tid == unk and token != tokenizer.unk_token):
        raise ValueError(f"{what} token {token!r} is not in the tokenizer's vocabulary")
    return int(tid)


@dataclasses.dataclass
class DocumentEncoder:
    """Encodes documents as `[BOS] + ids + [EOS]`; EOS is always appended, BOS only when asked and defined."""

    tokenizer: Any
    eos_id: int
    bos_id: int | None = None

    @classmethod
    def create(cls, tokenizer: Any, *, add_bos: bool = False, eos_token: str | None = None) -> "DocumentEncoder":
        """Take EOS (or `eos_token`, e.g. "<|endoftext|>") and, if `add_bos`, BOS from the tokenizer."""
        if eos_token is not None:
            eos_id = _token_id(tokenizer, eos_token, "EOS")
        elif tokenizer.eos_token_id is not None:
            eos_id = int(tokenizer.eos_token_id)
        else:
            raise ValueError("the tokenizer defines no EOS token; name one with eos_token (--eos-token)")
        bos_id = None
        if add_bos:
            if tokenizer.bos_token_id is None:
                raise ValueError("add_bos asked for, but the tokenizer defines no BOS token")
            bos_id = int(tokenizer.bos_token_id)
        return cls(tokenizer, eos_id, bos_id)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # fast path: the Rust tokenizer, batched and multi-threaded, no length warnings
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """int32 token ids per document, with BOS/EOS added."""
        head = [] if self.bos_id is None else [self.bos_id]
        return [np.asarray(head + ids + [self.eos_id], dtype=np.int32) for ids in self._ids(texts)]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_stream(self, texts: Iterable[str], batch_size: int = 256) -> Iterator[np.ndarray]:
        """Encode an iterator of documents in batches, yielding one array per document, in order."""
        batch: list[str] = []
        for t in texts:
            batch.append(t)
            if len(batch) == batch_size:
                yield from self.encode_batch(batch)
                batch = []
        if batch:
            yield from self.encode_batch(batch)

    def describe(self) -> dict[str, Any]:
        """What a prepared dataset records about how it was tokenised."""
        tok = self.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "name_or_path": str(getattr(tok, "name_or_path", "")),
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos_token": tok.convert_ids_to_tokens(self.eos_id),
            "bos_id": self.bos_id,
            "bos_token": None if self.bos_id is None else tok.convert_ids_to_tokens(self.bos_id),
        }

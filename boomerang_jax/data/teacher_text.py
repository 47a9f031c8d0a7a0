"""Teacher-written training text: documents sampled from the teacher itself, written as jsonl.

Why: distilling only on a narrow corpus (the demo's State of the Union speeches) specialises the student to
that corpus, and every size of the family inherits it. Text the teacher writes, unprompted, follows the
teacher's own distribution, so mixing it into the training data (`DataConfig.mix`) distils the teacher's
general behaviour as well. The file is ordinary jsonl (`{"text": ...}` per line), prepared like any other
source with `boomerang prepare-data`.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.infra import storage
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.generate import generate
from boomerang_jax.models.transformer import Params


def sample_documents(
    params: Params,
    config: ModelConfig,
    *,
    start_id: int,
    stop_id: int,
    num_docs: int,
    length: int = 128,
    batch: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    dtype: Any = jnp.float32,
    log: Callable[[str], None] | None = None,
) -> Iterator[np.ndarray]:
    """`num_docs` token arrays, each sampled after `start_id` for up to `length` tokens and cut before the first
    `stop_id` (the teacher ended its document); empty ones are dropped. Seeded: same seed, same documents.

    Document i is sampled with the key fold_in(key(seed), i), so the documents do not depend on `batch`
    (rows sampled together); `batch` only sets how many are sampled at once (speed, memory). `dtype`: the
    compute dtype of the teacher's forward passes (and KV cache); another dtype samples other documents."""
    if num_docs < 1 or length < 1 or batch < 1:
        raise ValueError(f"need num_docs, length and batch >= 1, got {num_docs}, {length}, {batch}")
    root = jax.random.key(seed)
    batches = math.ceil(num_docs / batch)
    prompts = np.full((batch, 1), start_id, np.int32)
    done, t0 = 0, time.perf_counter()
    for b in range(batches):
        # a short last batch is padded with the next documents' keys (one program for every batch)
        keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(np.arange(b * batch, (b + 1) * batch))
        rows = generate(params, config, prompts, length, temperature=temperature, key=keys, dtype=dtype)[:, 1:]
        for row in rows[: num_docs - done]:
            stops = np.flatnonzero(row == stop_id)
            doc = row[: stops[0]] if len(stops) else row
            if len(doc):
                yield doc
        done = min(num_docs, done + batch)
        if log is not None:
            rate = done * length / (time.perf_counter() - t0)
            log(f"  teacher text: {done}/{num_docs} documents ({b + 1}/{batches} batches, {rate:.0f} tok/s)")


def write_teacher_text(
    params: Params,
    config: ModelConfig,
    tokenizer: Any,
    out_path: str,
    *,
    tokens: int,
    length: int = 128,
    batch: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    start_token: str = "<|endoftext|>",
    dtype: Any = jnp.float32,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Sample about `tokens` tokens of teacher text (documents of <= `length` tokens, each begun after
    `start_token`, the document separator the teacher was trained with) into a jsonl file, written atomically."""
    start_id = tokenizer.convert_tokens_to_ids(start_token)
    if start_id is None or (tokenizer.unk_token_id is not None and start_id == tokenizer.unk_token_id
                            and start_token != tokenizer.unk_token):
        raise ValueError(f"start token {start_token!r} is not in the tokenizer's vocabulary")
    if start_id >= config.vocab_size:
        raise ValueError(f"start token {start_token!r} has id {start_id}, outside the model's vocabulary "
                         f"({config.vocab_size})")
    num_docs = max(1, math.ceil(tokens / length))
    lines, n_tokens = [], 0
    for doc in sample_documents(params, config, start_id=int(start_id), stop_id=int(start_id), num_docs=num_docs,
                                length=length, batch=batch, temperature=temperature, seed=seed, dtype=dtype,
                                log=log):
        text = tokenizer.decode(doc.tolist(), skip_special_tokens=True)
        if text.strip():
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
            n_tokens += len(doc)
    if not lines:
        raise ValueError("the teacher wrote no non-empty document (every sample began with the stop token)")
    storage.write_text_atomic(out_path, "\n".join(lines) + "\n")
    return {"path": str(out_path), "documents": len(lines), "tokens": n_tokens, "length": length,
            "temperature": temperature, "seed": seed, "start_token": start_token,
            "dtype": jnp.dtype(dtype).name}

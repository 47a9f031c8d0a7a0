"""An lm-evaluation-harness model backed by our JAX forward, registered with the harness as `boomerang`.

It scores a model in memory: an HF directory, one size of a family built on the fly (`family=`, `layers=` or
`k=`: surgery.compact.build_size, nothing written), or a Model object. Requests follow the harness's `hf` model
exactly (same tokenisation, BOS/EOS prefix, left truncation to `max_length`, rolling windows, stop sequences),
so the scores equal `--model hf` on the exported size up to float rounding (tests/test_lm_backend.py).

Loglikelihoods run in fixed-size batches right-padded to power-of-two lengths (at least 16, at most
`max_length`): one compiled program per length bucket, whatever the number of requests. Requests that differ
only in their last token (one-token choices) share a row, as the `hf` model's logits cache does. Rows are split over
the local devices (data parallel; params replicated). Greedy generation calls models.generate on prompts of one
length per call (its decoding has no padding mask), rows padded to the batch size, so programs are one per
distinct prompt length of a task. `compiles` counts XLA compilations of the whole process since the model was
made (jax.monitoring), `programs` the distinct shapes this model ran.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (registers the harness's own models first: its registry loads them only when empty)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import (
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)

from boomerang_jax.hf.load import load_model
from boomerang_jax.models.config import to_hf
from boomerang_jax.models.generate import generate
from boomerang_jax.models.logits import chunk_layout, chunk_logits, from_chunks, to_chunks
from boomerang_jax.models.model import Model
from boomerang_jax.models.transformer import forward, head_kernel
from boomerang_jax.surgery.compact import build_size

log = logging.getLogger(__name__)
NAME = "boomerang"
MIN_BUCKET = 16
_COMPILES = [0]  # XLA backend compilations in this process


def _count_compile(event: str, duration: float, **_: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_count() -> int:
    """XLA compilations in this process so far (every jitted program and eager op compiled)."""
    return _COMPILES[0]


def bucket(n: int, cap: int) -> int:
    """The padded length of a sequence of n tokens: the next power of two >= max(n, MIN_BUCKET), at most cap."""
    return min(max(MIN_BUCKET, 1 << max(0, n - 1).bit_length()), max(cap, n))


@functools.partial(jax.jit, static_argnames=("config", "dtype", "chunk"))
def score_rows(params: Any, tokens: jax.Array, targets: jax.Array, mask: jax.Array, last: jax.Array, *,
               config: Any, dtype: Any, chunk: int = 64) -> tuple[jax.Array, ...]:
    """Per row: the sum of log p(targets) over `mask` (float32 [B]), whether every masked target is the argmax
    ([B] bool), and at position `last` [B] the log-softmax over the vocabulary [B, V] and its argmax [B] (rows
    whose requests differ only in their last token share one row). Logits are made one chunk of positions at a
    time (never [B, T, V])."""
    out = forward(params, config, tokens, return_logits=False, dtype=dtype)
    head = head_kernel(params, config).astype(jnp.float32)
    t = tokens.shape[1]
    c, n, pad = chunk_layout(t, chunk)

    def body(carry: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, tuple[jax.Array, jax.Array]]:
        h, tgt = xs
        logits = chunk_logits(h, head)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return None, (picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tgt)

    _, (logp, greedy) = jax.lax.scan(body, None, (to_chunks(out.final_hidden, c, n, pad),
                                                  to_chunks(targets, c, n, pad)))
    logp, greedy = from_chunks(logp, t), from_chunks(greedy, t)
    keep = mask.astype(bool)
    final = jnp.take_along_axis(out.final_hidden, last[:, None, None], axis=1)  # [B, 1, D]
    last_logits = chunk_logits(final, head)[:, 0]
    return (jnp.sum(jnp.where(keep, logp, 0.0), axis=-1), jnp.all(greedy | ~keep, axis=-1),
            jax.nn.log_softmax(last_logits, axis=-1), jnp.argmax(last_logits, axis=-1))


def _opt_int(v: Any) -> int | None:
    return None if v is None or v == "" else int(v)


def _opt_bool(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    return str(v).lower() in ("1", "true", "yes")


def load_tokenizer(model: Model, source_dir: str | None = None) -> Any:
    """The tokenizer the harness's `hf` model would load for this model's exported directory."""
    from transformers import AutoTokenizer

    if source_dir is not None and (Path(source_dir) / "config.json").exists():
        return AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False, use_fast=True)
    if not model.tokenizer_files:
        raise ValueError(f"{model.where or 'model'}: no tokenizer files; pass tokenizer=")
    with tempfile.TemporaryDirectory() as d:
        for name, data in model.tokenizer_files.items():
            (Path(d) / name).write_bytes(data)
        (Path(d) / "config.json").write_text(json.dumps(to_hf(model.config, model.hf_config)))
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False, use_fast=True)


def hf_config_object(model: Model) -> Any:
    """The transformers config the exported directory would load as (for max_length, as the harness resolves it)."""
    from transformers import AutoConfig

    cfg = to_hf(model.config, model.hf_config)
    for key in ("dtype", "torch_dtype", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class BoomerangLM(TemplateLM):
    """lm-eval model on our JAX forward. Give one of: pretrained (HF dir / hub id / gguf), family (+ layers or k),
    model (a Model). batch_size: rows per program (rounded up to the device count); dtype: float32 | bfloat16."""

    def __init__(self, pretrained: str | None = None, family: str | None = None, layers: int | None = None,
                 k: int | None = None, model: Model | None = None, tokenizer: Any = None, batch_size: Any = 8,
                 dtype: str = "float32", max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: Any = None, prefix_token_id: int | None = None, data_parallel: Any = True,
                 device: str | None = None, max_batch_size: Any = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.warning("boomerang lm-eval model: ignoring arguments %s", sorted(unused))
        given = [n for n, v in (("pretrained", pretrained), ("family", family), ("model", model)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of pretrained=, family=, model= (got {given or 'none'})")
        source_dir = None
        if model is None and family is not None:
            model = build_size(family, layers=_opt_int(layers), k=_opt_int(k))
        elif model is None:
            model = load_model(str(pretrained), to_device=False)
            source_dir = str(pretrained)
        self.model = model
        self.config = model.config
        self.dtype = jnp.dtype({"bf16": "bfloat16", "fp32": "float32"}.get(str(dtype), str(dtype)))
        devices = jax.devices() if _opt_bool(data_parallel) is not False else jax.devices()[:1]
        self.mesh = Mesh(np.array(devices), ("data",))
        self.rows = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.params = jax.tree.map(lambda x: jax.device_put(np.asarray(x).astype(self.dtype), replicated),
                                   model.params)
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.batch = -(-max(1, bs) // len(devices)) * len(devices)
        self.tokenizer = configure_pad_token(tokenizer or load_tokenizer(model, source_dir))
        self.add_bos_token = _opt_bool(add_bos_token)
        self.custom_prefix_token_id = _opt_int(prefix_token_id)
        self._max_length = _opt_int(max_length) or resolve_max_length(hf_config_object(model), self.tokenizer)
        self._max_gen_toks = int(max_gen_toks)
        gen = model.generation_config or {}
        eos = gen.get("eos_token_id", to_hf(model.config, model.hf_config).get("eos_token_id"))
        self.stop_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        self.programs: set[tuple[Any, ...]] = set()
        self.compiles_at_start = compile_count()

    # ---------------------------------------------------------------------------- what the harness asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    @property
    def compiles(self) -> int:
        """XLA compilations in this process since this model was made."""
        return compile_count() - self.compiles_at_start

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": int(sum(np.size(x) for x in jax.tree.leaves(self.params))),
                "model_dtype": str(self.dtype), "model_where": self.model.where, "backend": NAME}

    def _special(self, add_special_tokens: bool | None) -> dict[str, bool]:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """As the `hf` model encodes: the tokenizer's special tokens unless the string starts with the prefix."""
        kw = self._special(add_special_tokens)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kw)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -------------------------------------------------------------------------------- loglikelihoods
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) for token pairs, truncated from the left to
        max_length as the `hf` model does; batched by length bucket, longest first."""
        inputs, groups = [], {}
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont or len(cont) > self.max_length:
                raise ValueError("loglikelihood requests need a context and a continuation of 1..max_length tokens")
            inputs.append((ctx + cont)[-(self.max_length + 1):])
            # requests that differ only in their last token (e.g. one-token choices) share a row, as `hf` does
            groups.setdefault((tuple(inputs[-1][:-1]), len(cont)), []).append(i)
        keys = sorted(groups, key=lambda key: -len(key[0]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(keys), self.batch):
            batch = keys[start:start + self.batch]
            t = bucket(len(batch[0][0]), self.max_length)
            tokens, targets, mask = (np.zeros((self.batch, t), np.int32) for _ in range(3))
            last = np.zeros((self.batch,), np.int32)
            for r, (prefix, n_cont) in enumerate(batch):
                seq = inputs[groups[(prefix, n_cont)][0]]
                n = len(seq) - 1
                tokens[r, :n], targets[r, :n] = seq[:-1], seq[1:]
                mask[r, n - n_cont:n - 1] = 1  # every continuation token but the last, which is per request
                last[r] = n - 1
            self.programs.add(("score", self.batch, t))
            arrays = (jax.device_put(a, self.rows) for a in (tokens, targets, mask, last))
            logp, greedy, last_logp, last_argmax = (np.asarray(a) for a in score_rows(
                self.params, *arrays, config=self.config, dtype=self.dtype))
            for r, key in enumerate(batch):
                for i in groups[key]:
                    tgt = inputs[i][-1]
                    out[i] = (float(np.float64(logp[r]) + np.float64(last_logp[r, tgt])),
                              bool(greedy[r]) and int(last_argmax[r]) == tgt)
        return out

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        res = self.score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), answer in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return res

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over each string's disjoint windows of max_length tokens (the harness's windows)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                        prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self.score(windows)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------ generation
    def _context_tokens(self, context: str, max_ctx: int) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token", None)
        kw = {"add_special_tokens": False} if has_bos_prefix(context, bos) else self._special(None)
        return self.tokenizer(context, **kw)["input_ids"][-max_ctx:]

    def _cut(self, tokens: Sequence[int]) -> list[int]:
        for i, tok in enumerate(tokens):
            if tok in self.stop_ids:
                return list(tokens[:i])
        return list(tokens)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (sampled when a task asks for do_sample), cut at the first stop sequence (the
        task's `until` plus the EOS text) and at the model's EOS ids, at most max_gen_toks tokens."""
        res: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if kwargs.pop("do_sample", False) else 0.0
            if new >= self.max_length:
                raise ValueError(f"max_gen_toks {new} must be below max_length {self.max_length}")
            by_len: dict[int, list[tuple[int, list[int]]]] = {}
            for i in idx:
                toks = self._context_tokens(requests[i].args[0], self.max_length - new)
                by_len.setdefault(len(toks), []).append((i, toks))
            for length in sorted(by_len, reverse=True):
                rows = by_len[length]
                for start in range(0, len(rows), self.batch):
                    chunk = rows[start:start + self.batch]
                    prompts = np.array([t for _, t in chunk] + [chunk[-1][1]] * (self.batch - len(chunk)), np.int32)
                    self.programs.add(("generate", self.batch, length, new, temperature))
                    out = generate(self.params, self.config, prompts, new, temperature=temperature,
                                   key=jax.random.key(start) if temperature > 0 else None, dtype=self.dtype)
                    for r, (i, _) in enumerate(chunk):
                        text = self.tok_decode(self._cut(out[r, length:].tolist()))
                        res[i] = postprocess_generated_text(text, until, None)
                        self.cache_hook.add_partial("generate_until", requests[i].args, res[i])
        return [r or "" for r in res]


if NAME not in model_registry:
    register_model(NAME)(BoomerangLM)

"""Check an exported HF directory: reload it with transformers and compare logits with our JAX model."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.hf.load import load_hf, resolve_dir
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.transformer import Params, forward


@dataclasses.dataclass
class VerifyReport:
    """One export checked against transformers: the largest logit difference, and whether it is within both
    tolerances: `atol` (absolute) and `rtol` times the largest |logit| (a difference that is small only because
    the logits are small, e.g. 9e-4 on logits of 0.44, is a different model, not rounding)."""

    path: str
    max_abs_diff: float
    max_abs_logit: float
    num_sequences: int
    seq_len: int
    atol: float
    rtol: float = 1e-4

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol and self.relative_diff <= self.rtol

    def __str__(self) -> str:
        status = "OK" if self.ok else "MISMATCH"
        return (f"{status}: {self.path}: max |logits_jax - logits_transformers| = {self.max_abs_diff:.3e} "
                f"= {self.relative_diff:.1e} of max |logit| {self.max_abs_logit:.2f} ({self.num_sequences} sequences x "
                f"{self.seq_len} tokens; atol {self.atol:g}, rtol {self.rtol:g})")


def verify_export(
    path: str | os.PathLike,
    *,
    num_sequences: int = 3,
    seq_len: int = 32,
    seed: int = 0,
    atol: float = 1e-3,
    rtol: float = 1e-4,
    tokens: np.ndarray | None = None,
) -> VerifyReport:
    """Reload `path` with transformers.AutoModelForCausalLM (fp32, CPU) and with `load_hf`; compare logits.

    `path` is a local HF directory, a `gs://` one (read through a local cached copy) or a hub id. Uses random
    token ids (seeded) unless `tokens` [N, T] is given. Requires torch (the `torch` extra).
    """
    import torch  # the `torch` extra: imported only when verifying
    from transformers import AutoModelForCausalLM

    _check_counts(tokens, num_sequences, seq_len)
    local = resolve_dir(path)
    ck = load_hf(local)
    model = AutoModelForCausalLM.from_pretrained(str(local), dtype=torch.float32,
                                                 trust_remote_code=False).eval()
    return compare_logits(str(path), ck.config, ck.params, model, num_sequences=num_sequences, seq_len=seq_len,
                          seed=seed, atol=atol, rtol=rtol, tokens=tokens)


def _check_counts(tokens: np.ndarray | None, num_sequences: int, seq_len: int) -> None:
    if tokens is None:
        for flag, value in (("--num-sequences", num_sequences), ("--seq-len", seq_len)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1 (got {value}): verify compares logits of at least one "
                                 "sequence of at least one token")


def compare_logits(where: str, config: ModelConfig, params: Params, torch_model: Any, *, num_sequences: int = 3,
                   seq_len: int = 32, seed: int = 0, atol: float = 1e-3, rtol: float = 1e-4,
                   tokens: np.ndarray | None = None) -> VerifyReport:
    """Our JAX forward of (config, params) against a transformers model (in eval mode) on the same tokens
    (seeded random ids unless given): the report of `verify_export`, for a model built in memory too."""
    import torch

    _check_counts(tokens, num_sequences, seq_len)
    if tokens is None:
        rng = np.random.RandomState(seed)
        tokens = rng.randint(0, config.vocab_size, (num_sequences, seq_len))
    tokens = np.asarray(tokens)
    with torch.no_grad():
        ref = torch_model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(lambda p, t: forward(p, config, t).logits)(params, jnp.asarray(tokens)))
    return VerifyReport(
        path=where,
        max_abs_diff=float(np.abs(ours - ref).max()),
        max_abs_logit=float(np.abs(ref).max()),
        num_sequences=int(tokens.shape[0]),
        seq_len=int(tokens.shape[1]),
        atol=atol,
        rtol=rtol,
    )

"""Benchmark: sampling teacher text, the old decoding loop vs the library's, side by side on the real teacher.

    .venv/bin/python benchmarks/generate.py [--batches 64,256] [--old-batches 64] [--length 128] [--repeats 2]

The teacher is the embedded SmolLM2-135M GGUF (float32), prompted with one `<|endoftext|>` per row and sampled at
temperature 1 for `--length` new tokens, the shape `boomerang demo` samples its teacher text in (128 tokens,
batch 64). "old" is a copy of the loop before issue 20, kept here only for this comparison: the whole
[L, B, S, Hkv, hd] cache is the carry of the layer scan (each layer writes its slot with a dynamic update and
reads its slice back), and tokens are drawn with `jax.random.categorical` (Gumbel noise over the whole
vocabulary, one key per batch). "new" is `boomerang_jax.models.generate`: the layer scan only reads the cache
and the step writes every layer's new keys and values once, in place, and sampling inverts the CDF with two
uniforms per row. Runs of old and new alternate, after one untimed run each (compilation), so a shared
machine's load falls on both; tokens/s = batch x length / wall seconds of one call. Also checked: greedy decoding
gives the same tokens old and new (a short run at batch 4).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from boomerang_jax.hf.load import EMBEDDED_TEACHER, load_model
from boomerang_jax.models.attention import attend, cache_mask
from boomerang_jax.models.config import ModelConfig
from boomerang_jax.models.generate import _generate as new_generate
from boomerang_jax.models.transformer import MLP, Dense, Norm, apply_rope, rope_tables

START_ID = 0  # <|endoftext|> in SmolLM2's tokenizer, the demo's document separator


# ----------------------------------------------------------------------------- the old loop (a copy, as it was)
class _OldAttention(nn.Module):
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv, index, layer):
        c = self.config
        b, t, _ = x.shape
        dense = lambda n, f, bias: Dense(f, bias, self.dtype, name=n)  # noqa: E731
        q = dense("q_proj", c.num_heads * c.head_dim, c.attention_bias)(x).reshape(b, t, c.num_heads, c.head_dim)
        k = dense("k_proj", c.num_kv_heads * c.head_dim, c.attention_bias)(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = dense("v_proj", c.num_kv_heads * c.head_dim, c.attention_bias)(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = Norm("rms", c.norm_eps, c.head_dim, name="q_norm")(q)
            k = Norm("rms", c.norm_eps, c.head_dim, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        zero = jnp.zeros((), jnp.int32)
        at = (layer, zero, jnp.asarray(index, jnp.int32), zero, zero)
        kv = tuple(jax.lax.dynamic_update_slice(c_, new[None].astype(c_.dtype), at) for c_, new in zip(kv, (k, v)))
        k, v = (jax.lax.dynamic_index_in_dim(c_, layer, 0, keepdims=False) for c_ in kv)
        out = attend(q, k, v, implementation="xla", dtype=self.dtype, mask=mask).reshape(b, t, c.num_heads * c.head_dim)
        return Dense(c.hidden_size, c.attention_out_bias, self.dtype, name="o_proj")(out), kv


class _OldBlock(nn.Module):
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, carry, cos, sin, mask, slot, index):
        c = self.config
        h, kv = carry
        norm = lambda n: Norm(c.norm_type, c.norm_eps, c.hidden_size, name=n)  # noqa: E731
        attn, kv = _OldAttention(c, self.dtype, name="attn")(norm("attn_norm")(h), cos, sin, mask, kv, index, slot)
        if c.parallel_residual:
            h = h + attn + MLP(c, self.dtype, jnp.float32, name="mlp")(norm("mlp_norm")(h))
        else:
            h = h + attn
            h = h + MLP(c, self.dtype, jnp.float32, name="mlp")(norm("mlp_norm")(h))
        return (h, kv), None


class _OldDecoder(nn.Module):
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, tokens, cache, index):
        c = self.config
        positions = jnp.broadcast_to(index + jnp.arange(tokens.shape[-1]), tokens.shape)
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed")
        h = embed(tokens).astype(self.dtype)
        cos, sin = rope_tables(c, positions)
        layers = nn.scan(_OldBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                         length=c.num_layers)(c, self.dtype, name="layers")
        mask = cache_mask(positions, cache[0].shape[2])
        (h, cache), _ = layers((h, tuple(cache)), cos, sin, mask, jnp.arange(c.num_layers, dtype=jnp.int32), index)
        final = Norm(c.norm_type, c.norm_eps, c.hidden_size, name="final_norm")(h)
        logits = embed.attend(final) if c.tie_word_embeddings else Dense(c.vocab_size, False, self.dtype,
                                                                          name="lm_head")(final)
        return logits, cache


@functools.partial(jax.jit, static_argnames=("config", "new_tokens", "temperature"))
def old_generate(params, prompts, key, *, config: ModelConfig, new_tokens: int, temperature: float):
    """The loop as it was: cache [L, B, S, Hkv, hd] carried through the layer scan, Gumbel-max sampling."""
    batch, prompt_len = prompts.shape
    total = prompt_len + new_tokens
    shape = (config.num_layers, batch, total, config.num_kv_heads, config.head_dim)
    model = _OldDecoder(config, jnp.float32)
    apply = lambda tokens, cache, index: model.apply({"params": params}, tokens, cache, index)  # noqa: E731
    logits, cache = apply(prompts, (jnp.zeros(shape), jnp.zeros(shape)), 0)

    def step(carry, i):
        cache, logits, key = carry
        key, sub = jax.random.split(key)
        logits = logits.astype(jnp.float32)
        if temperature == 0.0:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(sub, logits / temperature, axis=-1)
        token = token.astype(jnp.int32)
        nxt, cache = apply(token[:, None], cache, prompt_len + i)
        return (cache, nxt[:, -1], key), token

    _, tokens = jax.lax.scan(step, (cache, logits[:, -1], key), jnp.arange(new_tokens))
    return jnp.concatenate([prompts, tokens.T], axis=1)


# ----------------------------------------------------------------------------- timing
def run_old(params, config, batch: int, length: int, temperature: float = 1.0) -> np.ndarray:
    prompts = jnp.full((batch, 1), START_ID, jnp.int32)
    return np.asarray(old_generate(params, prompts, jax.random.key(0), config=config, new_tokens=length,
                                   temperature=temperature))


def run_new(params, config, batch: int, length: int, temperature: float = 1.0) -> np.ndarray:
    prompts = jnp.full((batch, 1), START_ID, jnp.int32)
    keys = jax.random.split(jax.random.key(0), batch)
    return np.asarray(new_generate(params, prompts, keys, config=config, new_tokens=length, temperature=temperature,
                                   dtype=jnp.dtype(jnp.float32)))


def timed(fn, *args) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="64,256", help="batch sizes for the new loop")
    ap.add_argument("--old-batches", default="64", help="batch sizes for the old loop (empty: none)")
    ap.add_argument("--length", type=int, default=128, help="new tokens per row (the demo: 128)")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per configuration")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "generate.json"))
    args = ap.parse_args(argv)
    ck = load_model(EMBEDDED_TEACHER)
    params, config = ck.params, ck.config
    new_b = [int(x) for x in args.batches.split(",") if x]
    old_b = [int(x) for x in args.old_batches.split(",") if x]

    # greedy: the same tokens from both loops
    g_old, g_new = run_old(params, config, 4, 24, 0.0), run_new(params, config, 4, 24, 0.0)
    greedy_equal = bool((g_old == g_new).all())
    print(f"greedy, batch 4, 24 tokens: old == new: {greedy_equal}", flush=True)

    configs = [("old", b) for b in old_b] + [("new", b) for b in new_b]
    runners = {"old": run_old, "new": run_new}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for name, b in configs:  # compile (and one untimed run)
        first, _ = timed(runners[name], params, config, b, args.length)
        rows[(name, b)] = {"loop": name, "batch": b, "length": args.length, "first_call_s": round(first, 2),
                           "seconds": []}
        print(f"{name} batch {b}: first call (compiles) {first:.1f} s", flush=True)
    for r in range(args.repeats):  # alternate, so that load on a shared machine falls on every configuration
        for name, b in configs:
            sec, _ = timed(runners[name], params, config, b, args.length)
            rows[(name, b)]["seconds"].append(round(sec, 3))
            print(f"  repeat {r + 1}: {name} batch {b}: {sec:.2f} s, {b * args.length / sec:.0f} tok/s", flush=True)
    results = []
    for row in rows.values():
        med = statistics.median(row["seconds"])
        row["median_s"] = round(med, 3)
        row["tokens_per_s"] = round(row["batch"] * row["length"] / med, 1)
        results.append(row)
    base = next((r for r in results if r["loop"] == "old" and r["batch"] == 64), None)
    if base is None and old_b:
        base = next(r for r in results if r["loop"] == "old")
    for row in results:
        if base is not None:
            row["speedup_vs_old_batch_%d" % base["batch"]] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
    out = {
        "benchmark": "generate",
        "teacher": EMBEDDED_TEACHER,
        "temperature": 1.0,
        "greedy_old_equals_new": greedy_equal,
        "results": results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "load_average_at_end": list(os.getloadavg())},
        "note": "old and new alternate in one process; on a shared machine absolute figures vary, ratios less so",
    }
    for row in results:
        extra = "".join(f", {k} {v}" for k, v in row.items() if k.startswith("speedup"))
        print(f"{row['loop']} batch {row['batch']}: {row['tokens_per_s']} tok/s (median of {row['seconds']}){extra}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()

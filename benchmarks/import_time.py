"""Import time of SmolLM2-135M: our `load_hf` vs `transformers.AutoModelForCausalLM.from_pretrained`.

Both read the same exported HF directory (float32 safetensors). Each measurement runs in a fresh
subprocess (warm page cache, libraries already imported, only the load call timed), A/B alternated,
and the ratio of medians is reported. Run: `.venv/bin/python benchmarks/import_time.py [--repeats 5]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

OURS = """
import time, jax, sys
from boomerang_jax.hf.checkpoint import load_hf
t = time.perf_counter()
ck = load_hf(sys.argv[1])
jax.block_until_ready(ck.params)
print(time.perf_counter() - t)
"""
THEIRS = """
import time, sys, torch
from transformers import AutoModelForCausalLM
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(time.perf_counter() - t)
"""


def _run(code: str, model_dir: Path) -> float:
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model-dir", help="an existing HF dir (default: export the embedded SmolLM2 teacher)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "smollm2"
        if not args.model_dir:
            from boomerang_jax.hf.export import save_hf
            from boomerang_jax.hf.sources import EMBEDDED_TEACHER, load_model

            ck = load_model(EMBEDDED_TEACHER, to_device=False)
            save_hf(model_dir, ck.config, ck.params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files)
        _run(OURS, model_dir), _run(THEIRS, model_dir)  # warm the page cache for both
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(_run(OURS, model_dir))
            theirs.append(_run(THEIRS, model_dir))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "ours_s_median": round(statistics.median(ours), 3),
        "transformers_s_median": round(statistics.median(theirs), 3),
        "ratio_ours_over_transformers": round(statistics.median(ours) / statistics.median(theirs), 3),
        "ours_s": [round(x, 3) for x in ours],
        "transformers_s": [round(x, 3) for x in theirs],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

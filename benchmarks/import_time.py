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
import resource, time, jax, sys
from boomerang_jax.hf.load import load_hf
t = time.perf_counter()
ck = load_hf(sys.argv[1])
jax.block_until_ready(ck.params)
dt = time.perf_counter() - t
print("rss_mb ours", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(dt)
"""
THEIRS = """
import resource, time, sys, torch
from transformers import AutoModelForCausalLM
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
dt = time.perf_counter() - t
print("rss_mb transformers", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(dt)
"""


PEAK: dict[str, float] = {}


def _run(code: str, model_dir: Path) -> float:
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    for x in lines:
        if x.startswith("rss_mb"):
            _, who, mb = x.split()
            PEAK[who] = max(PEAK.get(who, 0.0), float(mb))
    return float(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model-dir", help="an existing HF dir (default: export the embedded SmolLM2 teacher)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "smollm2"
        if not args.model_dir:
            from boomerang_jax.hf.export import save_hf
            from boomerang_jax.hf.load import EMBEDDED_TEACHER, load_model

            ck = load_model(EMBEDDED_TEACHER, to_device=False)
            save_hf(model_dir, ck.config, ck.params, hf_config=ck.hf_config, tokenizer_files=ck.tokenizer_files)
        _run(OURS, model_dir), _run(THEIRS, model_dir)  # warm the page cache for both
        model_mb = round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20, 1)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(_run(OURS, model_dir))
            theirs.append(_run(THEIRS, model_dir))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "ours_s_median": round(statistics.median(ours), 3),
        "transformers_s_median": round(statistics.median(theirs), 3),
        "ratio_ours_over_transformers": round(statistics.median(ours) / statistics.median(theirs), 3),
        "model_mb": model_mb,
        "peak_rss_mb_of_process": {k: round(v, 1) for k, v in PEAK.items()},
        "ours_s": [round(x, 3) for x in ours],
        "transformers_s": [round(x, 3) for x in theirs],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

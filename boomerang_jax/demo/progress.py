"""How long the demo takes: each stage's expected time from the settings and measured rates (settings.RATES),
and progress bars with an ETA for its long loops, including loops in other modules seen only through their
`log=` callbacks (the calls are counted and weighted, never parsed) and the distillation's metrics.jsonl.

Bars go to stderr: redrawn in place on a terminal; into a log file, one plain line every 30 s.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from boomerang_jax.demo.settings import DemoSettings, rates
from boomerang_jax.surgery import LayerPlan, num_steps
from boomerang_jax.surgery.family_export import parse_sizes
from boomerang_jax.surgery.orders import DATA_ORDERS, KL_ORDERS


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def fmt_seconds(seconds: float) -> str:
    """A duration for people: '40 s', '12 min', '1.5 h'."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class _Lines:
    """What tqdm writes, for a log file: each redraw becomes one line; the blank clears around messages go."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.replace("\n", "\r").split("\r"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: float, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on stderr: redrawn in place every second on a terminal; into a log file (not a terminal), one
    plain line every 30 s and at the end."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=f"[demo] {desc}", unit=unit, file=sys.stderr if tty else _Lines(sys.stderr),
                dynamic_ncols=tty, ncols=None if tty else 100, mininterval=1.0 if tty else 30.0, smoothing=0.1)


class LogProgress:
    """A `log=` callback for a loop in another module (teacher text, greedy patch steps, family export): prints
    each message and advances a progress bar by the weight of that call (the i-th call: `weights[i]`, else 1),
    so the bar shows an ETA without parsing the messages. Use as a context manager."""

    def __init__(self, desc: str, total: float, weights: Sequence[float] | None = None, unit: str = "it") -> None:
        self.total, self.weights, self.calls = total, list(weights) if weights is not None else None, 0
        self.bar = progress_bar(total, desc, unit)

    def __call__(self, msg: str) -> None:
        self.bar.write(f"[demo] {msg}", file=sys.stdout)
        w = 1 if self.weights is None else (self.weights[self.calls] if self.calls < len(self.weights) else 0)
        self.calls += 1
        self.bar.update(max(0, min(w, self.total - self.bar.n)))

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


class StepRate(threading.Thread):
    """Watches the distillation's metrics.jsonl while it trains and, once `after` steps past the first (which
    compiles) are done, prints the measured seconds per step and the time left (the run's own bar shows the ETA
    from then on)."""

    def __init__(self, metrics: Path, total: int, estimate_s: float, after: int = 5, poll_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.metrics, self.total, self.estimate_s, self.after, self.poll_s = metrics, total, estimate_s, after, poll_s
        self.stop = threading.Event()
        self.message: str | None = None

    def _step(self) -> int:
        try:
            lines = self.metrics.read_text().splitlines()
        except OSError:
            return -1
        steps = [json.loads(ln).get("step", -1) for ln in lines[-3:] if ln.strip().startswith("{")]
        return max(steps, default=-1)

    def run(self) -> None:
        first: tuple[int, float] | None = None
        while not self.stop.wait(self.poll_s):
            step = self._step()
            if step < 1:
                continue
            now = time.perf_counter()
            if first is None:
                first = (step, now)
            elif step >= min(first[0] + self.after, self.total) and step > first[0]:
                rate = (now - first[1]) / (step - first[0])
                self.message = (f"distill: measured {rate:.2f} s/step over steps {first[0]}-{step} (estimate "
                                f"{self.estimate_s:.2f}); about {fmt_seconds(rate * (self.total - step))} left for "
                                f"{self.total - step} steps")
                _say(self.message)
                return

    def __enter__(self) -> StepRate:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.join(timeout=5)


def _teacher_layers(out: Path) -> int | None:
    try:
        return int(json.loads((out / "teacher" / "config.json").read_text())["num_hidden_layers"])
    except (OSError, KeyError, ValueError):
        return None


def _plan(s: DemoSettings, out: Path) -> LayerPlan | None:
    n = _teacher_layers(out)
    return LayerPlan.from_spec(s.plan, n) if n else None


def greedy_weights(s: DemoSettings, plan: LayerPlan) -> list[int]:
    """Candidate evaluations behind each `log=` call of the data-chosen order: kl-greedy logs once per step
    (step i tries every block not chosen yet), by-loss once per block."""
    m = len(plan.multi_layer_blocks)
    return [m - i for i in range(m - 1)] if s.order in KL_ORDERS else [1] * m


def _num_sizes(s: DemoSettings, plan: LayerPlan) -> int:
    try:
        return len(parse_sizes(s.sizes, plan, "last-to-first"))
    except Exception:  # a size list that depends on the order chosen later: the full family's count
        return num_steps(plan) + 1


def _num_evals(s: DemoSettings, plan: LayerPlan) -> int:
    sizes = _num_sizes(s, plan)
    return len(s.heldout) * (3 * sizes + len([o for o in s.also_orders if o != s.order]) * max(0, sizes - 2))


def expected(stage: str, s: DemoSettings, out: Path) -> tuple[float, str]:
    """The expected time of a stage (seconds) and how it was estimated, from the settings and RATES."""
    r = rates(s.compute_dtype)
    if stage == "teacher":
        return r["teacher_s"], "dequantise and write the teacher"
    if stage == "data":
        tok = s.teacher_text_budget if s.teacher_text_share > 0 else 0
        prep = r["tokenise_s_per_text"] * (1 + len(s.heldout))
        t = prep + (r["sample_setup_s"] + tok / r["sample_tokens_per_s"] if tok else 0.0)
        return t, (f"tokenise {1 + len(s.heldout)} texts (~{fmt_seconds(prep)}) + sample {tok} teacher tokens at "
                   f"~{r['sample_tokens_per_s']:.0f} tokens/s" if tok else f"tokenise {1 + len(s.heldout)} texts")
    if stage == "distill":
        step = s.batch * s.seq / r["train_tokens_per_s"]
        return 60.0 + s.steps * step, (f"set-up (~1 min) + {s.steps} steps x ~{step:.1f} s/step "
                                       f"({s.batch} x {s.seq} tokens)")
    plan = _plan(s, out)
    if plan is None:
        return 0.0, "unknown (no teacher yet)"
    sizes = _num_sizes(s, plan)
    if stage == "family":
        export = sizes * r["export_s_per_size"]
        if s.order not in DATA_ORDERS:
            return export, f"export {sizes} sizes x ~{r['export_s_per_size']:.0f} s"
        cands = sum(greedy_weights(s, plan))
        per = (r["kl_candidate_s"] * s.calib_tokens / 4096 if s.order in KL_ORDERS
               else r["eval_overhead_s"] + s.calib_tokens / r["eval_tokens_per_s"])
        return cands * per + export, (f"{s.order}: {cands} candidate evaluations x ~{per:.0f} s "
                                      f"({s.calib_tokens} tokens) + export {sizes} sizes "
                                      f"x ~{r['export_s_per_size']:.0f} s")
    if stage == "eval":
        n = _num_evals(s, plan)
        per = (r["eval_overhead_s"] + s.eval_tokens / r["eval_tokens_per_s"]) * r["eval_shared_fraction"]
        return n * per, (f"{n} evaluations ({len(s.heldout)} texts) x ~{per:.0f} s ({s.eval_tokens} tokens each, "
                         "shared layers run once)")
    if stage == "report":
        return r["verify_s"], "tables, plot and one `boomerang verify`"
    return 0.0, "unknown"

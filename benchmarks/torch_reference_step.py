"""The project's PyTorch reference-style distillation step: what benchmarks/step.py compares our JAX step with.

It is written the way a PyTorch user would write boomerang distillation with Hugging Face models, nothing
tuned: both models are `transformers` AutoModelForCausalLM with SDPA attention, the frozen teacher runs under
`torch.no_grad()`, both forwards return every hidden state (`output_hidden_states=True`) and full logits, and
the loss is docs/METHOD.md section 2 (the same as boomerang_jax.distill.loss.distill_loss):

    L = w_ce * CE + w_kl * tau^2 * KL(teacher || student) + sum_p (w_cos / P) * (1 - cos(h_S[s_p], h_T[t_p]))

with log-softmax, CE, KL and cosine in float32, every term a masked mean over the batch's real tokens, and the
aligned pairs of the paper's default plan (every=2, first=1, last=2; surgery.LayerPlan.aligned_pairs). The
optimiser is torch.optim.AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1 on every parameter), global-norm
clipping at 1.0 and the linear-warmup + cosine schedule of distill.optim.lr_schedule. Precision as our
benchmarked step: fp32 student master weights under bf16 autocast, a bf16 teacher (--compute-dtype fp32: all
float32, no autocast).

Used by benchmarks/step.py as a child process (it prints one JSON line):

    python benchmarks/torch_reference_step.py --preset qwen3-1.7b --batch 4 --seq 2048 --steps 5 --warmup 2

and on its own, without a GPU, as a smoke test that also checks the loss against our JAX loss on the same
weights and batch (float32; they agree to about 1e-5):

    .venv/bin/python benchmarks/torch_reference_step.py --tiny

Presets (HF config keys) are benchmarks/step.py's PRESETS, read from the file next to this one.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# --tiny: a small random Qwen3 (q/k norms, GQA, tied head), runs in seconds on a CPU.
TINY_QWEN3 = dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                  tie_word_embeddings=True, max_position_embeddings=512)


def presets() -> dict[str, dict]:
    """benchmarks/step.py's PRESETS (one list of shapes for both sides), loaded without importing jax."""
    spec = importlib.util.spec_from_file_location("_boomerang_bench_step", HERE / "step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.PRESETS, **{"tiny-qwen3": TINY_QWEN3})


# ------------------------------------------------------------------------------------------ plan and config
def default_plan(num_layers: int, every: int = 2, first: int = 1, last: int = 2) -> list[list[int]]:
    """Blocks of teacher layers, one per student layer, by the paper's knobs (as surgery.LayerPlan.from_knobs):
    keep layers 0..first-1, every `every`-th from first-1 on and the last `last`; each kept layer starts a block."""
    kept = sorted(set(range(first)) | set(range(first - 1, num_layers, every)) | set(range(num_layers - last,
                                                                                          num_layers)))
    ends = kept[1:] + [num_layers]
    return [list(range(a, b)) for a, b in zip(kept, ends)]


def aligned_pairs(blocks: list[list[int]]) -> list[tuple[int, int]]:
    """(student, teacher) HF hidden-state indices: the embeddings, then student layer i with the last teacher
    layer of block i; the last pair is both final-norm outputs (HF's hidden_states[-1])."""
    return [(0, 0)] + [(i + 1, b[-1] + 1) for i, b in enumerate(blocks)]


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """LossConfig's defaults (the paper's values)."""

    w_ce: float = 1.0
    w_kl: float = 0.1
    tau: float = 1.0
    w_cos: float = 2.0


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """TrainConfig's optimiser defaults; total/warmup steps as benchmarks/step.py gives our step."""

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    total_steps: int = 1000
    warmup_steps: int = 10
    end_lr_ratio: float = 0.0


def lr_factor(o: OptimSettings, step: int) -> float:
    """Multiplier of o.lr at optimiser step `step` (0-based), as distill.optim.lr_schedule."""
    if step < o.warmup_steps:
        return (step + 1) / max(o.warmup_steps, 1)
    progress = min(max((step - o.warmup_steps) / max(o.total_steps - o.warmup_steps, 1), 0.0), 1.0)
    end = o.end_lr_ratio
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_models(hf: dict, device: str, teacher_dtype: torch.dtype, seed: int = 0):
    """A random teacher of `hf`'s shapes (HF's own init) and its pruned student, both HF causal LMs with SDPA
    attention. Student layer i starts as a copy of the first teacher layer of block i (surgery.prune); embeddings,
    final norm and head are copied too. The student is float32 (master weights), the teacher `teacher_dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in hf.items() if k != "model_type"}
    blocks = default_plan(hf["num_hidden_layers"])
    tcfg = AutoConfig.for_model(hf["model_type"], **kw)
    scfg = AutoConfig.for_model(hf["model_type"], **dict(kw, num_hidden_layers=len(blocks)))
    torch.manual_seed(seed)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(tcfg, attn_implementation="sdpa", dtype=torch.float32)
        student = AutoModelForCausalLM.from_config(scfg, attn_implementation="sdpa", dtype=torch.float32)
    tstate = teacher.state_dict()
    sstate = {}
    for name in student.state_dict():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            sstate[name] = tstate[f"model.layers.{blocks[int(i)][0]}.{rest}"]
        else:
            sstate[name] = tstate[name]
    student.load_state_dict(sstate)
    if student.config.tie_word_embeddings:
        student.tie_weights()
    teacher = teacher.to(teacher_dtype).eval().requires_grad_(False)
    return teacher, student.train(), blocks


# ------------------------------------------------------------------------------------------------ the loss
def reference_loss(w: LossWeights, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                   targets: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """docs/METHOD.md section 2 on full [B, T, V] logits; float32 from the logits on. Hidden lists pair up
    element by element. Masked positions are excluded with torch.where (any target id there is fine)."""
    m = loss_mask.float()
    keep = m != 0
    denom = m.sum().clamp_min(1.0)
    zero = torch.zeros((), device=m.device)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, m * x, zero).sum() / denom

    zs = student_logits.float()
    ce = kl = cos_sum = zero
    if w.w_ce:
        safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
        nll = -torch.log_softmax(zs, dim=-1).gather(-1, safe[..., None])[..., 0]
        ce = masked_mean(nll)
    if w.w_kl:
        log_ps = torch.log_softmax(zs / w.tau, dim=-1)
        log_pt = torch.log_softmax(teacher_logits.float() / w.tau, dim=-1)
        per_pos = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        kl = masked_mean(per_pos)
    if w.w_cos and student_hidden:
        p = len(student_hidden)
        for hs, ht in zip(student_hidden, teacher_hidden):
            s, t = hs.float(), ht.float()
            cos = (s * t).sum(-1) / (s.norm(dim=-1).clamp_min(1e-8) * t.norm(dim=-1).clamp_min(1e-8))
            cos_sum = cos_sum + (w.w_cos / p) * masked_mean(1.0 - cos)
    total = w.w_ce * ce + w.w_kl * w.tau**2 * kl + cos_sum
    return total, dict(ce=float(ce.detach()), kl=float(kl.detach()), cos=float(cos_sum.detach()))


# ------------------------------------------------------------------------------------------------ the step
class ReferenceStep:
    """One distillation step per `step(batch)`: teacher forward (no grad), student forward + backward, clip,
    AdamW, schedule. `batch`: tokens, targets, positions [B, T] int and loss_mask [B, T] on the device; rows
    are single documents (plain causal attention, as HF's SDPA path runs it)."""

    def __init__(self, teacher, student, blocks: list[list[int]], *, bf16: bool,
                 weights: LossWeights = LossWeights(), optim: OptimSettings = OptimSettings()) -> None:
        self.teacher, self.student, self.weights, self.bf16 = teacher, student, weights, bf16
        pairs = aligned_pairs(blocks)
        self.s_idx, self.t_idx = [s for s, _ in pairs], [t for _, t in pairs]
        self.device_type = next(student.parameters()).device.type
        self.opt = torch.optim.AdamW(student.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                     weight_decay=optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(optim, s))
        self.clip = optim.clip_norm

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = dict(input_ids=batch["tokens"], position_ids=batch["positions"], output_hidden_states=True,
                      use_cache=False)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            with torch.no_grad():
                t = self.teacher(**inputs)
            s = self.student(**inputs)
            return reference_loss(self.weights, s.logits, t.logits, [s.hidden_states[i] for i in self.s_idx],
                                  [t.hidden_states[i] for i in self.t_idx], batch["targets"], batch["loss_mask"])

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        return loss.detach()


def random_batch(gen: torch.Generator, batch: int, seq: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """As benchmarks/step.py builds ours: random tokens, targets = tokens shifted left, the last position masked."""
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq)
    mask[:, -1] = 0.0
    b = dict(tokens=tokens, targets=torch.roll(tokens, -1, dims=1),
             positions=torch.arange(seq).expand(batch, seq).contiguous(), loss_mask=mask)
    return {k: v.to(device) for k, v in b.items()}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- the JAX check
def jax_loss(teacher, student, blocks: list[list[int]], batch: dict[str, torch.Tensor], w: LossWeights) -> float:
    """Our JAX distill_loss (float32) on the same weights and batch: both models saved with save_pretrained and
    read back with boomerang_jax.hf.load.load_hf, forwards by boomerang_jax.models.transformer.forward."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # an exact float32 check; leaves an accelerator to torch
    import jax.numpy as jnp
    import numpy as np

    from boomerang_jax.distill.loss import LossConfig, distill_loss
    from boomerang_jax.hf.load import load_hf
    from boomerang_jax.models.transformer import forward, head_kernel
    from boomerang_jax.surgery import LayerPlan

    plan = LayerPlan.from_knobs(len(teacher.model.layers), every=2, first=1, last=2)
    if [list(b) for b in plan.blocks] != blocks:
        raise AssertionError(f"plan mismatch: LayerPlan {plan.blocks} vs {blocks}")
    with tempfile.TemporaryDirectory() as d:
        teacher.float().save_pretrained(f"{d}/teacher")
        student.save_pretrained(f"{d}/student")
        tm, sm = load_hf(f"{d}/teacher"), load_hf(f"{d}/student")
    np_b = {k: jnp.asarray(v.cpu().numpy()) for k, v in batch.items()}
    seg = jnp.ones_like(np_b["tokens"])
    so = forward(sm.params, sm.config, np_b["tokens"], segment_ids=seg, positions=np_b["positions"],
                 hidden_indices=plan.student_hidden_indices(), return_logits=False)
    to = forward(tm.params, tm.config, np_b["tokens"], segment_ids=seg, positions=np_b["positions"],
                 hidden_indices=plan.teacher_hidden_indices(), return_logits=False)
    loss, _ = distill_loss(LossConfig(w_ce=w.w_ce, w_kl=w.w_kl, tau=w.tau, w_cos=w.w_cos, chunk=64),
                           student_final=so.final_hidden, student_head=head_kernel(sm.params, sm.config),
                           teacher_final=to.final_hidden, teacher_head=head_kernel(tm.params, tm.config),
                           targets=np_b["targets"], loss_mask=np_b["loss_mask"],
                           student_hidden=so.hidden_states, teacher_hidden=to.hidden_states)
    return float(np.asarray(loss))


def tiny_check(steps: int = 2, batch: int = 2, seq: int = 32) -> None:
    """CPU smoke test: the JAX-vs-torch loss check in float32, then `steps` bf16-autocast steps timed."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    teacher, student, blocks = build_models(TINY_QWEN3, "cpu", torch.float32)
    b = random_batch(gen, batch, seq, TINY_QWEN3["vocab_size"], "cpu")
    w = LossWeights()
    ref = ReferenceStep(teacher, student, blocks, bf16=False, weights=w)
    with torch.no_grad():
        t_loss, parts = ref.loss(b)
    t_loss = float(t_loss)
    j_loss = jax_loss(teacher, student, blocks, b, w)
    print(f"fp32 loss, same weights and batch: torch {t_loss:.6f} (ce {parts['ce']:.5f} kl {parts['kl']:.5f} "
          f"cos {parts['cos']:.5f})  jax {j_loss:.6f}  |diff| {abs(t_loss - j_loss):.2e}")
    ok = abs(t_loss - j_loss) <= 1e-4 * max(1.0, abs(t_loss))
    teacher = teacher.to(torch.bfloat16)
    ref = ReferenceStep(teacher, student, blocks, bf16=True, weights=w)
    for i in range(steps):
        t0 = time.perf_counter()
        loss = float(ref.step(random_batch(gen, batch, seq, TINY_QWEN3["vocab_size"], "cpu")))
        dt = time.perf_counter() - t0
        print(f"step {i}: loss {loss:.6f}  {batch * seq / dt:.1f} tokens/s (bf16 autocast, CPU)")
    if not ok:
        raise SystemExit("torch and JAX losses disagree beyond 1e-4")


# --------------------------------------------------------------------------------------------- benchmark
def bench(a: argparse.Namespace) -> dict:
    hf = presets()[a.preset]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = a.compute_dtype == "bf16"
    teacher, student, blocks = build_models(hf, dev, torch.bfloat16 if bf16 else torch.float32)
    ref = ReferenceStep(teacher, student, blocks, bf16=bf16)
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    b = random_batch(gen, a.batch, a.seq, hf["vocab_size"], dev)
    for _ in range(a.warmup):
        loss = ref.step(b)
    sync()
    times = []
    for _ in range(a.steps):
        b = random_batch(gen, a.batch, a.seq, hf["vocab_size"], dev)
        sync()
        t = time.perf_counter()
        loss = ref.step(b)
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(impl="torch-reference-style", device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                torch=torch.__version__, preset=a.preset, compute_dtype=a.compute_dtype, batch=a.batch, seq=a.seq,
                teacher_params=count(teacher), student_params=count(student), student_layers=len(blocks),
                step_s_median=med, step_times=times, tokens_per_s=a.batch * a.seq / med, loss=float(loss),
                peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: JAX-vs-torch loss check, then 2 steps")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--compute-dtype", default="bf16", choices=["bf16", "fp32"],
                    help="bf16: fp32 student under bf16 autocast, bf16 teacher; fp32: everything float32")
    a = ap.parse_args()
    if a.tiny:
        tiny_check()
        return
    if a.preset not in presets():
        sys.exit(f"unknown preset {a.preset!r}; one of {sorted(presets())}")
    print(json.dumps(bench(a)))


if __name__ == "__main__":
    main()

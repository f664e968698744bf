"""``redistill plan``: which student of a teacher's family fits an activation-memory budget (see docs/plan.md)."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="the students of a teacher's family that fit a peak-memory budget, RED blocks placed, ranked",
        description="Enumerate the student schedules of the teacher's family (strides moved earlier, total stride "
        "unchanged), place each one's RED blocks by the paper's rule, and size each: liveness peak with RED blocks "
        "(and in-place), peak without them, MACs, parameters (and with --latency the ONNX Runtime CPU latency). "
        "Prints the students within the budget ranked by MACs, marks the Pareto front of peak vs MACs, plots peak "
        "against MACs, and writes a preset of the first one that `redistill distill` runs. See docs/plan.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  redistill plan --teacher mobilenetv2-1-1222121 --image-size 128 --budget 1MiB\n"
        "  redistill plan --teacher mobilenetv3_small-1-22121111211 --budget 512KiB --inplace --out v3.yaml\n"
        "  redistill plan --teacher resnet18 --image-size 224 --budget 2MiB --latency\n"
        "budgets: bytes (1048576) or a number with B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024)",
    )
    p.add_argument("--teacher", required=True, metavar="ARCH",
                   help="the teacher's architecture, e.g. mobilenetv2-1-1222121 (a bare family: torchvision's schedule)")
    p.add_argument("--image-size", type=int, default=128, help="input size in px (default 128, the paper's)")
    p.add_argument("--budget", required=True, help="activation-memory budget, e.g. 1MiB, 1.5MB, 900KiB, 1048576")
    p.add_argument("--dtype", choices=["fp32", "fp16", "int8"], default=None,
                   help="cost every floating-point activation at this size (default: the exported FP32)")
    p.add_argument("--inplace", action="store_true",
                   help="hold the in-place peak to the budget (element-wise ops reuse a dying input's buffer), "
                   "not the liveness peak")
    p.add_argument("--batch", type=int, default=1, help="batch size the peaks are computed at (default 1)")
    p.add_argument("--top", type=int, default=10, help="how many fitting students to list (default 10)")
    p.add_argument("--latency", action="store_true",
                   help="also time the teacher and the listed students in ONNX Runtime on the CPU (batch 1, 1 thread)")
    p.add_argument("--out", default="plan.yaml", metavar="PLAN.yaml",
                   help="the preset written for the first student (default plan.yaml)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="peak vs MACs plot (default: PLAN.png beside --out)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write every candidate's figures (bytes)")
    p.add_argument("--exact", action="store_true",
                   help="export every student whole instead of patching one graph per structure (slow; the reference)")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from redistill.errors import UserError
    from redistill.io import atomic_write_json, atomic_write_text
    from redistill.memory import fmt_bytes
    from train.plan import (check_budget, format_plan, make_plan, measure_latency, parse_budget, plot_plan,
                            preset_yaml, red_blocks, verify)

    budget = parse_budget(args.budget)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    command = command_line(args)
    plan = make_plan(args.teacher, args.image_size, budget, batch=args.batch, dtype=args.dtype, inplace=args.inplace,
                     exact=args.exact)
    fit = check_budget(plan)
    chosen = fit[0]
    if args.latency:
        measure_latency(plan, fit[:args.top])
    print(format_plan(plan, args.top))
    exported = verify(plan, chosen)
    print(f"\nchosen: {chosen.arch} with {red_blocks(len(chosen.sites))}; exported with them it measures "
          f"{fmt_bytes(exported.peak_bytes)} (in-place {fmt_bytes(exported.inplace_peak_bytes)}), as `redistill memory` "
          f"does; sized in {plan.seconds:.1f} s ({plan.exports} whole-graph export{'s' * (plan.exports != 1)} for "
          f"{len(plan.candidates) + 1} networks)")
    out = Path(args.out)
    atomic_write_text(out, preset_yaml(plan, chosen, command))
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot_plan(plan, plot, chosen)
    print(f"wrote {out} (train it: redistill distill {shlex.quote(str(out))}), {plot}")
    if args.json:
        atomic_write_json(args.json, {"command": command, **plan.to_dict(), "chosen": chosen.arch})
        print(f"wrote {args.json}")
    return 0


def command_line(args) -> str:
    """The equivalent ``redistill plan ...`` invocation, rebuilt from the parsed arguments."""
    parts = ["redistill", "plan", "--teacher", args.teacher, "--image-size", str(args.image_size), "--budget", args.budget]
    if args.dtype:
        parts += ["--dtype", args.dtype]
    if args.batch != 1:
        parts += ["--batch", str(args.batch)]
    parts += [f"--{flag}" for flag in ("inplace", "latency", "exact") if getattr(args, flag)]
    if args.out != "plan.yaml":
        parts += ["--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)

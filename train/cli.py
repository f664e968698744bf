"""``redistill distill`` and ``redistill evaluate``."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing

from redistill.errors import UserError
from train import config as C


def _field_comments(cls) -> dict:
    """The ``# comment`` after each field in ``train/config.py``: the single place an option is explained."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _describe_keys() -> str:
    """Every config key with its default and meaning, generated from the typed config so the help never drifts."""
    lines = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        notes = _field_comments(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix + f.name:<22} {default!r:<16} {notes.get(f.name, '')}".rstrip())

    walk(C.RunConfig, "")
    return ("config keys (key=value overrides; default, then meaning; a name not registered fails listing the "
            "registered ones):\n" + "\n".join(lines))


def add_commands(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="train a teacher, then distill a student (KD, RED, RED+KD)",
        description=textwrap.fill(
            "Train the teacher (unless teacher.checkpoint is given), then the student with the configured method. "
            "CONFIG is a YAML file or a preset name (a file in train/configs/: " + ", ".join(C.presets())
            + "); key=value pairs override it, e.g. epochs=3 data.root=DIR.", 100),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_describe_keys() + "\n\nmulti-GPU / multi-process: torchrun --nproc_per_node=N -m redistill.cli distill CONFIG",
    )
    p.add_argument("config", nargs="?", help="YAML config file or preset name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=_distill)

    e = sub.add_parser("evaluate", help="top-1 accuracy (classifier) or denoising loss (denoiser) of a checkpoint",
                       description="Evaluate a checkpoint written by `redistill distill` on the test split: a classifier's "
                       "top-1 accuracy, or a denoiser's epsilon MSE (EMA weights) at time steps and noise fixed by "
                       "its diffusion.eval_seed.")
    e.add_argument("checkpoint")
    e.add_argument("--data-root", default=None, help="image folder (default: the one the checkpoint was trained on)")
    e.add_argument("--data-name", default=None,
                   help="data set name (default: the checkpoint's; an unknown name lists the known ones)")
    e.add_argument("--subset", type=int, default=0, help="evaluate on this many test images, class-balanced (0 = all)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    e.set_defaults(func=_evaluate)


def _distill(args) -> int:
    from train.trainer import run_distill

    overrides = list(args.overrides)
    config = args.config
    if config and "=" in config:  # only overrides were given
        overrides.insert(0, config)
        config = None
    cfg = C.load_config(config, overrides)
    summary = run_distill(cfg, resume=args.resume)
    _print_summary(summary)
    return 0


def _print_summary(summary) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    print("\n=== redistill distill: done ===")
    for role in ("teacher", "student"):
        s = summary.get(role)
        if not s:
            continue
        if s.get("reused"):
            print(f"{role:8s} {s['arch']}: reused {s['checkpoint']}")
            continue
        b = s["best"]
        if "test_top1" in b:
            print(f"{role:8s} {s['arch']} ({s['method']}): test top-1 {b['test_top1']:.2f}% "
                  f"(best epoch {b['epoch']}, by {s['picked_by']}; last epoch {s['last']['test_top1']:.2f}%)  -> {b['checkpoint']}")
        else:
            print(f"{role:8s} {s['arch']} ({s['method']}): test denoising loss {b['test_diffusion_loss']:.5f} (EMA, "
                  f"best epoch {b['epoch']}, by {s['picked_by']}; last epoch {s['last']['test_diffusion_loss']:.5f})  -> {b['checkpoint']}")
    mem = summary.get("memory")
    if mem:
        from redistill.memory import fmt_bytes

        print(f"theoretical peak activation memory ({mem['definition']}, {mem['image_size']} px): teacher "
              f"{fmt_bytes(mem['teacher_peak_bytes'])}, student {fmt_bytes(mem['student_peak_bytes'])}: "
              f"{mem['reduction']:.2f}x lower")
    print(f"run folder: {summary['run_dir']}")


def _evaluate(args) -> int:
    import json

    from redistill.io import atomic_write_json
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.data import load_data
    from train.tasks import evaluate
    from train.runtime import resolve_device

    if args.subset < 0:
        raise UserError(f"--subset {args.subset}: give 0 (the whole test split) or a positive image count")
    ck = load_checkpoint(args.checkpoint)
    saved = ck.get("config", {}).get("data", {})
    dcfg = C.DataConfig(name=args.data_name or saved.get("name", "imagefolder"),
                        root=args.data_root or saved.get("root", "data/cifar10"), image_size=ck["image_size"],
                        test_subset=args.subset, eval_batch_size=saved.get("eval_batch_size", 256))
    data = load_data(dcfg, mean=ck["mean"], std=ck["std"], need_train=False)
    if data.classes != ck["classes"]:
        raise UserError(f"the data's classes {data.classes} differ from the checkpoint's {ck['classes']}; point --data-root at the right set")
    device = resolve_device(args.device)
    model = model_from_checkpoint(ck).to(device)
    if ck.get("task") == "denoise":
        from train.diffusion import Diffusion
        from train.tasks import denoising_loss

        seed = ck.get("config", {}).get("diffusion", {}).get("eval_seed", C.DiffusionConfig.eval_seed)
        r = denoising_loss(model, Diffusion.make(**ck["diffusion"]), data.test, dcfg.eval_batch_size, device,
                           seed, conditional=ck["num_classes"] > 0)
        r = {"diffusion_loss": r["loss"], "n": r["n"], "weights": "EMA"}
    else:
        r = evaluate(model, data.test, dcfg.eval_batch_size, device)
    out = {"checkpoint": args.checkpoint, "arch": ck["arch"], "method": ck["method"], "data": data.source, **r}
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_json(args.json, out)
    return 0

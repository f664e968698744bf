"""``redistill export``: checkpoint -> bundle (the FP32 vs INT8 results file is ``redistill export-report``, in bench)."""

from __future__ import annotations

import argparse
import textwrap

from export.calibration import CALIBRATION
from export.targets import TARGETS, targets_with
from redistill.errors import UserError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the target list kept one per line."""


def add_commands(sub) -> None:
    targets = TARGETS.values()
    p = sub.add_parser(
        "export", help="fold, export, check and verify a checkpoint as an ONNX bundle (FP32 or INT8)",
        description=textwrap.fill(
            "Rebuild the student from CHECKPOINT, fold every BatchNorm, export ONNX with the legacy exporter, check it "
            "against the target's operator list, verify it in ONNX Runtime against PyTorch on real test images, "
            "quantize it to INT8 for an INT8 target, and write a bundle folder (model.onnx, reference/, "
            "manifest.json).", 100),
        formatter_class=_Formatter,
        epilog="targets (--target), each one runtime and one precision:\n"
        + "\n".join(f"  {t.summary()}" for t in targets),
    )
    p.add_argument("checkpoint", help="best.pt or last.pt written by `redistill distill`")
    p.add_argument("--out", default=None, help="bundle folder (default: bundles/RUN-fp32 or bundles/RUN-int8)")
    p.add_argument("--target", default="tx2", metavar="{" + ",".join(t.name for t in targets) + "}",
                   help="runtime and precision of the bundle (listed below)")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset, at most the target's")
    p.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)  # gone: the error names the INT8 targets
    p.add_argument("--calib-images", type=int, default=256, help="INT8 targets: training images used for calibration")
    p.add_argument("--calib-method", default="minmax", metavar="{" + ",".join(CALIBRATION) + "}",
                   help="INT8 targets: calibration method")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis instead of a static batch of 1")
    p.add_argument("--data-root", default=None, help="image folder (default: the one the checkpoint was trained on)")
    p.add_argument("--data-name", default=None,
                   help="data set name (default: the checkpoint's; an unknown name lists the known ones)")
    p.add_argument("--verify-images", type=int, default=64, help="test images on which ONNX Runtime must match PyTorch")
    p.add_argument("--reference-images", type=int, default=8, help="reference inputs/outputs stored for the device")
    p.add_argument("--eval-subset", type=int, default=0, help="test accuracy on this many images (0 = the whole test set)")
    p.add_argument("--tarball", action="store_true", help="also write DIR.tar.gz")
    p.add_argument("--name", default=None, help="bundle name in the manifest (default: the folder name)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from export.pipeline import ExportOptions, run_export

    if args.int8:
        raise UserError("--int8 is gone: the target says the precision; use --target "
                        + " or --target ".join(targets_with("int8")) + " instead")
    run_export(ExportOptions(
        checkpoint=args.checkpoint, out=args.out, target=args.target, opset=args.opset,
        dynamic_batch=args.dynamic_batch, data_root=args.data_root, data_name=args.data_name,
        calib_images=args.calib_images, calib_method=args.calib_method, verify_images=args.verify_images,
        reference_images=args.reference_images, eval_subset=args.eval_subset, tarball=args.tarball, name=args.name,
    ))
    return 0

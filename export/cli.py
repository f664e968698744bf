"""``redistill export``: checkpoint -> bundle (the FP32 vs INT8 results file is ``redistill export-report``, in bench)."""

from __future__ import annotations

import argparse
import textwrap

from export.calibration import (AUTO, AUTO_CALIB_SIZES, CALIBRATION, FALLBACK_CALIB_IMAGES, FALLBACK_METHOD,
                                method_choices)
from export.targets import TARGETS, targets_with
from redistill.errors import UserError


#: defaults shown in --help without importing the pipeline (which loads torch); tests check they match it
INT8_GOAL_MAX_DROP, INT8_MAX_FLOAT_NODES = 0.5, 8


def _count(flag: str, value: str, auto: bool = False) -> int:
    """An option's non-negative integer (``auto`` -> 0 where allowed), or a one-line error naming the option."""
    if auto and value == AUTO:
        return 0
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < (1 if auto else 0):
        raise UserError(f"{flag} {value!r}: give " + ("auto or " if auto else "") + ("a positive count" if auto
                        else "0 or a positive count"))
    return n


def _points(flag: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UserError(f"{flag} {value!r}: give a number of top-1 points, e.g. {INT8_GOAL_MAX_DROP}") from None


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
    int8 = p.add_argument_group(
        "INT8 targets", textwrap.fill(
            "Choices are judged by top-1 on the images the run held out for validation: on how many INT8 keeps "
            f"FP32's top-1, and the drop (classifiers; denoisers take {FALLBACK_METHOD} on {FALLBACK_CALIB_IMAGES} "
            "images, no node in float). The test split is measured once, at the end. Calibration images come from "
            "the run's training part.", 100))
    int8.add_argument("--calib-method", default=AUTO, metavar="{" + ",".join(method_choices()) + "}",
                      help="calibration method; auto: try each, keep the one that keeps FP32's top-1 on the most "
                           "validation images ("
                      + "; ".join(f"{n}: {CALIBRATION.get(n).about}" for n in CALIBRATION) + ")")
    int8.add_argument("--calib-images", default=AUTO, metavar="{auto,N}",
                      help="training images to calibrate on; auto: "
                           + " or ".join(str(n) for n in AUTO_CALIB_SIZES) + ", chosen with the method")
    int8.add_argument("--int8-max-drop", default=str(INT8_GOAL_MAX_DROP), metavar="POINTS",
                      help="goal: top-1 drop on validation, met when the drop plus one standard error is within "
                           "it; while it is not, the most sensitive nodes stay float")
    int8.add_argument("--int8-max-float-nodes", default=str(INT8_MAX_FLOAT_NODES), metavar="N",
                      help="at most this many nodes stay float (0: quantize every node, choose the calibration only)")
    int8.add_argument("--int8-qat-epochs", default="0", metavar="N",
                      help="when the goal is missed on validation after post-training quantization, fine-tune N "
                           "epochs with the INT8 rounding (QAT) and keep the INT8 graph closer to FP32 (default 0: off)")
    int8.add_argument("--int8-refine-scales", action=argparse.BooleanOptionalAction, default=True,
                      help="when the goal is missed after calibration, scale each activation's range by the factor "
                           "that brings the logits closest to FP32's on the calibration images, and keep that when it "
                           "keeps FP32's top-1 on more validation images (default: on)")
    int8.add_argument("--int8-val-images", default="0", metavar="N",
                      help="validation images the choices are judged on (0: every image the run held out, 2,500 "
                           "for a CIFAR-10 run at data.val_fraction 0.05)")
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
        calib_images=_count("--calib-images", args.calib_images, auto=True), calib_method=args.calib_method,
        int8_max_drop=_points("--int8-max-drop", args.int8_max_drop),
        int8_max_float_nodes=_count("--int8-max-float-nodes", args.int8_max_float_nodes),
        int8_val_images=_count("--int8-val-images", args.int8_val_images),
        int8_qat_epochs=_count("--int8-qat-epochs", args.int8_qat_epochs),
        int8_refine_scales=args.int8_refine_scales, verify_images=args.verify_images,
        reference_images=args.reference_images, eval_subset=args.eval_subset, tarball=args.tarball, name=args.name,
    ))
    return 0

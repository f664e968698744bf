"""``redistill export`` (checkpoint -> bundle) and ``redistill export-report`` (FP32 vs INT8 results file)."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    p = sub.add_parser(
        "export", help="fold, export, check and verify a checkpoint as an ONNX bundle (FP32 or INT8)",
        description="Rebuild the student from CHECKPOINT, fold every BatchNorm, export ONNX with the legacy exporter, "
        "check it against the target's operator list, verify it in ONNX Runtime against PyTorch on real test "
        "images, optionally quantize it to INT8, and write a bundle folder (model.onnx, reference/, manifest.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="best.pt or last.pt written by `redistill distill`")
    p.add_argument("--out", default=None, help="bundle folder (default: bundles/RUN-fp32 or bundles/RUN-int8)")
    p.add_argument("--target", default="tx2", help="tx2 (TensorRT 8.2) | orin (TensorRT 10) | cpu (ONNX Runtime)")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset, 11-13 for TensorRT targets")
    p.add_argument("--int8", action="store_true", help="post-training static INT8 (QDQ, symmetric; not for tx2)")
    p.add_argument("--calib-images", type=int, default=256, help="INT8: training images used for calibration")
    p.add_argument("--calib-method", default="minmax", help="INT8: minmax | entropy | percentile")
    p.add_argument("--dynamic-batch", action="store_true", help="dynamic batch axis instead of a static batch of 1")
    p.add_argument("--data-root", default=None, help="image folder (default: the one the checkpoint was trained on)")
    p.add_argument("--data-name", default=None, help="imagefolder | cifar10 | stl10 (default: the checkpoint's)")
    p.add_argument("--verify-images", type=int, default=64, help="test images on which ONNX Runtime must match PyTorch")
    p.add_argument("--reference-images", type=int, default=8, help="reference inputs/outputs stored for the device")
    p.add_argument("--eval-subset", type=int, default=0, help="test accuracy on this many images (0 = the whole test set)")
    p.add_argument("--tarball", action="store_true", help="also write DIR.tar.gz")
    p.add_argument("--name", default=None, help="bundle name in the manifest (default: the folder name)")
    p.set_defaults(func=_export)

    r = sub.add_parser(
        "export-report", help="FP32 vs INT8 top-1 and ONNX Runtime CPU latency of two bundles -> results file",
        description="Read the test accuracy from two bundles' manifests, time each model.onnx in ONNX Runtime on the "
        "CPU (batch 1, median of repeated runs) and write OUT.md and OUT.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("fp32", help="FP32 bundle folder")
    r.add_argument("int8", help="INT8 bundle folder")
    r.add_argument("--out", default="bench/results/export_quick", help="results path without extension")
    r.add_argument("--runs", type=int, default=300, help="timed runs per model")
    r.add_argument("--warmup", type=int, default=30, help="untimed runs first")
    r.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0 = its default)")
    r.set_defaults(func=_report)


def _export(args) -> int:
    from export.pipeline import ExportOptions, run_export

    run_export(ExportOptions(
        checkpoint=args.checkpoint, out=args.out, target=args.target, opset=args.opset, int8=args.int8,
        dynamic_batch=args.dynamic_batch, data_root=args.data_root, data_name=args.data_name,
        calib_images=args.calib_images, calib_method=args.calib_method, verify_images=args.verify_images,
        reference_images=args.reference_images, eval_subset=args.eval_subset, tarball=args.tarball, name=args.name,
    ))
    return 0


def _report(args) -> int:
    from export.report import write_report

    write_report(args.fp32, args.int8, args.out, runs=args.runs, warmup=args.warmup, threads=args.threads)
    return 0

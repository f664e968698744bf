"""FP32 vs INT8 results file: top-1 from two bundles' manifests, ONNX Runtime CPU latency measured here.

    python -m export.report BUNDLE_FP32 BUNDLE_INT8 [--out bench/results/export_quick]
    (the same as ``redistill export-report``)
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict

import numpy as np

from redistill.errors import UserError
from redistill.sysinfo import cpu_model


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return "python -m export.report" if name in ("report.py", "__main__.py") else name


def machine() -> Dict[str, Any]:
    import onnxruntime

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def latency(model_path: Path, runs: int, warmup: int, threads: int) -> Dict[str, Any]:
    """Median (and spread) of ``runs`` timed batch-1 inferences after ``warmup`` untimed ones, on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {}
    for inp in sess.get_inputs():  # every input: images N(0, 1), a denoiser's time step t in [0, 999], labels 0
        shape = [1 if not isinstance(d, int) else d for d in inp.shape]
        if inp.type == "tensor(int32)":
            feed[inp.name] = np.zeros(shape, np.int32)
        elif inp.name == "t":
            feed[inp.name] = rng.uniform(0, 999, shape).astype(np.float32)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p10_ms": times[len(times) // 10], "p90_ms": times[(9 * len(times)) // 10],
            "runs": runs, "warmup": warmup, "batch": 1, "threads": threads or "onnxruntime default",
            "provider": "CPUExecutionProvider"}


def write_report(fp32_dir, int8_dir, out, runs: int = 300, warmup: int = 30, threads: int = 1) -> Dict[str, Any]:
    """Verify both bundles, time them, and write ``out``.md and ``out``.json atomically."""
    from export.bundle import bundle_id, verify_bundle
    from redistill.io import atomic_write_json, atomic_write_text

    if runs < 1 or warmup < 0:
        raise UserError("--runs must be at least 1 and --warmup at least 0")
    rows = {}
    for want, d in (("fp32", fp32_dir), ("int8", int8_dir)):
        m = verify_bundle(d)
        if m.get("precision") != want:
            raise UserError(f"{d} is a {m.get('precision')} bundle, but the {want} position wants {want}; swap the arguments")
        rows[want] = {"bundle": str(d), "bundle_id": bundle_id(d), "manifest": m,
                      "latency": latency(Path(d) / m["onnx"]["file"], runs, warmup, threads)}
    f, q = rows["fp32"]["manifest"], rows["int8"]["manifest"]
    if f["model"].get("checkpoint", {}).get("sha256") != q["model"].get("checkpoint", {}).get("sha256"):
        raise UserError("the two bundles come from different checkpoints; export both from the same one")
    if f.get("task", "classify") != q.get("task", "classify"):
        raise UserError("the two bundles are of different tasks; export both from the same checkpoint")
    if f.get("task") == "denoise":
        result = _denoise_result(f, q, rows)
        atomic_write_json(Path(str(out) + ".json"), result)
        atomic_write_text(Path(str(out) + ".md"), render(result))
        print(render(result))
        return result
    acc = q["accuracy"]
    result = {
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "command": " ".join([_prog()] + sys.argv[1:]),
        "export_commands": {k: rows[k]["manifest"].get("command") for k in rows},
        "machine": machine(),
        "model": {k: f["model"][k] for k in ("arch", "method", "role", "image_size")},
        "checkpoint_sha256": f["model"].get("checkpoint", {}).get("sha256"),
        "data": acc.get("data"), "test_images": acc.get("images"), "full_test_set": not acc.get("subset"),
        "fp32": {"top1": f["accuracy"]["fp32_top1"], "bundle": rows["fp32"]["bundle"], "bundle_id": rows["fp32"]["bundle_id"],
                 "latency": rows["fp32"]["latency"]},
        "int8": {"top1": acc["int8_top1"], "bundle": rows["int8"]["bundle"], "bundle_id": rows["int8"]["bundle_id"],
                 "latency": rows["int8"]["latency"], "calibration": (q.get("quantization") or {}).get("calibration")},
        "drop_points": acc["drop"], "goal_max_drop": acc["goal_max_drop"], "goal_met": acc["goal_met"],
    }
    atomic_write_json(Path(str(out) + ".json"), result)
    atomic_write_text(Path(str(out) + ".md"), render(result))
    print(render(result))
    return result


def _denoise_result(f: Dict[str, Any], q: Dict[str, Any], rows: Dict[str, Any]) -> Dict[str, Any]:
    """A denoiser's FP32 vs INT8: denoising MSE on the export's noisy test images instead of top-1."""
    d = q.get("denoising") or {}
    return {
        "task": "denoise",
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "command": " ".join([_prog()] + sys.argv[1:]),
        "export_commands": {k: rows[k]["manifest"].get("command") for k in rows},
        "machine": machine(),
        "model": {k: f["model"][k] for k in ("arch", "method", "role", "image_size")},
        "checkpoint_sha256": f["model"].get("checkpoint", {}).get("sha256"),
        "data": d.get("data"), "samples": d.get("samples"), "timesteps": d.get("timesteps"),
        "pytorch_mse": d.get("pytorch_mse"),
        "fp32": {"mse": (f.get("denoising") or {}).get("fp32_onnx_mse"), "bundle": rows["fp32"]["bundle"],
                 "bundle_id": rows["fp32"]["bundle_id"], "latency": rows["fp32"]["latency"]},
        "int8": {"mse": d.get("int8_onnx_mse"), "max_abs_eps_diff": d.get("int8_max_abs_eps_diff"),
                 "bundle": rows["int8"]["bundle"], "bundle_id": rows["int8"]["bundle_id"],
                 "latency": rows["int8"]["latency"], "calibration": (q.get("quantization") or {}).get("calibration")},
        "mse_increase": d.get("int8_mse_increase"),
    }


def _header(r: Dict[str, Any], kind: str, data: str, unit: str) -> list:
    """The lines every export report opens with: title, provenance, machine, data and how latency was taken."""
    lat = r["fp32"]["latency"]
    return [
        f"# Export: FP32 vs INT8 {kind}({r['model']['arch']}, {r['model']['method']})", "",
        f"- created: {r['created']}",
        f"- command: `{r['command']}`",
        *[f"- export {k}: `{c}`" for k, c in r["export_commands"].items() if c],
        f"- machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['os']}, "
        f"Python {r['machine']['python']}, onnxruntime {r['machine']['onnxruntime']}",
        f"- data: {r['data']} ({data})",
        f"- latency: ONNX Runtime CPU, {unit}, median of {lat['runs']} runs after {lat['warmup']} warm-up, "
        f"intra-op threads {lat['threads']}", "",
    ]


def _render_denoise(r: Dict[str, Any]) -> str:
    f, q = r["fp32"], r["int8"]
    lines = _header(r, "denoiser ", f"{r['samples']} noisy test images, time steps {r['timesteps']}",
                    "one denoising step at batch 1") + [
        "| precision | denoising MSE | median latency (ms) | p10-p90 (ms) |",
        "|---|---|---|---|",
        f"| PyTorch | {r['pytorch_mse']:.5f} | - | - |",
    ]
    for name, row in (("FP32", f), ("INT8", q)):
        lat = row["latency"]
        lines.append(f"| {name} | {row['mse']:.5f} | {lat['median_ms']:.3f} | {lat['p10_ms']:.3f}-{lat['p90_ms']:.3f} |")
    lines += ["", f"INT8 denoising MSE change: {r['mse_increase']:+.5f}; max |eps difference| vs PyTorch "
                  f"{q['max_abs_eps_diff']:.3g}."]
    if q.get("calibration"):
        c = q["calibration"]
        lines.append(f"Calibration: {c['method']}, {c['images']} {c['split']} images, noised at random time steps.")
    return "\n".join(lines) + "\n"


def render(r: Dict[str, Any]) -> str:
    if r.get("task") == "denoise":
        return _render_denoise(r)
    f, q = r["fp32"], r["int8"]
    lines = _header(r, "", f"{r['test_images']} test images{'' if r['full_test_set'] else ', a SUBSET'}", "batch 1") + [
        "| precision | top-1 (%) | median latency (ms) | p10-p90 (ms) |",
        "|---|---|---|---|",
    ]
    for name, row in (("FP32", f), ("INT8", q)):
        lat = row["latency"]
        lines.append(f"| {name} | {row['top1']:.2f} | {lat['median_ms']:.3f} | {lat['p10_ms']:.3f}-{lat['p90_ms']:.3f} |")
    verdict = "met" if r["goal_met"] else "MISSED"
    lines += ["", f"INT8 drop: {r['drop_points']:+.2f} points (goal: at most {r['goal_max_drop']}; {verdict})."]
    if q.get("calibration"):
        c = q["calibration"]
        lines.append(f"Calibration: {c['method']}, {c['images']} {c['split']} images.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import argparse

    from export.cli import add_commands

    parser = argparse.ArgumentParser(prog="python -m export.report")
    sub = parser.add_subparsers(dest="command")
    add_commands(sub)
    args = parser.parse_args(["export-report", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as e:
        print(f"export.report: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""FP32 vs INT8 results file: top-1 (or denoising MSE) from two bundles' manifests, ONNX Runtime CPU latency measured here.

    redistill export-report BUNDLE_FP32 BUNDLE_INT8 [--out bench/results/export_quick]
    redistill export-report --pages-only --out bench/results/export_quick   # rewrite OUT.md from OUT.json
    (``python -m bench.export_report`` takes the same arguments)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from export.bundle import bundle_id, verify_bundle
from redistill import cli as redistill_cli
from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text
from redistill.report import machine, machine_line, md_table, timestamp


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return "python -m bench.export_report" if name in ("export_report.py", "__main__.py") else name


def _machine() -> Dict[str, Any]:
    import onnxruntime

    return machine(onnxruntime=onnxruntime.__version__)


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
    result = _denoise_result(f, q, rows) if f.get("task") == "denoise" else _classify_result(f, q, rows)
    write_pages(result, out)
    return result


def write_pages(result: Dict[str, Any], out) -> None:
    """``out``.json and ``out``.md of a result (atomic), and the page on stdout."""
    atomic_write_json(Path(str(out) + ".json"), result)
    atomic_write_text(Path(str(out) + ".md"), render(result))
    print(render(result))


def _common(f: Dict[str, Any], rows: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "created": timestamp(),
        "command": " ".join([_prog()] + sys.argv[1:]),
        "export_commands": {k: rows[k]["manifest"].get("command") for k in rows},
        "machine": _machine(),
        "model": {k: f["model"][k] for k in ("arch", "method", "role", "image_size")},
        "checkpoint_sha256": f["model"].get("checkpoint", {}).get("sha256"),
    }


def _classify_result(f: Dict[str, Any], q: Dict[str, Any], rows: Dict[str, Any]) -> Dict[str, Any]:
    """A classifier's FP32 vs INT8: test top-1 from the manifests."""
    acc = q["accuracy"]
    quant = q.get("quantization") or {}
    search = quant.get("search")
    extra: Dict[str, Any] = {}
    if search is not None:  # bundles exported before the INT8 search have none of this
        extra = {"validation": acc.get("validation"), "float_units": quant.get("float_units") or [],
                 "search": {"goal": search["goal"], "goal_met": search["goal_met"],
                            "calibrations": [t for t in search["trace"] if t["step"] == "calibration"],
                            "failed": search.get("failed") or [],
                            "refine_scales": search.get("refine_scales")}}
    return {
        **_common(f, rows),
        "data": acc.get("data"), "test_images": acc.get("images"), "full_test_set": not acc.get("subset"),
        "fp32": {"top1": f["accuracy"]["fp32_top1"], "bundle": rows["fp32"]["bundle"], "bundle_id": rows["fp32"]["bundle_id"],
                 "latency": rows["fp32"]["latency"]},
        "int8": {"top1": acc["int8_top1"], "bundle": rows["int8"]["bundle"], "bundle_id": rows["int8"]["bundle_id"],
                 "latency": rows["int8"]["latency"], "calibration": (q.get("quantization") or {}).get("calibration")},
        "drop_points": acc["drop"], "goal_max_drop": acc["goal_max_drop"], "goal_met": acc["goal_met"],
        **extra,
    }


def _denoise_result(f: Dict[str, Any], q: Dict[str, Any], rows: Dict[str, Any]) -> Dict[str, Any]:
    """A denoiser's FP32 vs INT8: denoising MSE on the export's noisy test images instead of top-1."""
    d = q.get("denoising") or {}
    return {
        "task": "denoise",
        **_common(f, rows),
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
        f"- machine: {machine_line(r['machine'])}",
        f"- data: {r['data']} ({data})",
        f"- latency: ONNX Runtime CPU, {unit}, median of {lat['runs']} runs after {lat['warmup']} warm-up, "
        f"intra-op threads {lat['threads']}", "",
    ]


def _render_denoise(r: Dict[str, Any]) -> str:
    f, q = r["fp32"], r["int8"]
    lines = _header(r, "denoiser ", f"{r['samples']} noisy test images, time steps {r['timesteps']}",
                    "one denoising step at batch 1")
    lines += md_table(["precision", "denoising MSE", "median latency (ms)", "p10-p90 (ms)"],
                      [["PyTorch", f"{r['pytorch_mse']:.5f}", "-", "-"]] + [
                          [name, f"{row['mse']:.5f}", f"{row['latency']['median_ms']:.3f}",
                           f"{row['latency']['p10_ms']:.3f}-{row['latency']['p90_ms']:.3f}"] for name, row in (("FP32", f), ("INT8", q))])
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
    lines = _header(r, "", f"{r['test_images']} test images{'' if r['full_test_set'] else ', a SUBSET'}", "batch 1")
    lines += md_table(["precision", "top-1 (%)", "median latency (ms)", "p10-p90 (ms)"],
                      [[name, f"{row['top1']:.2f}", f"{row['latency']['median_ms']:.3f}",
                        f"{row['latency']['p10_ms']:.3f}-{row['latency']['p90_ms']:.3f}"] for name, row in (("FP32", f), ("INT8", q))])
    verdict = "met" if r["goal_met"] else "MISSED"
    lines += ["", f"INT8 drop: {r['drop_points']:+.2f} points (goal: at most {r['goal_max_drop']}; {verdict})."]
    if q.get("calibration"):
        c = q["calibration"]
        lines.append(f"Calibration: {c['method']}, {c['images']} {c['split']} images.")
    if r.get("search"):
        lines += _search_lines(r)
    return "\n".join(lines) + "\n"


def _search_lines(r: Dict[str, Any]) -> List[str]:
    """How the INT8 settings were chosen on validation: the calibrations tried and the nodes kept in float."""
    v, s = r["validation"], r["search"]
    lines = ["", "## INT8 choices (made on validation, never on the test split)", "",
             f"- validation: {v['images']} images the run held out ({v['split']}); FP32 top-1 {v['fp32_top1']:.2f}%, "
             f"INT8 {v['int8_top1']:.2f}%, drop {v['drop']:+.2f} +- {v['drop_se']:.2f} points (goal: drop + 1 standard "
             f"error at most {s['goal']['max_val_drop']}; {'met' if s['goal_met'] else 'MISSED'})",
             f"- nodes kept in float: {sum(len(u['nodes']) for u in r['float_units'])} "
             f"(at most {s['goal']['max_float_nodes']})", ""]
    lines += md_table(["calibration", "training images", "validation top-1 (%)", "drop (points)",
                       "FP32 top-1 kept (%)", "chosen"],
                      [[t["method"], t["calib_images"], f"{t['val_top1']:.2f}",
                        f"{t['val_drop']:+.2f} +- {t['val_drop_se']:.2f}", f"{100 * t['agreement']:.2f}",
                        "yes" if t["chosen"] else ""] for t in s["calibrations"]])
    lines += ["", "The drop is +- one standard error; the calibration keeping FP32's top-1 on the most validation "
                  "images is chosen."]
    lines += [f"- {f['method']} on {f['calib_images']} images failed: {f['error']}" for f in s["failed"]]
    rs = s.get("refine_scales")
    if rs:
        vr = rs["validation"]
        lines += ["", f"Activation scales refined at the logits ({rs['changed']} ranges changed, {rs['images']} "
                      f"calibration images): FP32's top-1 kept on {100 * vr['agreement']:.2f}% of the validation "
                      f"images, drop {vr['val_drop']:+.2f} +- {vr['val_drop_se']:.2f}; "
                      f"{'kept' if rs['kept'] else 'not kept'}."]
    if r["float_units"]:
        lines += ["", "Nodes kept in float, in the order chosen (added noise: the quantization noise the unit adds, as "
                      "an SQNR; lower = more sensitive):", ""]
        lines += float_units_table(r["float_units"], "added noise (dB)", "validation drop before -> after")
    return lines


def float_units_table(units, noise_title: str, drop_title: str) -> List[str]:
    """The nodes an INT8 export kept in float, one row per unit, in the order chosen."""
    return md_table(["nodes", "op", noise_title, "FP32 top-1 kept (%) before -> after", drop_title],
                    [["<br>".join(f"`{n}`" for n in u["nodes"]), u["op_type"],
                      "-" if u["added_sqnr_db"] is None else f"{u['added_sqnr_db']:.1f}",
                      f"{100 * u['agreement_before']:.2f} -> {100 * u['agreement_after']:.2f}",
                      f"{u['val_drop_before']:+.2f} -> {u['val_drop_after']:+.2f}"] for u in units])


def rewrite_pages(out) -> Dict[str, Any]:
    """Rewrite ``out``.md from ``out``.json (measured earlier): nothing is timed again."""
    path = Path(str(out) + ".json")
    if not path.is_file():
        raise UserError(f"{path} not found: --pages-only rewrites the page of an earlier export-report")
    result = json.loads(path.read_text())
    write_pages(result, out)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m bench.export_report ARGS`` = ``redistill export-report ARGS``."""
    return redistill_cli.main(["export-report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

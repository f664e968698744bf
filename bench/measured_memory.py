"""Measured against theoretical peak memory of the paper pairs: eager allocator trace and ONNX Runtime per image.

    python -m bench.measured_memory [--sizes 32 128] [--presets ...] [--out bench/results/measured_memory]

For each paper pair (``train.config.paper_pairs``), size, and network (teacher, student, student+RED; untrained,
FP32, batch 1): the liveness / in-place / layer-wise peaks of the exported graph and the INT8 what-if
(``redistill.memory``), one traced eager forward pass (``train.eager_memory``), and the agent's ONNX Runtime
per-image slope (optimisations off and on) with its batch-1 resident-memory delta. Each network's record is
written to OUT.json as soon as it finishes, so a re-run skips what is done; ``--pages-only`` rewrites OUT.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnxruntime as ort
import torch

from export.bundle import write_bundle
from export.onnx_export import export_onnx, graph_io
from redistill.io import atomic_write_json, atomic_write_text
from redistill.memory import DEFINITION, fmt_bytes, manifest_entry
from redistill.report import add_page_options, machine, machine_line, md_table, remarks_section, timestamp
from train.config import paper_pairs
from train.design import analyze_model, pair_designs
from train.eager_memory import EAGER_DEFINITION, measure_eager
from train.fold import fold_batchnorm

LABELS = ("teacher", "student", "student+RED")
EAGER_BAND = (0.9, 1.3)  # target: eager activation peak / in-place liveness peak
ORT_MAX = 1.5  # target: ORT per-image slope within this factor of the liveness peak (either way)
REDUCTION_MIN = 4.5  # target: teacher / student+RED eager activation peak at REDUCTION_SIZE px
REDUCTION_SIZE = 128
AGENT_ARGS = ["--backend", "onnxruntime", "--ort-device", "cpu", "--slope-batches", "1,4,16,64", "--iters", "5",
              "--warmup", "1", "--mem-iters", "2", "--threads", "1"]
TOP_BLOCKS = 6


# --- measuring one network ---------------------------------------------------------------------------------

def make_bundle(model: torch.nn.Module, image_size: int, out: Path, name: str, count: int = 4) -> Path:
    """A dynamic-batch FP32 bundle of ``model`` (BatchNorm folded, legacy exporter, opset 13) the agent accepts."""
    folded = fold_batchnorm(model, image_size).eval()
    proto = export_onnx(folded, image_size, dynamic_batch=True)
    data = proto.SerializeToString()
    inp, outp = graph_io(proto)[0], graph_io(proto, outputs=True)[0]
    xs = np.random.default_rng(0).standard_normal((count, 3, image_size, image_size)).astype(np.float32)
    ys = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {inp["name"]: xs})[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.onnx")
        path.write_bytes(data)
        mem = manifest_entry(path)

    def npy(a):
        b = io.BytesIO()
        np.save(b, a.astype(np.float32))
        return b.getvalue()

    num_classes = int(ys.shape[1])
    manifest = {
        "name": name, "created": timestamp(),
        "model": {"arch": name, "method": "bench", "role": "student", "num_classes": num_classes,
                  "classes": [str(i) for i in range(num_classes)], "image_size": image_size},
        "input": {"name": inp["name"], "shape": ["batch", 3, image_size, image_size], "dtype": "float32",
                  "layout": "NCHW", "dynamic_batch": True},
        "output": {"name": outp["name"], "shape": ["batch", num_classes], "dtype": "float32"},
        "preprocess": {"mean": [0.0] * 3, "std": [1.0] * 3, "scale": 1.0},
        "precision": "fp32", "target": "cpu", "backend": "onnxruntime",
        "onnx": {"file": "model.onnx", "opset": 13, "ir_version": proto.ir_version, "producer": "pytorch"},
        "reference": {"inputs": "reference/inputs.npy", "outputs": "reference/outputs.npy", "count": count,
                      "atol": 1e-4},
        "memory": mem, "accuracy": None, "verification": None, "versions": {"torch": torch.__version__},
    }
    return write_bundle(out, {"model.onnx": data, "reference/inputs.npy": npy(xs), "reference/outputs.npy": npy(ys)},
                        manifest)


def run_agent(bundle: Path, work: Path) -> Dict[str, Any]:
    """The agent's JSON report for ``bundle`` (ONNX Runtime on the CPU, one thread), run as a user would."""
    report = work / "agent.json"
    env = dict(os.environ, REDISTILL_AGENT_LOCK=str(work / "agent.lock"))
    proc = subprocess.run([sys.executable, "-m", "deploy.agent", "--bundle", str(bundle), "--json-out", str(report),
                           *AGENT_ARGS], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"agent failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(report.read_text())


def ort_summary(report: Dict[str, Any]) -> Dict[str, Any]:
    """The per-image figures (optimisations off / on) and the batch-1 delta, as the agent reported them."""
    mem = report["memory"]
    out: Dict[str, Any] = {"per_image_skipped": mem.get("per_image", {}).get("skipped")}
    for f in mem.get("per_image", {}).get("figures", []):
        key = "off" if f["method"].endswith("_off") else "on"
        out[key] = {"method": f["method"], "bytes": f["bytes"], "resolution_bytes": f["resolution_bytes"],
                    "a_bytes": round(f["fit"]["a_bytes"]),
                    "max_abs_residual_bytes": round(f["fit"]["max_abs_residual_bytes"]),
                    "r2": f["fit"]["r2"], "points": [[p["batch"], p["bytes"]] for p in f["points"]],
                    "what": f["what"], "how": f["how"], "resolution_how": f["resolution_how"]}
    act = mem.get("activation") or {}
    out["batch1_delta"] = {"method": act.get("method"), "bytes": act.get("bytes"),
                           "resolution_bytes": act.get("resolution_bytes"), "what": act.get("what")}
    return out


def measure_network(model: torch.nn.Module, image_size: int, name: str, agent: bool = True) -> Dict[str, Any]:
    """Theory, eager trace and (with ``agent``) ONNX Runtime figures of one untrained network, batch 1."""
    t0 = time.perf_counter()
    rep = analyze_model(model, image_size, inplace=True)
    int8 = analyze_model(model, image_size, inplace=True, dtype="int8")
    theory = {"peak_bytes": rep.peak_bytes, "peak_node": rep.peak_node, "inplace_peak_bytes": rep.inplace_peak_bytes,
              "layerwise_peak_bytes": rep.layerwise_peak_bytes, "int8_peak_bytes": int8.peak_bytes,
              "int8_inplace_peak_bytes": int8.inplace_peak_bytes, "weights_bytes": rep.weights_bytes,
              "peak_explanation": rep.peak_explanation()}
    e = measure_eager(model, image_size, name=name)
    blocks = [{"where": b.where, "bytes": b.bytes} for b in e.at_activation_peak[:TOP_BLOCKS]]
    eager = {"peak_bytes": e.peak_bytes, "peak_op": e.peak_op, "activation_bytes": e.activation_bytes,
             "input_bytes": e.input_bytes, "scratch_bytes": e.scratch_bytes,
             "activation_peak_bytes": e.activation_peak_bytes, "activation_peak_op": e.activation_peak_op,
             "activation_blocks_at_peak": len(e.at_activation_peak), "top_activation_blocks": blocks,
             "max_scratch_bytes": e.max_scratch_bytes, "max_scratch_op": e.max_scratch_op,
             "scratch_at_peak": [[w, b] for w, b in e.by_op("scratch")[:3]], "threads": e.threads,
             "explain": e.explain(), "explain_activations": e.explain_activations(), "resolution": e.resolution}
    rec = {"theory": theory, "eager": eager}
    if agent:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = make_bundle(model, image_size, Path(tmp, name.replace("+", "_")), name)
            rec["ort"] = ort_summary(run_agent(bundle, Path(tmp)))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


# --- targets, from the records --------------------------------------------------------------------------

def _ratio(a, b) -> Optional[float]:
    return round(a / b, 2) if a is not None and b else None


def eager_target(rec) -> Dict[str, Any]:
    r = _ratio(rec["eager"]["activation_peak_bytes"], rec["theory"]["inplace_peak_bytes"])
    return {"ratio": r, "met": r is not None and EAGER_BAND[0] <= r <= EAGER_BAND[1]}


def ort_target(rec, key: str = "off") -> Dict[str, Any]:
    """ORT per image over liveness; unmet when outside [1/ORT_MAX, ORT_MAX] or not resolved (below resolution)."""
    f = (rec.get("ort") or {}).get(key)
    if not f:
        return {"ratio": None, "met": None, "resolved": None}
    r = _ratio(f["bytes"], rec["theory"]["peak_bytes"])
    resolved = f["bytes"] >= f["resolution_bytes"]
    return {"ratio": r, "ratio_resolution": _ratio(f["resolution_bytes"], rec["theory"]["peak_bytes"]),
            "resolved": resolved, "met": bool(resolved and 1 / ORT_MAX <= r <= ORT_MAX)}


def resolution_target(rec) -> bool:
    """Every measured figure carries its resolution (the page prints it beside each ratio)."""
    ort_ = rec.get("ort") or {}
    figs = [ort_.get(k) for k in ("off", "on", "batch1_delta") if ort_.get(k)]
    return bool(rec["eager"].get("resolution")) and all(f.get("resolution_bytes") is not None for f in figs)


def pair_reduction(doc, size: int, preset: str) -> Optional[float]:
    nets = doc["networks"]
    t, r = nets.get(f"{size}/{preset}/teacher"), nets.get(f"{size}/{preset}/student+RED")
    if not (t and r):
        return None
    return _ratio(t["eager"]["activation_peak_bytes"], r["eager"]["activation_peak_bytes"])


# --- the page --------------------------------------------------------------------------------------------

def _mark(met) -> str:
    return "-" if met is None else "met" if met else "**missed**"


def _ort_cell(rec, key: str) -> str:
    f = (rec.get("ort") or {}).get(key)
    if not f:
        return "-"
    t = ort_target(rec, key)
    res = fmt_bytes(f["resolution_bytes"])
    if not t["resolved"]:
        return f"{fmt_bytes(f['bytes'])} (below resolution {res}: no ratio)"
    return f"{fmt_bytes(f['bytes'])} = {t['ratio']}x ±{t['ratio_resolution']} (res. {res})"


def _delta_cell(rec) -> str:
    d = (rec.get("ort") or {}).get("batch1_delta") or {}
    if d.get("bytes") is None:
        return "-"
    r = _ratio(d["bytes"], rec["theory"]["peak_bytes"])
    res = d.get("resolution_bytes")
    if res and d["bytes"] < res:
        return f"{fmt_bytes(d['bytes'])} (below resolution {fmt_bytes(res)}: no ratio)"
    return f"{fmt_bytes(d['bytes'])} = {r}x (res. {fmt_bytes(res) if res else '?'})"


def _blocks(rec, top: int = 3) -> str:
    return ", ".join(f"{b['where']} {fmt_bytes(b['bytes'])}" for b in rec["eager"]["top_activation_blocks"][:top])


def _keys(doc, size):
    return [(p, lab) for p in doc["presets"] for lab in LABELS if f"{size}/{p}/{lab}" in doc["networks"]]


def explain_eager(rec) -> str:
    """Why eager activations differ from the in-place peak, from the blocks alive at the eager activation peak."""
    th, e = rec["theory"], rec["eager"]
    return (f"eager activations peak at {e['activation_peak_op']} with {fmt_bytes(e['activation_peak_bytes'])} in "
            f"{e['activation_blocks_at_peak']} blocks, largest {_blocks(rec)}; the in-place analysis peaks at "
            f"{fmt_bytes(th['inplace_peak_bytes'])} (liveness {fmt_bytes(th['peak_bytes'])}: "
            f"{th['peak_explanation']}).")


def explain_ort(rec, key: str) -> str:
    f = rec["ort"][key]
    pts = ", ".join(f"b{b}: {fmt_bytes(v)}" for b, v in f["points"])
    return (f"points {pts}; fit a = {fmt_bytes(f['a_bytes'])}, largest residual "
            f"{fmt_bytes(f['max_abs_residual_bytes'])}, r^2 {f['r2'] if f['r2'] is None else round(f['r2'], 4)}; "
            f"liveness {fmt_bytes(rec['theory']['peak_bytes'])} at "
            f"{rec['theory']['peak_node']}, in-place {fmt_bytes(rec['theory']['inplace_peak_bytes'])} "
            f"({_ratio(f['bytes'], rec['theory']['inplace_peak_bytes'])}x of it).")


def render_markdown(doc: Dict[str, Any], remarks: Optional[str] = None) -> str:
    """The page, from the ``.json`` record alone."""
    nets = doc["networks"]
    lines = ["# Measured against theoretical peak activation memory of the paper pairs", "",
             f"Command: `{doc['command']}`", "", f"Machine: {machine_line(doc['machine'])}.", "",
             "Untrained teacher, student and student+RED of each paper pair (`train.design.pair_designs`), FP32, "
             "batch 1 unless a column says otherwise; BatchNorm folded into its conv everywhere (as exported). "
             "Sizes in binary units (KiB = 2^10 B); exact bytes in the `.json` beside this page. Ratios are "
             "measured / theoretical; a per-image figure below its resolution gets no ratio.", "",
             "What each figure includes, and its resolution:", "",
             f"- **liveness / in-place / layer-wise / INT8 liveness**: theory of the exported ONNX graph "
             f"(`redistill memory`; INT8 = the same graph with 1-byte activations, a what-if). {DEFINITION}",
             f"- **eager act.**: the most activation bytes alive at once in one traced eager forward pass on the "
             f"CPU (input and scratch excluded); **scratch**: the largest scratch block of the pass and its op. "
             f"Resolution 1 byte. {EAGER_DEFINITION}",
             "- **ORT/img off, on**: ONNX Runtime's per-image slope b of peak resident memory over batch sizes "
             f"{doc['slope_batches']} (each a fresh process; graph optimisations off = the graph as exported, on = "
             "ONNX Runtime's real footprint), ± the ratio's resolution (the slope's resolution, from the page size "
             "and the fit's residuals, over liveness).",
             "- **ORT b1 delta**: batch-1 resident-memory delta over the loaded model (optimisations on), for "
             "contrast: its resolution is the measured spread of repeated deploys.", ""]
    for size in doc["sizes"]:
        keys = _keys(doc, size)
        if not keys:
            continue
        lines += [f"## {size} px", ""]
        rows = []
        for p, lab in keys:
            rec = nets[f"{size}/{p}/{lab}"]
            th, e = rec["theory"], rec["eager"]
            rows.append([f"{p} {lab}", fmt_bytes(th["peak_bytes"]), fmt_bytes(th["inplace_peak_bytes"]),
                         fmt_bytes(th["layerwise_peak_bytes"]), fmt_bytes(th["int8_peak_bytes"]),
                         fmt_bytes(e["activation_peak_bytes"]), f"{eager_target(rec)['ratio']}x",
                         f"{fmt_bytes(e['max_scratch_bytes'])} {e['max_scratch_op']}",
                         _ort_cell(rec, "off"), _ort_cell(rec, "on"), _delta_cell(rec)])
        lines += md_table(["network", "liveness", "in-place", "layer-wise", "INT8 liveness", "eager act.",
                           "eager / in-place", "largest scratch (op)", "ORT/img off (/ liveness)",
                           "ORT/img on (/ liveness)", "ORT b1 delta (/ liveness)"], rows)
        lines.append("")
    lines += [f"## Student+RED / teacher, eager activations ({REDUCTION_SIZE} px)", ""]
    rows = []
    for p in doc["presets"]:
        r = pair_reduction(doc, REDUCTION_SIZE, p)
        t = nets.get(f"{REDUCTION_SIZE}/{p}/teacher")
        s = nets.get(f"{REDUCTION_SIZE}/{p}/student+RED")
        if r is None:
            continue
        rows.append([p, fmt_bytes(t["eager"]["activation_peak_bytes"]), fmt_bytes(s["eager"]["activation_peak_bytes"]),
                     f"{r}x", f"{_ratio(t['theory']['peak_bytes'], s['theory']['peak_bytes'])}x",
                     _mark(r >= REDUCTION_MIN)])
    lines += md_table(["pair", "teacher eager act.", "student+RED eager act.", "reduction (eager)",
                       "reduction (liveness)", f">= {REDUCTION_MIN}x"], rows) if rows else ["(not measured)"]
    lines += ["", "## Targets", "",
              f"1. eager activations within {EAGER_BAND[0]}-{EAGER_BAND[1]}x of the in-place peak; "
              f"2. ORT per image (optimisations off) within {ORT_MAX}x of liveness either way and resolved "
              f"(optimisations on shown for reference); 3. student+RED >= {REDUCTION_MIN}x below its teacher "
              f"(eager, {REDUCTION_SIZE} px; per pair, in the table above); 4. every ratio shown with its "
              "measurement's resolution.", ""]
    rows = []
    for size in doc["sizes"]:
        for p, lab in _keys(doc, size):
            rec = nets[f"{size}/{p}/{lab}"]
            et, ot, on = eager_target(rec), ort_target(rec, "off"), ort_target(rec, "on")
            off = (rec.get("ort") or {}).get("off")
            rows.append([f"{size}", f"{p} {lab}", f"{_mark(et['met'])} ({et['ratio']}x)",
                         f"{_mark(ot['met'])} ({ot['ratio']}x)" if ot["met"] is not None else "-",
                         f"{_ratio(off['bytes'], rec['theory']['inplace_peak_bytes'])}x" if off else "-",
                         f"{_mark(on['met'])} ({on['ratio']}x)" if on["met"] is not None else "-",
                         _mark(resolution_target(rec))])
    lines += md_table(["px", "network", "1. eager / in-place", "2. ORT off / liveness", "(ORT off / in-place)",
                       "(ORT on / liveness)", "4. resolution shown"], rows)
    lines += ["", "## Large differences, from the bytes at the peak", "",
              "Each network whose eager or ORT ratio is outside its target band, or whose largest scratch block "
              "exceeds its in-place peak (scratch is reported apart from the activations, not in the ratio).", ""]
    for size in doc["sizes"]:
        for p, lab in _keys(doc, size):
            rec = nets[f"{size}/{p}/{lab}"]
            e = rec["eager"]
            notes = []
            if not eager_target(rec)["met"]:
                notes.append(f"eager {eager_target(rec)['ratio']}x: " + explain_eager(rec))
            if e["max_scratch_bytes"] > rec["theory"]["inplace_peak_bytes"]:  # scratch larger than the theory
                notes.append(f"scratch {fmt_bytes(e['max_scratch_bytes'])} in one block at {e['max_scratch_op']} "
                             f"({_ratio(e['max_scratch_bytes'], rec['theory']['inplace_peak_bytes'])}x the in-place "
                             f"peak; at the allocation peak: {e['explain']})")
            for key in ("off", "on"):
                t = ort_target(rec, key)
                if t["met"] is False:
                    notes.append(f"ORT {key} {t['ratio']}x" + ("" if t["resolved"] else " (not resolved)") + ": "
                                 + explain_ort(rec, key))
            if notes:
                lines.append(f"- **{size} px {p} {lab}**: " + " ".join(notes))
    lines += remarks_section(remarks)
    lines += ["", "## Runs", ""]
    lines += [f"- `{r['command']}` at {r['created']}: {r['networks']} networks in {r['seconds']} s"
              for r in doc["runs"]]
    lines.append("")
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.measured_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 32],
                        help="image sizes, in the order run (default: 128 then 32)")
    parser.add_argument("--presets", nargs="+", default=None, help="paper pairs (default: every paper pair)")
    parser.add_argument("--networks", nargs="+", choices=LABELS, default=list(LABELS))
    parser.add_argument("--no-agent", action="store_true", help="skip ONNX Runtime (theory and eager only)")
    parser.add_argument("--out", default="bench/results/measured_memory", help="OUT.json (state) and OUT.md")
    add_page_options(parser, "OUT.json")
    args = parser.parse_args(argv)
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    if args.pages_only:
        atomic_write_text(out_md, render_markdown(json.loads(out_json.read_text()), args.remarks))
        print(f"wrote {out_md}")
        return 0
    command = "python -m bench.measured_memory" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    presets = args.presets or paper_pairs()
    doc = json.loads(out_json.read_text()) if out_json.exists() else {
        "command": command, "machine": machine(), "slope_batches": AGENT_ARGS[AGENT_ARGS.index("--slope-batches") + 1],
        "agent_args": AGENT_ARGS, "sizes": [], "presets": [], "networks": {}, "runs": []}
    doc["sizes"] = sorted(set(doc["sizes"]) | set(args.sizes))
    doc["presets"] += [p for p in presets if p not in doc["presets"]]
    t0, done = time.perf_counter(), 0
    for size in args.sizes:
        for preset in presets:
            todo = [lab for lab in args.networks if f"{size}/{preset}/{lab}" not in doc["networks"]]
            if not todo:
                continue
            designs, _ = pair_designs(preset, size)
            for label, model in designs:
                if label not in todo:
                    continue
                print(f"{size} px {preset} {label} ...", flush=True)
                rec = measure_network(model, size, f"{preset}-{label}", agent=not args.no_agent)
                doc["networks"][f"{size}/{preset}/{label}"] = rec
                atomic_write_json(out_json, doc)
                done += 1
                print(f"  {rec['seconds']} s: eager {eager_target(rec)['ratio']}x in-place, "
                      f"ORT off {ort_target(rec)['ratio']}x liveness", flush=True)
    doc["runs"].append({"command": command, "created": timestamp(), "networks": done,
                        "seconds": round(time.perf_counter() - t0, 1)})
    atomic_write_json(out_json, doc)
    atomic_write_text(out_md, render_markdown(doc, args.remarks))
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

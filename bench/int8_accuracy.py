"""INT8 accuracy per network (issue 15): FP32 against INT8 three ways on the full test split, the nodes kept in
float and the validation figures that chose them; writes bench/results/int8_accuracy.{md,json}.

    python -m bench.int8_accuracy [CHECKPOINT ...] [--out bench/results/int8_accuracy] [--work bundles/int8_accuracy]
    python -m bench.int8_accuracy --pages-only [--remarks bench/results/int8_accuracy_remarks.md]

Each checkpoint is exported at ``--target orin-int8`` three times with ``export.pipeline.run_export``:
``search`` (the export's defaults: calibration method and size chosen on the run's held-out validation images,
then the most sensitive nodes kept in float until the validation drop is within the goal), ``calibrated`` (that
chosen calibration, every node INT8) and ``plain`` (minmax on 256 training images, every node INT8: the export
before the search). Each export measures FP32 and INT8 top-1 on the test split once, after its choices. One run
file per network (``OUT/NAME.json``) holds what the manifests say; a network whose run file matches its
checkpoint's sha256 is not exported again, so an interrupted run resumes. The page is made from the run files.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from bench.export_report import float_units_table
from export.pipeline import INT8_GOAL_MAX_DROP, ExportOptions, run_export
from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text, sha256_file
from redistill.report import add_page_options, machine, machine_line, md_table, remarks_section, timestamp

#: the quick student and the reproduction benchmark's RED students (bench/reproduce.py's runs)
CHECKPOINTS = ("runs/quick/student/best.pt", "runs/repro-red-s0/student/best.pt", "runs/repro-red-s1/student/best.pt",
               "runs/repro-red_kd-s0/student/best.pt", "runs/repro-red_kd-s1/student/best.pt")
#: the issue's target: INT8 top-1 at most this many points below FP32 on the full test split
TARGET_MAX_DROP = 0.5
TARGET = "orin-int8"
#: the three INT8 variants, in the order they are exported (the later two reuse the first one's choice)
VARIANTS = ("search", "calibrated", "plain")
PLAIN = {"calib_method": "minmax", "calib_images": 256, "int8_max_float_nodes": 0, "int8_refine_scales": False}


def network_name(checkpoint: Path) -> str:
    """``runs/quick/student/best.pt`` -> ``quick``: the run folder, which names the network on the page."""
    p = Path(checkpoint)
    return p.parent.parent.name if p.parent.name in ("student", "teacher") else p.stem


def _summary(m: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    """What the page needs of one INT8 manifest."""
    a, q = m["accuracy"], m["quantization"]
    search = q.get("search") or {}
    return {
        "command": m.get("command"), "seconds": round(seconds, 1),
        "test": {k: a[k] for k in ("data", "images", "subset", "fp32_top1", "int8_top1", "drop")},
        "validation": a.get("validation"), "calibration": q["calibration"],
        "float_nodes": q.get("float_nodes") or [], "float_units": q.get("float_units") or [],
        "search": {k: search[k] for k in ("goal", "goal_met", "candidates", "chosen", "trace", "failed", "refine_scales")
                   if k in search},
        "quantized_nodes": q.get("quantized_nodes"),
        **({"qat": q["qat"]} if q.get("qat") else {}),
    }


def search_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The search export's options (QAT only when asked for: records made before it have no such key)."""
    opts = dict(calib_method=args.calib_method, calib_images=args.calib_images,
                int8_max_float_nodes=args.int8_max_float_nodes, int8_refine_scales=True)
    return {**opts, "int8_qat_epochs": args.qat_epochs} if args.qat_epochs else opts


def measure(checkpoint: Path, work: Path, args: argparse.Namespace, say=print) -> Dict[str, Any]:
    """Export ``checkpoint`` in the three variants; the run record of one network."""
    name = network_name(checkpoint)
    common = dict(target=TARGET, eval_subset=args.eval_subset, int8_max_drop=args.int8_max_drop, quiet=args.quiet)
    exports: Dict[str, Any] = {}
    manifest: Dict[str, Any] = {}
    for variant in VARIANTS:
        if variant == "search":
            opts = search_options(args)
        elif variant == "calibrated":
            chosen = exports["search"]["calibration"]
            opts = dict(calib_method=chosen["method"], calib_images=chosen["images"], int8_max_float_nodes=0,
                        int8_refine_scales=False)
        else:
            opts = dict(PLAIN)
        say(f"[int8-accuracy] {name}: {variant} ({', '.join(f'{k}={v}' for k, v in opts.items())})")
        t0 = time.perf_counter()
        _, manifest = run_export(ExportOptions(str(checkpoint), out=str(work / f"{name}-{variant}"), **opts, **common))
        exports[variant] = _summary(manifest, time.perf_counter() - t0)
        exports[variant]["options"] = opts
    model = manifest["model"]
    return {"network": name, "checkpoint": str(checkpoint), "checkpoint_sha256": sha256_file(checkpoint),
            "arch": model["arch"], "method": model["method"], "red_blocks": model["red_blocks"],
            "target": TARGET, "target_max_drop": TARGET_MAX_DROP, "goal_max_val_drop": args.int8_max_drop,
            "created": timestamp(), "machine": machine(onnxruntime=manifest["versions"]["onnxruntime"]),
            "command": " ".join(["python -m bench.int8_accuracy"] + [shlex.quote(a) for a in args.argv]),
            "exports": exports}


def verdict(rec: Dict[str, Any]) -> Dict[str, Any]:
    """The target on the final (search) export: full test split and a drop within TARGET_MAX_DROP."""
    t = rec["exports"]["search"]["test"]
    full = not t["subset"]
    met = full and t["drop"] <= rec["target_max_drop"]
    why = "met" if met else ("not judged: a test SUBSET" if not full else "MISSED")
    return {"met": met, "full_test_split": full, "drop": t["drop"], "text": why}


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _drop(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _qat_cell(q: Optional[Dict[str, Any]]) -> str:
    """The summary table's QAT column: not run, or its epochs, whether its scales were learnt and what was kept."""
    if not q:
        return "-"
    if "not_run" in q:
        return "not run"
    learnt = "learnt scales" if (q.get("activation_scales") or {}).get("learnt") else "frozen scales"
    return f"{q['settings']['epochs']} ep, {learnt}, {'kept' if q['chosen'] else 'not kept'}"


def render(doc: Dict[str, Any], remarks: Optional[str] = None) -> str:
    """The page, from the page record (``collect``)."""
    nets = doc["networks"]
    lines = ["# INT8 accuracy: FP32 against INT8 per network", "",
             f"Target: INT8 top-1 at most {doc['target_max_drop']} points below FP32 on the full test split, with the "
             "nodes kept in float listed. Every INT8 choice is made on the run's held-out validation images; the "
             "test split is measured once per export, after its choices.", ""]
    for rec in nets:
        lines.append(f"- {rec['network']}: created {rec['created']}, `{rec['command']}`, "
                     f"machine: {machine_line(rec['machine'])}")
    lines += ["- exports: `redistill export CHECKPOINT --target orin-int8` (`search`: the defaults, which since "
              "2026-11-30 also try activation scales refined at the logits; `calibrated`: `--calib-method M "
              "--calib-images N --int8-max-float-nodes 0 --no-int8-refine-scales` with the M and N the search chose; "
              "`plain`: `--calib-method minmax --calib-images 256 --int8-max-float-nodes 0 --no-int8-refine-scales`, "
              "INT8 as exported before the search; a command's `--qat-epochs N` gives the search export "
              "`--int8-qat-epochs N`: quantization-aware fine-tuning where the search misses its validation goal, "
              "its activation scales learnt since 2026-12-01); top-1 by ONNX Runtime on the CPU, as the manifests "
              "record it", ""]
    rows = []
    for rec in nets:
        e, v = rec["exports"], verdict(rec)
        t = e["search"]["test"]
        rows.append([rec["network"], f"{rec['arch']} ({rec['method']})", t["images"], _pct(t["fp32_top1"]),
                     f"{_pct(e['plain']['test']['int8_top1'])} ({_drop(e['plain']['test']['drop'])})",
                     f"{_pct(e['calibrated']['test']['int8_top1'])} ({_drop(e['calibrated']['test']['drop'])})",
                     f"{_pct(t['int8_top1'])} ({_drop(t['drop'])})", len(e["search"]["float_nodes"]),
                     _qat_cell(e["search"].get("qat")), v["text"]])
    lines += md_table(["network", "student", "test images", "FP32 top-1 (%)", "INT8 plain minmax (drop)",
                       "INT8 chosen calibration (drop)", "INT8 search (drop)", "nodes in float", "QAT",
                       f"target (drop <= {doc['target_max_drop']})"], rows)
    met = sum(verdict(r)["met"] for r in nets)
    lines += ["", f"Target met for {met} of {len(nets)} networks. Drops are FP32 minus INT8 test top-1, in points; "
                  "each test figure has a resolution of one image (0.01 points on 10,000)."]
    for rec in nets:
        lines += _network_section(rec)
    lines += remarks_section(remarks)
    return "\n".join(lines) + "\n"


def _network_section(rec: Dict[str, Any]) -> List[str]:
    e = rec["exports"]
    s = e["search"]
    search = s["search"]
    v = s["validation"] or {}
    lines = ["", f"## {rec['network']}", "",
             f"- checkpoint: `{rec['checkpoint']}` (sha256 {rec['checkpoint_sha256'][:12]}), {rec['arch']}, "
             f"{rec['method']}, {rec['red_blocks']} RED blocks",
             f"- validation: {v.get('images', '-')} held-out images ({v.get('split', 'none recorded')})",
             f"- chosen: {s['calibration']['method']} on {s['calibration']['images']} training images, "
             f"{len(s['float_nodes'])} nodes in float (at most {search.get('goal', {}).get('max_float_nodes', '-')}); "
             f"validation goal: drop <= {rec['goal_max_val_drop']} "
             f"({'met' if search.get('goal_met') else 'MISSED'})", ""]
    rows = []
    for variant in ("plain", "calibrated", "search"):
        x = e[variant]
        val = x["validation"] or {}
        rows.append([variant, f"{x['calibration']['method']} / {x['calibration']['images']}", len(x["float_nodes"]),
                     _pct(val.get("int8_top1")), _drop(val.get("drop")), _pct(x["test"]["int8_top1"]),
                     _drop(x["test"]["drop"]), x["seconds"]])
    lines += md_table(["export", "calibration / images", "nodes in float", "val INT8 top-1 (%)", "val drop",
                       "test INT8 top-1 (%)", "test drop", "export time (s)"], rows)
    lines += ["", f"FP32 top-1: validation {_pct(v.get('fp32_top1'))}%, test {_pct(s['test']['fp32_top1'])}%. "
                  "Calibrations tried on validation:", ""]
    trials = [t for t in search.get("trace", []) if t["step"] == "calibration"]
    lines += md_table(["method", "training images", "val top-1 (%)", "val drop (+- 1 SE)", "FP32 top-1 kept (%)",
                       "logit SQNR (dB)", "chosen"],
                      [[t["method"], t["calib_images"], _pct(t["val_top1"]),
                        f"{_drop(t['val_drop'])} +- {t['val_drop_se']:.2f}",
                        f"{100 * t['agreement']:.2f}", "-" if t["logit_sqnr_db"] is None else f"{t['logit_sqnr_db']:.1f}",
                        "yes" if t["chosen"] else ""] for t in trials])
    lines += [f"- {f['method']} on {f['calib_images']} images failed: {f['error']}" for f in search.get("failed", [])]
    refined = [t for t in search.get("trace", []) if t["step"] == "refine scales"]
    if refined:
        t, r = refined[0], search.get("refine_scales") or {}  # older run files hold the trace only
        how = f" ({r['images']} calibration images, {r['changed']} ranges changed)" if r else ""
        lines += ["", f"Activation scales refined at the logits{how}: validation drop {_drop(t['val_drop'])} +- "
                      f"{t['val_drop_se']:.2f}, FP32's top-1 kept on {100 * t['agreement']:.2f}%, logit SQNR "
                      f"{'-' if t['logit_sqnr_db'] is None else format(t['logit_sqnr_db'], '.1f')} dB; "
                      f"{'kept' if t['chosen'] else 'not kept'}."]
    if s.get("qat"):
        q = s["qat"]
        if "not_run" in q:
            lines += ["", f"Quantization-aware fine-tuning was asked for but not run: {q['not_run']}."]
        else:
            cands = [("post-training", q["validation_ptq"]), ("QAT, calibrated again", q["validation_qat"])]
            if "validation_qat_trained_ranges" in q:  # the ranges the fine-tuning ended with (learnt)
                cands.insert(1, ("QAT, trained ranges", q["validation_qat_trained_ranges"]))
            elif "validation_qat_ranges_kept" in q:  # older records: frozen ranges; before that, two candidates
                cands.insert(1, ("QAT, ranges kept", q["validation_qat_ranges_kept"]))
            kept = q.get("kept", "QAT, calibrated again" if q["chosen"] else "post-training")
            lines += ["", f"Quantization-aware fine-tuning ({q['settings']['epochs']} epoch(s), "
                          f"{q['images_trained']:,} images, lr {q['settings']['lr']:g}, "
                          + (f"activation scales learnt (Adam {q['settings']['scale_lr']:g}; x"
                             f"{q['activation_scales']['factor_min']:.2f} to x{q['activation_scales']['factor_max']:.2f}"
                             "), " if (q.get("activation_scales") or {}).get("ranges") else "frozen activation scales, ")
                          + f"{q['seconds']:.0f} s, "
                          f"{q.get('emulation', 'conv/linear module')} emulation; KL from FP32 on {q['check_images']} validation "
                          f"images {q['kl_before']:.4f} -> {q['kl_after']:.4f}): FP32's top-1 kept on "
                          + ", ".join(f"{100 * c['agreement']:.2f}% ({name}, val drop {_drop(c['val_drop'])})"
                                      for name, c in cands)
                          + f" of the validation images; kept: {kept} (the search above is on "
                          f"{'the fine-tuned' if q['chosen'] else 'the original'} weights)."]
    tries = [t for t in search.get("trace", []) if t["step"] == "keep float"]
    if s["float_units"]:
        lines += ["", f"Nodes kept in float ({len(tries)} units tried, in order of the noise they add):", ""]
        lines += float_units_table(s["float_units"], "added noise (SQNR dB)", "val drop before -> after")
    elif tries:
        lines += ["", f"No node kept in float: none of the {len(tries)} units tried kept FP32's top-1 on more "
                      "validation images."]
    return lines


def collect(out: Path) -> Dict[str, Any]:
    """The page record: every run file in ``out``/ (the quick student first, then by name)."""
    files = sorted(out.glob("*.json"), key=lambda p: (p.stem != "quick", p.stem))
    if not files:
        raise UserError(f"no run files in {out}/: run python -m bench.int8_accuracy first")
    nets = [json.loads(p.read_text()) for p in files]
    return {"target_max_drop": TARGET_MAX_DROP, "target": TARGET,
            "met": sum(verdict(r)["met"] for r in nets), "networks": nets}


def write_pages(out: Path, remarks: Optional[str]) -> Dict[str, Any]:
    doc = collect(out)
    atomic_write_json(Path(f"{out}.json"), doc)
    atomic_write_text(Path(f"{out}.md"), render(doc, remarks))
    return doc


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m bench.int8_accuracy",
                                 description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("checkpoints", nargs="*", default=list(CHECKPOINTS), metavar="CHECKPOINT",
                    help="student checkpoints (default: the quick student and the reproduction RED students)")
    ap.add_argument("--out", default="bench/results/int8_accuracy",
                    help="OUT/ holds one run file per network, OUT.md and OUT.json the page")
    ap.add_argument("--work", default="bundles/int8_accuracy", help="where the bundles are written (not committed)")
    ap.add_argument("--calib-method", default="auto", help="the search export's (default: auto, as redistill export)")
    ap.add_argument("--calib-images", type=int, default=0, help="the search export's (0: auto)")
    ap.add_argument("--int8-max-float-nodes", type=int, default=8, help="the search export's cap")
    ap.add_argument("--int8-max-drop", type=float, default=INT8_GOAL_MAX_DROP, help="the validation goal")
    ap.add_argument("--qat-epochs", type=int, default=0,
                    help="the search export's --int8-qat-epochs: QAT epochs tried where the goal is missed (0: none)")
    ap.add_argument("--eval-subset", type=int, default=0, help="test images (0: the full split; the target needs it)")
    ap.add_argument("--again", action="store_true", help="export networks whose run file is current too")
    ap.add_argument("--quiet", action="store_true", help="no export progress")
    add_page_options(ap, "the run files in OUT/")
    args = ap.parse_args(argv)
    args.argv = argv
    out = Path(args.out)
    try:
        if not args.pages_only:
            missing = [c for c in args.checkpoints if not Path(c).is_file()]
            if missing:
                raise UserError(f"checkpoint {missing[0]} not found: train it first (runs/train_int8_students.sh "
                                "trains the defaults) or name the checkpoints to measure")
            out.mkdir(parents=True, exist_ok=True)
            for ck in map(Path, args.checkpoints):
                run_file = out / f"{network_name(ck)}.json"
                if run_file.is_file() and not args.again:
                    old = json.loads(run_file.read_text())
                    same = old.get("exports", {}).get("search", {}).get("options") == search_options(args)
                    if old.get("checkpoint_sha256") == sha256_file(ck) and same:
                        print(f"[int8-accuracy] {run_file} is current: kept (--again exports it anew)")
                        continue
                atomic_write_json(run_file, measure(ck, Path(args.work), args))
        doc = write_pages(out, args.remarks)
    except UserError as e:
        print(f"python -m bench.int8_accuracy: error: {e}", file=sys.stderr)
        return 2
    print(Path(f"{out}.md").read_text())
    print(f"wrote {out}.md and {out}.json ({doc['met']} of {len(doc['networks'])} networks meet the target)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

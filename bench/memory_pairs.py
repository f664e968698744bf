"""Regenerate bench/results/memory_paper_pairs.{md,json} and the MobileNetV2 x4 plot.

    python -m bench.memory_pairs [--image-size 128] [--out-dir bench/results]

The pairs are the presets in train/configs that are paper pairs (``train.config.paper_pairs``), so a
new pair is one preset file. For each, the teacher, the student without RED
and the student with its RED blocks are built untrained, exported to ONNX and analysed at batch 1,
FP32; the reductions are teacher / student figures.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from redistill.io import atomic_write_json, atomic_write_text
from redistill.memory import DEFINITION, fmt_bytes
from redistill.memory.plot import plot_reports
from redistill.report import add_page_options, machine, machine_line, md_table, remarks_section, timestamp
from train.config import paper_pairs
from train.design import analyze_model, pair_designs

TARGET = 4.5  # the acceptance: student+RED liveness reduction of at least this much

#: the paper's own estimator (fp32, batch 1, 128 px; MB as printed in the paper), teacher -> student, by preset
PAPER_MB = {
    "mobilenetv2_x4": (7.5, 0.51),
    "mobilenetv3_small_x4": (1.41, 0.31),
    "resnext18_x4": (5.0, 0.75),
}


def run_pair(preset: str, image_size: int, dtype: Optional[str] = None):
    """(cfg, {label: MemoryReport}) for a preset's teacher, student and student+RED."""
    designs, cfg = pair_designs(preset, image_size)
    reports = {label: analyze_model(m, image_size, dtype=dtype, inplace=True, name=label) for label, m in designs}
    return cfg, reports


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def pair_row(preset: str, cfg, reports) -> Dict[str, Any]:
    """The figures of one pair: peaks (liveness, in-place, layer-wise), reductions, the paper's figures, where the peaks are."""
    t, s, r = reports["teacher"], reports["student"], reports["student+RED"]
    row = {
        "preset": preset,
        "teacher_arch": cfg.teacher.arch,
        "student_arch": cfg.student.arch,
        "red_blocks": len(cfg.red.sites),
    }
    for key, rep in (("teacher", t), ("student", s), ("student_red", r)):
        row[f"{key}_peak_bytes"] = rep.peak_bytes
        row[f"{key}_peak_node"] = rep.peak_node
        row[f"{key}_inplace_peak_bytes"] = rep.inplace_peak_bytes
        row[f"{key}_layerwise_peak_bytes"] = rep.layerwise_peak_bytes
        row[f"{key}_weights_bytes"] = rep.weights_bytes
    row["reduction_student"] = _ratio(t.peak_bytes, s.peak_bytes)
    row["reduction_student_red"] = _ratio(t.peak_bytes, r.peak_bytes)
    row["reduction_student_red_inplace"] = _ratio(t.inplace_peak_bytes, r.inplace_peak_bytes)
    row["reduction_student_red_layerwise"] = _ratio(t.layerwise_peak_bytes, r.layerwise_peak_bytes)
    paper = PAPER_MB.get(preset)
    row["paper_teacher_mb"], row["paper_student_mb"] = paper if paper else (None, None)
    row["paper_reduction"] = _ratio(*paper) if paper else None
    row["meets_target"] = bool(row["reduction_student_red"] and row["reduction_student_red"] >= TARGET)
    row["student_red_peak_explanation"] = r.peak_explanation()
    row["teacher_peak_explanation"] = t.peak_explanation()
    return row


def render_markdown(doc: Dict[str, Any], remarks: Optional[str] = None) -> str:
    """The page, from the ``.json`` record alone (so ``--pages-only`` rewrites it without building anything)."""
    rows, image_size = doc["pairs"], doc["image_size"]
    lines = [
        "# Theoretical peak activation memory of the paper pairs",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {machine_line(doc['machine'])}.",
        "",
        "Untrained models built by name (`train/models.py`, `train.design.build_student`), exported with the "
        "legacy exporter (opset 13, BatchNorm folded), analysed by `redistill/memory/analysis.py`; "
        f"{image_size} px, {doc['dtype'].upper()}, batch {doc['batch']}. Rows: every preset for which "
        "`train.config.is_paper_pair` holds. Sizes in binary units "
        "(KiB = 2^10, MiB = 2^20 bytes); exact bytes in the `.json` beside this file.",
        "",
        "## Peaks",
        "",
    ]
    lines += md_table(
        ["pair", "teacher", "student (no RED)", "student+RED", "teacher in-place", "student+RED in-place",
         "teacher layer-wise", "student+RED layer-wise", "paper teacher / student (MB)"],
        [[f"{r['preset']} (`{r['teacher_arch']}` -> `{r['student_arch']}`, {r['red_blocks']} RED)",
          *(fmt_bytes(r[k]) for k in ("teacher_peak_bytes", "student_peak_bytes", "student_red_peak_bytes",
                                      "teacher_inplace_peak_bytes", "student_red_inplace_peak_bytes",
                                      "teacher_layerwise_peak_bytes", "student_red_layerwise_peak_bytes")),
          f"{r['paper_teacher_mb']} / {r['paper_student_mb']}" if r["paper_teacher_mb"] else "not published"]
         for r in rows])
    lines += ["", f"## Reduction factors (teacher / student; target for student+RED by liveness: >= {doc['target_reduction']}x)", ""]
    lines += md_table(
        ["pair", "student, liveness", "student+RED, liveness", "student+RED, in-place", "student+RED, layer-wise",
         "paper", "meets target"],
        [[r["preset"], f"{r['reduction_student']}x", f"**{r['reduction_student_red']}x**",
          f"{r['reduction_student_red_inplace']}x", f"{r['reduction_student_red_layerwise']}x",
          f"{r['paper_reduction']}x" if r["paper_reduction"] else "-", "yes" if r["meets_target"] else "NO"]
         for r in rows])
    lines += ["", "## Where each peak is", ""]
    for r in rows:
        lines.append(f"- **{r['preset']}** teacher: {r['teacher_peak_explanation']}")
        lines.append(f"  student+RED: {r['student_red_peak_explanation']}")
    short = [r for r in rows if not r["meets_target"]]
    if short:
        lines += ["", "## Pairs short of the target", ""]
        lines += [f"- **{r['preset']}**: {r['reduction_student_red']}x < {doc['target_reduction']}x. {_where(r)}" for r in short]
    lines += remarks_section(remarks)
    lines += ["", "## Definitions", "", DEFINITION, "",
              "The paper's figures are from its own per-architecture estimator, printed in MB; the layer-wise column "
              "applies the same rule (conv input + output + held tensors) generically to the exported graph.", ""]
    return "\n".join(lines)


def _where(r: Dict[str, Any]) -> str:
    """Where the student+RED peak sits against the plain student's and the teacher's (figures only)."""
    if r["student_red_peak_bytes"] > r["student_peak_bytes"]:
        return (f"The RED blocks raise the peak above the plain student's ({fmt_bytes(r['student_peak_bytes'])} at "
                f"{r['student_peak_node']}) to {fmt_bytes(r['student_red_peak_bytes'])} at {r['student_red_peak_node']}.")
    if r["teacher_peak_node"] == r["student_red_peak_node"]:
        return (f"Teacher and student+RED peak at the same node, {r['teacher_peak_node']}, where the student's live "
                f"set is {r['reduction_student_red']}x smaller.")
    return (f"The plain student peaks at {r['student_peak_node']} ({fmt_bytes(r['student_peak_bytes'])}), the "
            f"student+RED at {r['student_red_peak_node']} ({fmt_bytes(r['student_red_peak_bytes'])}).")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--presets", nargs="+", default=None,
                        help="presets to analyse (default: every paper pair in train/configs)")
    parser.add_argument("--plot-preset", default="mobilenetv2_x4", help="pair drawn to memory_<preset>.png ('' = none)")
    add_page_options(parser, "memory_paper_pairs.json")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if args.pages_only:
        doc = json.loads((out / "memory_paper_pairs.json").read_text())
        atomic_write_text(out / "memory_paper_pairs.md", render_markdown(doc, args.remarks))
        print(f"wrote {out / 'memory_paper_pairs.md'}")
        return 0
    command = "python -m bench.memory_pairs" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    rows = []
    all_reports = {}
    for preset in args.presets or paper_pairs():
        print(f"analysing {preset} ...", flush=True)
        cfg, reports = run_pair(preset, args.image_size)
        all_reports[preset] = reports
        rows.append(pair_row(preset, cfg, reports))
    doc = {"command": command, "created": timestamp(), "machine": machine(), "image_size": args.image_size, "batch": 1,
           "dtype": "fp32", "target_reduction": TARGET, "pairs": rows,
           "summaries": {p: {k: v.summary() for k, v in reps.items()} for p, reps in all_reports.items()}}
    md = render_markdown(doc, args.remarks)
    atomic_write_text(out / "memory_paper_pairs.md", md)
    atomic_write_json(out / "memory_paper_pairs.json", doc)
    if args.plot_preset and args.plot_preset in all_reports:
        reps = all_reports[args.plot_preset]
        cfg_row = next(r for r in rows if r["preset"] == args.plot_preset)
        plot_reports(list(reps.values()), out / f"memory_{args.plot_preset}.png",
                     labels=[f"teacher {cfg_row['teacher_arch']}", f"student {cfg_row['student_arch']}",
                             f"student+RED ({cfg_row['red_blocks']} blocks)"],
                     title=f"{args.plot_preset}: live activation memory per node ({args.image_size} px, FP32, batch 1)")
    print(md)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

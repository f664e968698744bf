"""Regenerate bench/results/memory_paper_pairs.{md,json} and the MobileNetV2 x4 plot.

    python -m bench.memory_pairs [--image-size 128] [--out-dir bench/results]

For each paper pair (a train/configs preset) the teacher, the student without
RED and the student with its RED blocks are built untrained, exported to ONNX
and analysed at batch 1, FP32; the reductions are teacher / student figures.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from redistill.io import atomic_write_json, atomic_write_text
from redistill.sysinfo import machine_line

PRESETS = ("mobilenetv2_x4", "mobilenetv2_x8", "mobilenetv3_small_x4", "resnext18_x4")
TARGET = 4.5  # the acceptance: student+RED liveness reduction of at least this much

#: the paper's own estimator (fp32, batch 1, 128 px; MB as printed in the paper), teacher -> x4 student
PAPER_MB = {
    "mobilenetv2_x4": (7.5, 0.51),
    "mobilenetv3_small_x4": (1.41, 0.31),
    "resnext18_x4": (5.0, 0.75),
}


def run_pair(preset: str, image_size: int, dtype: Optional[str] = None):
    """(cfg, {label: MemoryReport}) for a preset's teacher, student and student+RED."""
    from train.design import analyze_model, pair_designs

    designs, cfg = pair_designs(preset, image_size)
    reports = {label: analyze_model(m, image_size, dtype=dtype, inplace=True, name=label) for label, m in designs}
    return cfg, reports


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def pair_row(preset: str, cfg, reports) -> Dict[str, Any]:
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


def _mib(n) -> str:
    return "-" if n is None else f"{n / (1 << 20):.3f}"


def render_markdown(rows: List[Dict[str, Any]], command: str, image_size: int, where: str) -> str:
    from redistill.memory import DEFINITION

    lines = [
        "# Theoretical peak activation memory of the paper pairs",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {where}. Untrained models built by name (`train/models.py`, `train/trainer.build_student`), "
        f"exported with the legacy exporter (opset 13, BatchNorm folded), analysed by `redistill/memory/analysis.py`; "
        f"{image_size} px, FP32, batch 1. Sizes in MiB (2^20 bytes); exact bytes in the `.json` beside this file.",
        "",
        "## Peaks (MiB)",
        "",
        "| pair | teacher | student (no RED) | student+RED | teacher in-place | student+RED in-place "
        "| teacher layer-wise | student+RED layer-wise | paper teacher / student (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = f"{r['paper_teacher_mb']} / {r['paper_student_mb']}" if r["paper_teacher_mb"] else "not published"
        lines.append(
            f"| {r['preset']} (`{r['teacher_arch']}` -> `{r['student_arch']}`, {r['red_blocks']} RED) "
            f"| {_mib(r['teacher_peak_bytes'])} | {_mib(r['student_peak_bytes'])} | {_mib(r['student_red_peak_bytes'])} "
            f"| {_mib(r['teacher_inplace_peak_bytes'])} | {_mib(r['student_red_inplace_peak_bytes'])} "
            f"| {_mib(r['teacher_layerwise_peak_bytes'])} | {_mib(r['student_red_layerwise_peak_bytes'])} | {paper} |"
        )
    lines += [
        "",
        f"## Reduction factors (teacher / student; target for student+RED by liveness: >= {TARGET}x)",
        "",
        "| pair | student, liveness | student+RED, liveness | student+RED, in-place | student+RED, layer-wise "
        "| paper | meets target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['reduction_student']}x | **{r['reduction_student_red']}x** "
            f"| {r['reduction_student_red_inplace']}x | {r['reduction_student_red_layerwise']}x "
            f"| {str(r['paper_reduction']) + 'x' if r['paper_reduction'] else '-'} | {'yes' if r['meets_target'] else 'NO'} |"
        )
    lines += ["", "## Where each peak is", ""]
    for r in rows:
        lines.append(f"- **{r['preset']}** teacher: {r['teacher_peak_explanation']}")
        lines.append(f"  student+RED: {r['student_red_peak_explanation']}")
    short = [r for r in rows if not r["meets_target"]]
    if short:
        lines += ["", "## Pairs short of the target", ""]
        for r in short:
            lines.append(
                f"- **{r['preset']}**: {r['reduction_student_red']}x < {TARGET}x. The student+RED peak is set by "
                f"{r['student_red_peak_explanation']}. {_why(r)}"
            )
    lines += ["", "## Definitions", "", DEFINITION, "",
              "The paper's figures come from its own hand-written per-architecture estimator (REFERENCE.md section 1) "
              "and are printed in MB; the layer-wise column applies the same rule (conv input + output + held tensors) "
              "generically to the exported graph.", ""]
    return "\n".join(lines)


#: findings from reading the analysis, shown with a pair that falls short (not used to change anything)
NOTES = {
    "resnext18_x4": (
        "train/models.py builds resnext18 from torchvision's grouped Bottleneck (expansion 4, 32x4d), so layer1 "
        "outputs 256 channels at the resolution the teacher's maxpool already halved; the paper's figures "
        "(5.0 -> 0.75 MB) fit 64-channel layer1 outputs instead: `redistill memory --arch resnet18-1-21222 "
        "--inplace` gives 5.00 MiB (stem ReLU/maxpool, 4 + 1 MiB) and `--arch resnet18-4-11221` 0.75 MiB "
        "(3 x 256 KiB in layer1.0), a 6.7x reduction."
    ),
}


def _why(r: Dict[str, Any]) -> str:
    """A sentence on why the student+RED peak stays high, from where the peaks sit."""
    if r["student_red_peak_bytes"] > r["student_peak_bytes"]:
        why = ("The RED blocks raise the peak above the plain student's "
               f"({_mib(r['student_peak_bytes'])} MiB): a RED block keeps its input alive for the product while its "
               "convolutions run, so it holds several full-size maps at once.")
    elif r["teacher_peak_node"] == r["student_red_peak_node"]:
        why = (f"Teacher and student peak at the same node, where the student's maps are only "
               f"{r['reduction_student_red']}x smaller: the teacher has already downsampled before that node, so the "
               "student's more aggressive early pooling gains less there than at the stem.")
    else:
        why = (f"The plain student peaks at the same place ({_mib(r['student_peak_bytes'])} MiB at "
               f"{r['student_peak_node']}): once the first layers shrink, the peak moves to a later stage.")
    note = NOTES.get(r["preset"])
    return why + (" " + note if note else "")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--out-dir", default="bench/results")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--plot-preset", default="mobilenetv2_x4", help="pair drawn to memory_<preset>.png ('' = none)")
    args = parser.parse_args(argv)
    command = "python -m bench.memory_pairs" + "".join(
        f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    out = Path(args.out_dir)
    rows = []
    all_reports = {}
    for preset in args.presets:
        print(f"analysing {preset} ...", flush=True)
        cfg, reports = run_pair(preset, args.image_size)
        all_reports[preset] = reports
        rows.append(pair_row(preset, cfg, reports))
    where = machine_line()
    md = render_markdown(rows, command, args.image_size, where)
    atomic_write_text(out / "memory_paper_pairs.md", md)
    atomic_write_json(out / "memory_paper_pairs.json", {
        "command": command, "machine": where, "image_size": args.image_size, "batch": 1, "dtype": "fp32",
        "target_reduction": TARGET, "pairs": rows,
        "summaries": {p: {k: v.summary() for k, v in reps.items()} for p, reps in all_reports.items()},
    })
    if args.plot_preset and args.plot_preset in all_reports:
        from redistill.memory.plot import plot_reports

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

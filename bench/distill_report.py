"""Write ``bench/results/distill_<name>.md`` from a finished run's own files (summary.json, metrics.jsonl).

    python -m bench.distill_report runs/quick --command "make distill" --wall-s 812 --out bench/results/distill_quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text
from redistill.sysinfo import machine_line


def _history(stage_dir: Path) -> List[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: give the run folder of a finished `redistill distill` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_report(run_dir: Path, command: str, wall_s: Optional[float]) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {"run_dir": str(run_dir), "command": command, "wall_seconds": wall_s, "machine": machine_line(), "stages": {}}
    for role in ("teacher", "student"):
        s = summary.get(role)
        if not s or s.get("reused"):
            continue
        hist = _history(run_dir / role)
        speeds = [h["train_images_per_s"] for h in hist]
        out["stages"][role] = {
            "arch": s["arch"], "method": s["method"], "epochs": len(hist),
            "test_top1_best": s["best"]["test_top1"], "best_epoch": s["best"]["epoch"],
            "test_top1_last": s["last"]["test_top1"], "test_images": s["best"]["test_images"],
            "picked_by": s["picked_by"], "val_top1": [h.get("val_top1") for h in hist],
            "train_images_per_s_median": sorted(speeds)[len(speeds) // 2],
            "train_seconds": round(sum(h["train_time_s"] for h in hist), 1),
        }
    out["memory"] = summary.get("memory")
    return out


def copy_run_files(run_dir: Path, dest: Path, log: Optional[str]) -> str:
    """Copy the run's config, summaries and metrics (not its checkpoints) so the figures stay traceable."""
    import shutil

    for rel in ("config.yaml", "summary.json", "teacher/metrics.jsonl", "teacher/summary.json",
                "student/metrics.jsonl", "student/summary.json"):
        if (run_dir / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / rel, dest / rel)
    if log:
        atomic_write_text(dest / Path(log).name, clean_log(Path(log).read_text(errors="replace")))
    return str(dest)


def clean_log(text: str) -> str:
    """A console log without progress-bar redraws, library warnings and pip's download chatter."""
    keep = [ln for ln in text.replace("\r", "\n").splitlines()
            if ln.strip() and not ln.startswith(("Looking in", "Processing ", "  Downloading", "Requirement already", "    "))
            and "http" not in ln and "is ignored" not in ln and "Warn" not in ln and "warnings.warn" not in ln]
    return "\n".join(keep) + "\n"


def render(r: dict) -> str:
    t, s = r["stages"].get("teacher"), r["stages"].get("student")
    lines = ["# `make distill` default preset on this machine", "",
             f"Command: `{r['command']}` (from a fresh clone: creates `.venv`, unpacks the data, trains)", "",
             f"Machine: {r['machine']}", ""]
    if r["wall_seconds"] is not None:
        lines += [f"Wall time, set-up included: **{r['wall_seconds'] / 60:.1f} min** ({r['wall_seconds']:.0f} s)", ""]
    lines += ["| network | arch | method | epochs | test top-1 (best by val) | test top-1 (last) | images/s (train step) | train time |",
              "|---|---|---|---|---|---|---|---|"]
    for role, st in (("teacher", t), ("student", s)):
        if st:
            step = "teacher training" if role == "teacher" else "distillation step (student + frozen teacher forward)"
            lines.append(f"| {role} | `{st['arch']}` | {st['method']} | {st['epochs']} | {st['test_top1_best']:.2f} % "
                         f"(epoch {st['best_epoch']}) | {st['test_top1_last']:.2f} % | {st['train_images_per_s_median']:.0f} "
                         f"({step}) | {st['train_seconds']:.0f} s |")
    if r.get("memory"):
        m = r["memory"]
        lines += ["", f"Theoretical peak activation memory ({m['definition']}, {m['image_size']} px): teacher "
                  f"{m['teacher_peak_bytes'] / 1024:.1f} KiB, student+RED {m['student_peak_bytes'] / 1024:.1f} KiB, "
                  f"**{m['reduction']:.2f}x** lower."]
    n = (t or s)["test_images"]
    lines += ["", "## Reading", "",
              f"- Accuracies are on the full CIFAR-10 test split ({n} images) of the JPEG archive, which runs about a "
              "point below the PNG-exact CIFAR-10; the epoch is picked on a 5 % validation split of the training "
              "images, never on the test set.",
              "- The preset is sized for time, not accuracy: a few epochs at 32 px. It shows the pipeline works on "
              "real images and gives checkpoints for export; it is not a reproduction of the paper's accuracies "
              "(those need the paper recipes on a GPU).",
              "- images/s is the median over epochs of training images per second, data loading and augmentation included.",
              f"- Per-epoch figures: `{r['run_dir']}/{{teacher,student}}/metrics.jsonl`, committed with the run's "
              f"config and summaries (and the console log, when given) in `{r['copied_to']}/`; validation top-1 by epoch: "
              + "; ".join(f"{k} {v['val_top1']}" for k, v in r["stages"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--command", default="make distill")
    ap.add_argument("--wall-s", type=float, default=None, help="measured wall time of the command, seconds")
    ap.add_argument("--out", default="bench/results/distill_quick", help="output path without extension")
    ap.add_argument("--log", default=None, help="console log of the command, copied beside the results")
    a = ap.parse_args(argv)
    r = build_report(Path(a.run_dir), a.command, a.wall_s)
    r["copied_to"] = copy_run_files(Path(a.run_dir), Path(a.out + "_run"), a.log)
    atomic_write_json(a.out + ".json", r)
    atomic_write_text(a.out + ".md", render(r))
    print(render(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

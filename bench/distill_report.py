"""Write ``bench/results/distill_<name>.md`` from a finished run's own files (config, summary.json, metrics.jsonl).

    python -m bench.distill_report runs/quick --command "make distill" --wall-s 812 --out bench/results/distill_quick
    python -m bench.distill_report --pages-only --out bench/results/distill_quick   # rewrite from the committed copy

The run's config, summaries and metrics are copied to ``<out>_run/`` and the page is written from
that copy, so ``--pages-only`` rewrites it from the committed files alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Optional

import yaml

from redistill.errors import UserError
from redistill.io import atomic_copy, atomic_write_json, atomic_write_text
from redistill.memory import fmt_bytes
from redistill.report import add_page_options, machine, machine_line, md_table, remarks_section

RUN_FILES = ("config.yaml", "summary.json", "teacher/metrics.jsonl", "teacher/summary.json",
             "student/metrics.jsonl", "student/summary.json")


def _history(stage_dir: Path) -> List[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: give the run folder of a finished `redistill distill` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_report(run_dir: Path, command: str, wall_s: Optional[float], where=None) -> dict:
    """Every figure of the page, from the run folder's files; ``where`` is the machine record (default: this one)."""
    if not (run_dir / "summary.json").is_file():
        raise UserError(f"{run_dir}/summary.json not found: give the run folder of a finished `redistill distill` run")
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    data = cfg.get("data") or {}
    out = {"run_dir": str(run_dir), "command": command, "wall_seconds": wall_s,
           "machine": machine() if where is None else where, "stages": {},
           "data": {k: data.get(k) for k in ("name", "root", "image_size", "val_fraction", "test_subset")} if data else None}
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
    copied_run_files(run_dir, dest)
    if log:
        atomic_write_text(dest / Path(log).name, clean_log(Path(log).read_text(errors="replace")))
    return str(dest)


def copied_run_files(run_dir: Path, dest: Path) -> List[Path]:
    """Copy (atomically) each of ``RUN_FILES`` the run has to ``dest``; the paths written."""
    written = []
    for rel in RUN_FILES:
        if (run_dir / rel).is_file():
            written.append(atomic_copy(run_dir / rel, dest / rel))
    return written


def clean_log(text: str) -> str:
    """A console log without progress-bar redraws, library warnings and pip's download chatter."""
    keep = [ln for ln in text.replace("\r", "\n").splitlines()
            if ln.strip() and not ln.startswith(("Looking in", "Processing ", "  Downloading", "Requirement already", "    "))
            and "http" not in ln and "is ignored" not in ln and "Warn" not in ln and "warnings.warn" not in ln]
    return "\n".join(keep) + "\n"


def render(r: dict, remarks: Optional[str] = None) -> str:
    """The page from a ``build_report`` record (and the hand-written remarks, if any)."""
    t, s = r["stages"].get("teacher"), r["stages"].get("student")
    lines = [f"# Distillation run `{Path(r['run_dir']).name}`", "",
             f"Command: `{r['command']}`", "",
             f"Machine: {machine_line(r['machine'])}", ""]
    if r["wall_seconds"] is not None:
        lines += [f"Wall time of the command: **{r['wall_seconds'] / 60:.1f} min** ({r['wall_seconds']:.0f} s)", ""]
    step = {"teacher": "teacher training", "student": "distillation step (student + frozen teacher forward)"}
    lines += md_table(["network", "arch", "method", "epochs", "test top-1 (best by val)", "test top-1 (last)",
                       "images/s (train step)", "train time"],
                      [[role, f"`{st['arch']}`", st["method"], st["epochs"],
                        f"{st['test_top1_best']:.2f} % (epoch {st['best_epoch']})", f"{st['test_top1_last']:.2f} %",
                        f"{st['train_images_per_s_median']:.0f} ({step[role]})", f"{st['train_seconds']:.0f} s"]
                       for role, st in (("teacher", t), ("student", s)) if st])
    if r.get("memory"):
        m = r["memory"]
        lines += ["", f"Theoretical peak activation memory ({m['definition']}, {m['image_size']} px): teacher "
                  f"{fmt_bytes(m['teacher_peak_bytes'])}, student+RED {fmt_bytes(m['student_peak_bytes'])}, "
                  f"**{m['reduction']:.2f}x** lower."]
    st = t or s
    d = r.get("data")
    where = f" of `{d['root']}` ({d['name']}, {d['image_size']} px)" if d else ""
    whole = ", the whole test split" if d and not d.get("test_subset") else ""
    split = f"a {d['val_fraction']:.0%} validation split of the training images" if d else "the validation split"
    lines += ["", "## Reading", "",
              f"- Accuracies are on {st['test_images']} test images{where}{whole}; the epoch is picked by "
              + (f"{split}, never on the test set." if st["picked_by"] == "validation split" else f"{st['picked_by']}."),
              "- images/s is the median over epochs of training images per second, data loading and augmentation included.",
              f"- Per-epoch figures: `{r['run_dir']}/{{teacher,student}}/metrics.jsonl`, committed with the run's "
              f"config and summaries (and the console log, when given) in `{r['copied_to']}/`; validation top-1 by epoch: "
              + "; ".join(f"{k} {v['val_top1']}" for k, v in r["stages"].items()) + "."]
    lines += remarks_section(remarks)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="the run folder (not with --pages-only)")
    ap.add_argument("--command", default="make distill")
    ap.add_argument("--wall-s", type=float, default=None, help="measured wall time of the command, seconds")
    ap.add_argument("--out", default="bench/results/distill_quick", help="output path without extension")
    ap.add_argument("--log", default=None, help="console log of the command, copied beside the results")
    add_page_options(ap, "the copied run files in OUT_run/ (command, wall time and machine from OUT.json)")
    a = ap.parse_args(argv)
    copy = Path(a.out + "_run")
    if a.pages_only:
        if a.run_dir:
            raise UserError("--pages-only reads OUT_run/; give no run folder")
        old = json.loads(Path(a.out + ".json").read_text())
        r = build_report(copy, old["command"], old.get("wall_seconds"), old.get("machine"))
        r["run_dir"] = old["run_dir"]
    else:
        if not a.run_dir:
            raise UserError("give the run folder of a finished `redistill distill` run (or --pages-only)")
        copy_run_files(Path(a.run_dir), copy, a.log)
        r = build_report(copy, a.command, a.wall_s)
        r["run_dir"] = a.run_dir
    r["copied_to"] = str(copy)
    atomic_write_json(a.out + ".json", r)
    atomic_write_text(a.out + ".md", render(r, a.remarks))
    print(render(r, a.remarks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

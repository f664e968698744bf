"""`bench.distill_report`: the page of a finished distillation run, from the run's own files."""

import json

import pytest
import yaml

from bench.distill_report import main
from redistill.errors import UserError
from train.config import load_config


def _stage(d, arch, method, top1s, speeds):
    d.mkdir(parents=True)
    d.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "train_images_per_s": s, "train_time_s": 10.0, "val_top1": v}) + "\n"
        for i, (v, s) in enumerate(zip(top1s, speeds))))
    return {"arch": arch, "method": method, "picked_by": "validation split",
            "best": {"test_top1": 61.25, "epoch": 3, "test_images": 10000}, "last": {"test_top1": 60.5}}


def _run(run, val_fraction=0.05):
    summary = {"teacher": _stage(run / "teacher", "t-1-1", "teacher", [40, 50, 60], [500, 520, 510]),
               "student": _stage(run / "student", "s-4-1", "red", [30, 40, 45], [600, 640, 620]),
               "memory": {"teacher_peak_bytes": 196608, "student_peak_bytes": 49152, "reduction": 4.0,
                          "image_size": 32, "definition": "liveness"}}
    (run / "summary.json").write_text(json.dumps(summary))
    cfg = load_config("quick", [f"data.val_fraction={val_fraction}", "data.root=data/x"])
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def test_report_figures_come_from_the_run_files(tmp_path):
    run = tmp_path / "quick"
    _run(run)
    out = tmp_path / "res" / "distill_quick"
    assert main([str(run), "--wall-s", "720", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    assert "12.0 min" in md and "61.25 %" in md and "| 510 (teacher training)" in md and "| 620 (distillation step" in md
    assert "4.00x" in md and "192.00 KiB" in md and "48.00 KiB" in md
    assert "10000 test images of `data/x` (imagefolder, 32 px), the whole test split" in md
    assert "a 5% validation split of the training images" in md
    assert data["stages"]["student"]["train_seconds"] == 30.0 and data["wall_seconds"] == 720
    copied = tmp_path / "res" / "distill_quick_run"
    assert (copied / "student" / "metrics.jsonl").read_text() == (run / "student" / "metrics.jsonl").read_text()
    assert "distill_quick_run/" in md and "## Remarks" not in md


def test_pages_only_rewrites_from_the_copy(tmp_path):
    run = tmp_path / "quick"
    _run(run, val_fraction=0.1)
    out = tmp_path / "res" / "distill_quick"
    assert main([str(run), "--wall-s", "720", "--out", str(out), "--command", "make distill"]) == 0
    page = out.with_suffix(".md").read_text()
    assert "a 10% validation split" in page
    (tmp_path / "res" / "distill_quick_run" / "student" / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "train_images_per_s": 700, "train_time_s": 5.0, "val_top1": 44}) + "\n")
    remarks = tmp_path / "remarks.md"
    remarks.write_text("- Written by hand.\n")
    assert main(["--pages-only", "--out", str(out), "--remarks", str(remarks)]) == 0
    again = out.with_suffix(".md").read_text()
    assert "| 700 (distillation step" in again and "| 5 s |" in again  # from the copy, not from the run folder
    assert "Command: `make distill`" in again and "12.0 min" in again and "`quick/{teacher,student}" not in again
    assert f"`{run}/{{teacher,student}}/metrics.jsonl`" in again and "- Written by hand." in again
    with pytest.raises(UserError, match="give no run folder"):
        main([str(run), "--pages-only", "--out", str(out)])

import json

from bench.distill_report import main


def _stage(d, arch, method, top1s, speeds):
    d.mkdir(parents=True)
    d.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "train_images_per_s": s, "train_time_s": 10.0, "val_top1": v}) + "\n"
        for i, (v, s) in enumerate(zip(top1s, speeds))))
    return {"arch": arch, "method": method, "picked_by": "validation split",
            "best": {"test_top1": 61.25, "epoch": 3, "test_images": 10000}, "last": {"test_top1": 60.5}}


def test_report_figures_come_from_the_run_files(tmp_path):
    run = tmp_path / "quick"
    summary = {"teacher": _stage(run / "teacher", "t-1-1", "teacher", [40, 50, 60], [500, 520, 510]),
               "student": _stage(run / "student", "s-4-1", "red", [30, 40, 45], [600, 640, 620]),
               "memory": {"teacher_peak_bytes": 196608, "student_peak_bytes": 49152, "reduction": 4.0,
                          "image_size": 32, "definition": "liveness"}}
    (run / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "res" / "distill_quick"
    assert main([str(run), "--wall-s", "720", "--out", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    assert "12.0 min" in md and "61.25 %" in md and "| 510 (teacher training)" in md and "| 620 (distillation step" in md
    assert "4.00x" in md and "192.0 KiB" in md
    assert data["stages"]["student"]["train_seconds"] == 30.0 and data["wall_seconds"] == 720
    copied = tmp_path / "res" / "distill_quick_run"
    assert (copied / "student" / "metrics.jsonl").read_text() == (run / "student" / "metrics.jsonl").read_text()
    assert "distill_quick_run/" in md

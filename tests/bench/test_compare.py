"""`redistill compare` on small generated runs, bundles and device reports written to the real schemas."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from redistill.cli import main
from redistill.io import atomic_write_json, atomic_write_text

T_ARCH, S_ARCH = "tinyteacher-1-22", "tinystudent-4-11"


def _tiny_onnx(path: Path, channels: int, stride: int) -> None:
    import warnings

    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, channels, 3, stride, 1), nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, 16, 16), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"])


def _stage(role, arch, method, top1):
    best = {"checkpoint": f"runs/x/{role}/best.pt", "epoch": 3, "test_top1": top1, "test_loss": 1.0, "test_images": 100}
    return {"role": role, "best": best, "arch": arch, "method": method, "images_per_s": 100.0,
            "last": dict(best), "picked_by": "validation split"}


def _run(root: Path, name: str, method: str, seed: int, teacher_top1=None, student_top1=None, reused=False):
    d = root / name
    summary = {"name": name, "method": method, "run_dir": f"runs/{name}"}
    if reused:
        summary["teacher"] = {"checkpoint": "runs/r0/teacher/best.pt", "arch": T_ARCH, "reused": True}
    elif teacher_top1 is not None:
        summary["teacher"] = _stage("teacher", T_ARCH, "teacher", teacher_top1)
    if student_top1 is not None:
        summary["student"] = _stage("student", S_ARCH, method, student_top1)
    atomic_write_json(d / "summary.json", summary)
    atomic_write_text(d / "config.yaml", f"name: {name}\nmethod: {method}\nseed: {seed}\nteacher:\n  arch: {T_ARCH}\n"
                                         f"student:\n  arch: {S_ARCH}\ndata:\n  image_size: 16\n")


def _bundle(root: Path, name: str, arch: str, method: str, precision: str, memory: dict, acc: dict, onnx=None):
    from export.bundle import bundle_id

    d = root / name
    d.mkdir(parents=True)
    if onnx:
        _tiny_onnx(d / "model.onnx", *onnx)
    manifest = {"schema": "redistill-bundle", "schema_version": 1, "name": name, "created": "2025-01-01T00:00:00Z",
                "model": {"arch": arch, "method": method, "role": "teacher" if method == "teacher" else "student",
                          "num_classes": 10, "image_size": 16, "red_blocks": 0,
                          "checkpoint": {"file": "best.pt", "sha256": "0" * 64, "epoch": 3}},
                "precision": precision, "target": "orin", "onnx": {"file": "model.onnx", "opset": 13},
                "accuracy": acc, "memory": memory, "files": {}}
    atomic_write_json(d / "manifest.json", manifest)
    return manifest, bundle_id(d)


def _report(root: Path, host: str, bundle: str, bid: str, manifest: dict, stamp: str, act: int, p50: float):
    report = {"schema": "redistill-device-report", "schema_version": 1, "created": stamp,
              "bundle": {"id": bid, "name": bundle, "precision": manifest["precision"], "model": manifest["model"]},
              "device": {"model": "NVIDIA Jetson TX2", "machine": "aarch64"},
              "backend": {"name": "tensorrt", "precision": "fp16"},
              "output_check": {"passed": True, "max_abs_diff": 1e-3, "top1_agreement": 1.0},
              "latency": {"mean_ms": p50, "p50_ms": p50, "p90_ms": p50 * 1.1, "p99_ms": p50 * 1.5},
              "memory": {"activation": {"bytes": act}, "process_peak": {"bytes": 300 << 20},
                         "theoretical_peak": {"bytes": manifest["memory"]["peak_bytes"]}},
              "deploy": {"host": host, "bundle_id": bid, "server_time": stamp}}
    atomic_write_json(root / host / bundle / f"{stamp}.json", report)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    runs, bundles, reports = root / "runs", root / "bundles", root / "reports"
    _run(runs, "red_s0", "red", 0, teacher_top1=80.0, student_top1=70.0)
    _run(runs, "red_s1", "red", 1, teacher_top1=82.0, student_top1=73.0)
    _run(runs, "alone_s0", "student", 0, student_top1=60.0)
    _run(runs, "kd_s0", "kd", 0, student_top1=65.0, reused=True)
    tm, tid = _bundle(bundles, "teacher-fp32", T_ARCH, "teacher", "fp32",
                      {"peak_bytes": 40960, "inplace_peak_bytes": 32768, "layerwise_peak_bytes": 30720},
                      {"fp32_top1": 80.5}, onnx=(16, 1))
    rm, rid = _bundle(bundles, "red-fp32", S_ARCH, "red", "fp32",
                      {"peak_bytes": 4096, "inplace_peak_bytes": 3072, "layerwise_peak_bytes": 2048},
                      {"fp32_top1": 70.1}, onnx=(16, 4))
    _bundle(bundles, "red-int8", S_ARCH, "red", "int8", {"peak_bytes": 5000}, {"fp32_top1": 70.1, "int8_top1": 69.6})
    _report(reports, "tx2", "red-fp32", rid, rm, "20250101T000000Z", act=999999, p50=9.0)  # older: ignored
    _report(reports, "tx2", "red-fp32", rid, rm, "20250102T000000Z", act=10240, p50=2.0)
    _report(reports, "tx2", "teacher-fp32", tid, tm, "20250102T000000Z", act=81920, p50=5.0)
    out = root / "out"
    rc = main(["compare", "--runs", str(runs), "--bundles", str(bundles), "--reports", str(reports), "--out", str(out)])
    assert rc == 0
    return root, out


def _model(doc, method):
    return next(m for m in doc["models"] if m["method"] == method)


def test_outputs_exist(project):
    _, out = project
    for name in ("compare.md", "compare.csv", "compare.json", "memory_theory_vs_measured.png",
                 "accuracy_vs_peak_memory.png", "footprint_teacher_vs_student_red.png"):
        p = out / name
        assert p.is_file() and p.stat().st_size > 0, name
    assert (out / "footprint_teacher_vs_student_red.png").read_bytes()[:4] == b"\x89PNG"


def test_figures_match_inputs(project):
    _, out = project
    doc = json.loads((out / "compare.json").read_text())
    t = _model(doc, "teacher")
    assert t["top1"]["n"] == 2 and t["top1"]["mean"] == pytest.approx(81.0)
    assert t["top1"]["std"] == pytest.approx(statistics.stdev([80.0, 82.0]))
    assert (t["top1"]["min"], t["top1"]["max"]) == (80.0, 82.0)
    red = _model(doc, "red")
    assert red["top1"]["mean"] == pytest.approx(71.5) and red["top1"]["n"] == 2
    assert red["theory"] == {"peak_bytes": 4096, "inplace_peak_bytes": 3072, "layerwise_peak_bytes": 2048}
    assert red["onnx_int8_top1"] == 69.6
    (dep,) = red["deployments"]  # the newest report only
    assert dep["activation_bytes"] == 10240 and dep["latency_p50_ms"] == 2.0
    assert dep["ratio_measured_theoretical"] == pytest.approx(10240 / 4096)
    pair = next(p for p in doc["pairs"] if p["method"] == "red")
    assert pair["gap"] == pytest.approx(21.0)
    assert pair["recovered"] == pytest.approx((71.5 - 60.0) / 21.0)
    assert pair["theory_ratio"] == pytest.approx(10.0)
    (meas,) = pair["measured"]
    assert meas["activation_ratio"] == pytest.approx(8.0) and meas["latency_p50_ratio"] == pytest.approx(2.5)
    assert "2.50x" in (out / "compare.md").read_text()


def test_missing_report_gives_empty_cells_with_note(project):
    _, out = project
    doc = json.loads((out / "compare.json").read_text())
    kd = _model(doc, "kd")
    assert kd["deployments"] == [] and any("not deployed" in n for n in kd["notes"])
    rows = list(csv.DictReader((out / "compare.csv").open()))
    kd_row = next(r for r in rows if r["kind"] == "model" and r["method"] == "kd")
    assert kd_row["top1"] == "65.0" and kd_row["activation_bytes"] == "" and kd_row["latency_p50_ms"] == ""
    assert "not deployed" in kd_row["notes"]
    red_row = next(r for r in rows if r["kind"] == "model" and r["method"] == "red")
    assert float(red_row["theoretical_peak_bytes"]) == 4096 and float(red_row["activation_bytes"]) == 10240
    assert float(red_row["ratio_measured_theoretical"]) == pytest.approx(2.5)
    seeds = sorted(r["seed"] for r in rows if r["kind"] == "run" and r["method"] == "teacher")
    assert seeds == ["0", "1"]
    assert "not deployed (no device report)" in (out / "compare.md").read_text()


def test_paths_and_bad_path(project, tmp_path, capsys):
    root, _ = project
    out = tmp_path / "o"
    rc = main(["compare", str(root / "runs" / "alone_s0"), str(root / "reports" / "tx2" / "red-fp32"),
               "--out", str(out), "--no-analyze"])
    assert rc == 0 and (out / "compare.md").is_file()
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


# --- denoisers (DDPM U-Nets): their quality figure is the test denoising loss, lower is better -----------------

DT_ARCH, DS_ARCH = "unet-1-222", "unet-2-221"


def _dstage(role, arch, method, loss, run_dir):
    best = {"checkpoint": f"{run_dir}/{role}/best.pt", "epoch": 3, "test_diffusion_loss": loss, "test_images": 64}
    return {"role": role, "task": "denoise", "best": best, "last": dict(best, test_diffusion_loss=loss + 0.001),
            "arch": arch, "method": method, "images_per_s": 50.0, "picked_by": "validation split"}


def _denoiser_run(root: Path, name: str, method: str, seed: int, teacher_loss=None, student_loss=None,
                  archs=(DT_ARCH, DS_ARCH), checkpoint=False):
    """A denoiser run as `redistill distill ddpm_*` writes it; ``checkpoint``: a stand-in student/best.pt file."""
    d = root / name
    summary = {"name": name, "method": method, "run_dir": str(d)}
    if teacher_loss is not None:
        summary["teacher"] = _dstage("teacher", archs[0], "teacher", teacher_loss, d)
    if student_loss is not None:
        summary["student"] = _dstage("student", archs[1], method, student_loss, d)
    atomic_write_json(d / "summary.json", summary)
    atomic_write_text(d / "config.yaml", f"name: {name}\nmethod: {method}\nseed: {seed}\nteacher:\n  arch: {archs[0]}\n"
                                         f"student:\n  arch: {archs[1]}\ndata:\n  image_size: 16\n")
    if checkpoint:
        (d / "student").mkdir(parents=True, exist_ok=True)
        (d / "student" / "best.pt").write_bytes(f"stand-in checkpoint of {name}".encode())
        return d / "student" / "best.pt"


def _denoiser_bundle(root: Path, name: str, arch: str, method: str, peak: int, mse: float, sha: str):
    from export.bundle import bundle_id

    d = root / name
    d.mkdir(parents=True)
    manifest = {"schema": "redistill-bundle", "schema_version": 2, "name": name, "created": "2025-01-01T00:00:00Z",
                "task": "denoise",
                "model": {"arch": arch, "method": method, "role": "teacher" if method == "teacher" else "student",
                          "num_classes": 0, "image_size": 16, "red_blocks": 5,
                          "checkpoint": {"file": "best.pt", "sha256": sha, "epoch": 3}},
                "inputs": [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"},
                           {"name": "t", "shape": [1], "dtype": "float32"}],
                "precision": "fp32", "target": "tx2", "onnx": {"file": "model.onnx", "opset": 13},
                "accuracy": None, "denoising": {"samples": 16, "pytorch_mse": mse, "fp32_onnx_mse": mse},
                "memory": {"peak_bytes": peak, "inplace_peak_bytes": peak, "layerwise_peak_bytes": peak // 2},
                "files": {}}
    atomic_write_json(d / "manifest.json", manifest)
    return manifest, bundle_id(d)


def _denoiser_report(root: Path, host: str, bundle: str, bid: str, manifest: dict, act: int, p50: float):
    _report(root, host, bundle, bid, manifest, "20250102T000000Z", act=act, p50=p50)
    path = root / host / bundle / "20250102T000000Z.json"
    r = json.loads(path.read_text())
    r["bundle"]["task"] = "denoise"
    r["output_check"]["top1_agreement"] = None  # no argmax for a denoiser's eps
    atomic_write_json(path, r)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Classifier and denoiser runs, bundles and reports in the same folders, plus a quality.json."""
    from redistill.io import sha256_file

    root = tmp_path_factory.mktemp("mixed")
    runs, bundles, reports = root / "runs", root / "bundles", root / "reports"
    _run(runs, "red_s0", "red", 0, teacher_top1=80.0, student_top1=70.0)
    _run(runs, "alone_s0", "student", 0, student_top1=60.0)
    ck = _denoiser_run(runs, "ddpm_red", "red", 0, teacher_loss=0.050, student_loss=0.060, checkpoint=True)
    _denoiser_run(runs, "ddpm_alone", "student", 0, student_loss=0.080)
    sha = sha256_file(ck)
    tm, tid = _denoiser_bundle(bundles, "ddpm-teacher-fp32", DT_ARCH, "teacher", 8192, 0.0501, "1" * 64)
    rm, rid = _denoiser_bundle(bundles, "ddpm-red-fp32", DS_ARCH, "red", 2048, 0.0613, sha)
    _denoiser_report(reports, "tx2", "ddpm-teacher-fp32", tid, tm, act=16384, p50=4.0)
    _denoiser_report(reports, "tx2", "ddpm-red-fp32", rid, rm, act=4096, p50=1.0)
    atomic_write_json(runs / "ddpm_red" / "student" / "quality.json", {
        "input": str(ck.parent / "samples" / "samples.npz"), "cfd": 12.5, "cfd_name": "classifier-feature Frechet "
        "distance (CFD) on tinyteacher", "classifier": {"arch": T_ARCH}, "precision": 0.8, "recall": 0.7, "k": 3,
        "n_generated": 100, "n_real": 100, "samples": {"checkpoint": str(ck), "checkpoint_sha256": sha,
                                                       "sampler": "ddim", "steps": 50, "n": 100}})
    out = root / "out"
    rc = main(["compare", "--runs", str(runs), "--bundles", str(bundles), "--reports", str(reports), "--out", str(out)])
    assert rc == 0
    return root, out


def _dmodel(doc, method, task="denoise"):
    return next(m for m in doc["models"] if m["method"] == method and m["task"] == task)


def test_denoiser_figures_in_json(mixed):
    _, out = mixed
    doc = json.loads((out / "compare.json").read_text())
    red = _dmodel(doc, "red")
    assert red["diffusion_loss"]["n"] == 1 and red["diffusion_loss"]["mean"] == pytest.approx(0.060)
    assert red["top1"]["n"] == 0 and red["onnx_fp32_top1"] is None  # never presented as a top-1
    assert red["onnx_fp32_mse"] == pytest.approx(0.0613) and "denoiser" in red["label"]
    assert red["theory"]["peak_bytes"] == 2048
    (g,) = red["generation"]
    assert (g["cfd"], g["precision"], g["recall"], g["sampler"]) == (12.5, 0.8, 0.7, "ddim")
    (dep,) = red["deployments"]
    assert dep["activation_bytes"] == 4096 and dep["task"] == "denoise"
    assert red["bundles"][0]["from_run"] == "ddpm_red (seed 0)"
    assert _dmodel(doc, "teacher")["diffusion_loss"]["mean"] == pytest.approx(0.050)
    pair = next(p for p in doc["pairs"] if p["task"] == "denoise" and p["method"] == "red")
    assert pair["gap"] == pytest.approx(0.030)  # student-alone loss - teacher loss
    assert pair["recovered"] == pytest.approx((0.080 - 0.060) / 0.030)
    assert pair["top1"] is None and pair["diffusion_loss"] == pytest.approx(0.060)
    assert pair["theory_ratio"] == pytest.approx(4.0)
    (meas,) = pair["measured"]
    assert meas["activation_ratio"] == pytest.approx(4.0) and meas["latency_p50_ratio"] == pytest.approx(4.0)
    alone = next(p for p in doc["pairs"] if p["task"] == "denoise" and p["method"] == "student")
    assert alone["recovered"] is None


def test_mixed_scan_keeps_both_tasks_apart(mixed):
    _, out = mixed
    doc = json.loads((out / "compare.json").read_text())
    assert {(m["task"], m["method"]) for m in doc["models"]} == {
        ("classify", "teacher"), ("classify", "red"), ("classify", "student"),
        ("denoise", "teacher"), ("denoise", "red"), ("denoise", "student")}
    cpair = next(p for p in doc["pairs"] if p["task"] == "classify" and p["method"] == "red")
    assert cpair["gap"] == pytest.approx(20.0) and cpair["recovered"] == pytest.approx(0.5)
    assert _dmodel(doc, "red", "classify")["top1"]["mean"] == pytest.approx(70.0)
    md = (out / "compare.md").read_text()
    assert "test denoising loss (lower is better)" in md and "| 0.0600 |" in md and "| 70.00 |" in md
    assert "12.50 / 0.800 / 0.700 (ddim 50 steps, n=100)" in md
    assert "gap (loss)" in md and "gap (points)" in md and "66.7 %" in md and "50.0 %" in md
    rows = list(csv.DictReader((out / "compare.csv").open()))
    drow = next(r for r in rows if r["kind"] == "model" and r["task"] == "denoise" and r["method"] == "red")
    assert drow["top1"] == "" and float(drow["diffusion_loss"]) == pytest.approx(0.060) and drow["cfd"] == "12.5"
    crow = next(r for r in rows if r["kind"] == "model" and r["task"] == "classify" and r["method"] == "red")
    assert crow["top1"] == "70.0" and crow["diffusion_loss"] == ""
    for name in ("accuracy_vs_peak_memory.png", "denoising_loss_vs_peak_memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_same_names_never_pool_across_tasks(tmp_path):
    """A classifier and a denoiser with the same arch names stay two models; an unmatched quality file is a note."""
    from bench.compare import build, collect

    _run(tmp_path / "runs", "cls", "red", 0, teacher_top1=80.0, student_top1=70.0)
    _denoiser_run(tmp_path / "runs", "den", "red", 0, teacher_loss=0.05, student_loss=0.06, archs=(T_ARCH, S_ARCH))
    atomic_write_json(tmp_path / "q.json", {"input": "elsewhere/best.pt", "cfd": 1.0, "cfd_name": "CFD",
                                            "precision": 1.0, "recall": 1.0, "samples": {"checkpoint": "x/best.pt"}})
    res = build(collect([str(tmp_path / "runs"), str(tmp_path / "q.json")]), analyze=False)
    reds = [m for m in res["models"] if m["method"] == "red"]
    assert sorted(m["task"] for m in reds) == ["classify", "denoise"]
    assert {p["task"] for p in res["pairs"]} == {"classify", "denoise"}
    assert any("q.json" in n and "not shown" in n for n in res["notes"])

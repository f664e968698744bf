"""The typed records read the files the real writers produce, field for field, and tolerate missing optional keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deploy.agent.contract import RSS_DELTA_RESOLUTION_BYTES
from export.bundle import read_manifest
from bench.compare.records import (DEFAULT_TASK, BundleManifest, DeviceReport, Peaks, QualityResult, RunSummary,
                               StageSummary)
from tests.conftest import REPO, cli_env
from tests.support.fixtures import tiny_bundle
from train.config import load_config
from train.trainer import run_distill


@pytest.fixture(scope="module")
def bundle_and_report(tmp_path_factory):
    """A bundle written by export's write_bundle and the report of the agent run on it."""
    root = tmp_path_factory.mktemp("records")
    b = tiny_bundle(root / "tiny-fp32", image_size=16)
    out = root / "report.json"
    r = subprocess.run([sys.executable, str(REPO / "deploy" / "agent"), "--bundle", str(b), "--json-out", str(out),
                        "--warmup", "1", "--iters", "3", "--mem-iters", "2", "--sample-ms", "10", "--threads", "1",
                        "--slope-batches", "1,2,4"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return b, json.loads(out.read_text())


def test_manifest_fields(bundle_and_report):
    b, _ = bundle_and_report
    raw = read_manifest(b)
    m = BundleManifest.from_dict(raw)
    assert BundleManifest.matches(raw) and m.name == "tiny-fp32" and m.precision == raw["precision"]
    assert (m.model.arch, m.model.image_size) == (raw["model"]["arch"], 16) and m.model.raw == raw["model"]
    assert m.onnx_file == raw["onnx"]["file"] and m.peaks.peak_bytes == raw["memory"]["peak_bytes"]
    assert m.task == DEFAULT_TASK  # this bundle predates the task key: a classifier
    assert m.section("accuracy") == {} and m.raw == raw


def test_report_fields(bundle_and_report):
    b, raw = bundle_and_report
    r = DeviceReport.from_dict(raw)
    assert DeviceReport.matches(raw) and not DeviceReport.matches(read_manifest(b))
    assert r.bundle.name == "tiny-fp32" and r.bundle.model == read_manifest(b)["model"]
    assert r.backend.name == raw["backend"]["name"] == "onnxruntime"
    assert r.memory.activation_bytes == raw["memory"]["activation"]["bytes"]
    assert r.memory.process_peak_bytes == raw["memory"]["process_peak"]["bytes"]
    assert r.memory.theoretical_peak_bytes == read_manifest(b)["memory"]["peak_bytes"]
    assert r.latency.p50_ms == raw["latency"]["p50_ms"] and r.output_check_passed is raw["output_check"]["passed"]
    assert r.device.machine == raw["device"]["machine"] and r.deploy.host is None  # not saved by `redistill deploy`
    # every measured figure with its method: the batch-1 delta first, then the two per-image slopes
    mem = raw["memory"]
    assert [f.method for f in r.memory.figures] == ["onnxruntime_rss_delta", "onnxruntime_slope_opt_off",
                                                     "onnxruntime_slope_opt_on"]
    delta, off, on = r.memory.figures
    assert (delta.bytes, delta.per_image, delta.batch) == (mem["activation"]["bytes"], False, 1)
    assert delta.resolution_bytes == mem["activation"]["resolution_bytes"] == RSS_DELTA_RESOLUTION_BYTES
    for fig, raw_fig in zip((off, on), mem["per_image"]["figures"]):
        assert (fig.bytes, fig.per_image, fig.resolution_bytes) == (raw_fig["bytes"], True, raw_fig["resolution_bytes"])
        assert fig.fit_max_abs_residual_bytes == raw_fig["fit"]["max_abs_residual_bytes"]
        assert fig.fit_r2 == raw_fig["fit"]["r2"] and fig.label == raw_fig["label"]
    assert r.memory.per_image_skipped is None


def test_a_report_from_before_resolutions_gets_its_methods_documented_one():
    old = {"backend": {"name": "onnxruntime"}, "memory": {"batch": 1, "activation": {"bytes": 160 * 1024, "what": "w"}}}
    (fig,) = DeviceReport.from_dict(old).memory.figures
    assert (fig.method, fig.bytes, fig.resolution_bytes) == ("onnxruntime_rss_delta", 160 * 1024,
                                                             RSS_DELTA_RESOLUTION_BYTES)
    assert fig.below_resolution and "predates resolution fields" in fig.resolution_how
    trt = DeviceReport.from_dict({**old, "backend": {"name": "tensorrt"}}).memory.figures[0]
    assert (trt.method, trt.resolution_bytes, trt.below_resolution) == ("tensorrt_device_memory", 1, False)
    assert DeviceReport.from_dict({**old, "backend": {}}).memory.figures == ()  # no backend: no method to say


def test_run_summary_fields(tiny_images, tmp_path):
    raw = run_distill(load_config("quick", [f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=r", "method=student",
                                            "epochs=1", "device=cpu", "data.batch_size=8", "data.val_fraction=0.1",
                                            "optim.warmup_epochs=0"]))
    on_disk = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(raw)) and RunSummary.matches(on_disk)
    assert not RunSummary.matches(json.loads((tmp_path / "r" / "student" / "summary.json").read_text()))
    s = RunSummary.from_dict(on_disk)
    assert (s.name, s.method, s.teacher) == ("r", "student", None)  # no teacher trained
    st = s.stage("student")
    assert st.task == "classify" and st.best.get("test_top1") == on_disk["student"]["best"]["test_top1"]
    assert st.best.epoch == 1 and st.last.test_images == on_disk["student"]["last"]["test_images"]
    assert s.memory.peak_of("student") is None  # only runs with a teacher size both


def test_missing_optional_fields_default():
    assert BundleManifest.from_dict({"schema": "redistill-bundle"}).onnx_file == "model.onnx"
    assert BundleManifest.from_dict({}).peaks == Peaks() and BundleManifest.from_dict({"task": None}).task == DEFAULT_TASK
    r = DeviceReport.from_dict({"memory": {"activation": None}, "latency": None})
    assert (r.memory.activation_bytes, r.latency.p50_ms, r.bundle.task, r.memory.theoretical_detail) == (None, None, None, {})
    s = RunSummary.from_dict({"name": "x", "method": "kd", "run_dir": "runs/x",
                              "teacher": {"checkpoint": "t.pt", "arch": "a", "reused": True}})
    assert s.teacher == StageSummary(arch="a", checkpoint="t.pt", reused=True) and s.student is None
    q = QualityResult.from_dict({"cfd": 1.0, "cfd_name": "CFD", "precision": 0.5, "recall": 0.4})
    assert q.samples.checkpoint_sha256 is None and q.classifier_arch is None
    assert not QualityResult.matches({"cfd": 1.0})

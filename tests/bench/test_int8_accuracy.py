"""bench.int8_accuracy: three INT8 exports per network, one run file each, resumable, and the page rewritten from the
run files alone."""

import json
import shutil
from pathlib import Path

import pytest

import bench.int8_accuracy as bench
from export.bundle import read_manifest
from tests.export.conftest import bundles, checkpoint, image_root  # noqa: F401  the export stage's fixtures


@pytest.fixture
def canned(bundles, monkeypatch):  # noqa: F811
    """run_export replaced by the fixture INT8 bundle's manifest (with the test split marked whole): the
    benchmark's own logic, in a second; ``calls`` records every export asked for."""
    m = read_manifest(bundles[1])
    m["accuracy"]["subset"] = False
    calls = []

    def fake(opts):
        calls.append(opts)
        return Path(opts.out), m

    monkeypatch.setattr(bench, "run_export", fake)
    return m, calls


def test_three_exports_per_network_and_the_page(canned, checkpoint, tmp_path, capsys):  # noqa: F811
    m, calls = canned
    out = tmp_path / "results" / "int8_accuracy"
    ck = tmp_path / "runs" / "net-a" / "student" / "best.pt"
    ck.parent.mkdir(parents=True)
    shutil.copy(checkpoint, ck)
    assert bench.main([str(ck), "--out", str(out), "--work", str(tmp_path / "work"), "--quiet"]) == 0
    assert [(c.calib_method, c.calib_images, c.int8_max_float_nodes) for c in calls] == [
        ("auto", 0, 8), (m["quantization"]["calibration"]["method"], 16, 0), ("minmax", 256, 0)]
    assert all(c.target == "orin-int8" and c.eval_subset == 0 for c in calls)
    assert [c.int8_refine_scales for c in calls] == [True, False, False]  # only the search refines scales
    assert [Path(c.out).name for c in calls] == ["net-a-search", "net-a-calibrated", "net-a-plain"]
    rec = json.loads((out / "net-a.json").read_text())
    assert rec["network"] == "net-a" and rec["arch"] == m["model"]["arch"] and set(rec["exports"]) == set(bench.VARIANTS)
    t = rec["exports"]["search"]["test"]
    assert t["drop"] == pytest.approx(m["accuracy"]["drop"]) and t["images"] == 30
    md = (tmp_path / "results" / "int8_accuracy.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| net-a |"))
    assert f"| {t['fp32_top1']:.2f} |" in row and ("| met |" in row) == (t["drop"] <= 0.5)
    assert "## net-a" in md and "Calibrations tried on validation" in md and "| plain | minmax / 16 |" in md
    page = json.loads((tmp_path / "results" / "int8_accuracy.json").read_text())
    assert page["networks"][0]["checkpoint_sha256"] == rec["checkpoint_sha256"]
    # resumable: a current run file is kept, nothing exported again
    calls.clear()
    assert bench.main([str(ck), "--out", str(out), "--work", str(tmp_path / "work"), "--quiet"]) == 0
    assert not calls and "is current: kept" in capsys.readouterr().out
    # the page comes from the run files alone
    (tmp_path / "results" / "int8_accuracy.md").unlink()
    assert bench.main(["--pages-only", "--out", str(out)]) == 0
    assert (tmp_path / "results" / "int8_accuracy.md").read_text() == md


def test_the_page_says_whether_refined_scales_were_kept(canned, checkpoint, tmp_path):  # noqa: F811
    m, _ = canned
    search = m["quantization"]["search"]
    first = search["trace"][0]
    search["trace"].append({**first, "step": "refine scales", "chosen": True, "agreement": 0.9321, "val_drop": 0.12})
    search["refine_scales"] = {"kept": True, "changed": 7, "images": 16, "factors": {}, "validation": {}}
    out = tmp_path / "int8_accuracy"
    assert bench.main([str(checkpoint), "--out", str(out), "--work", str(tmp_path / "work"), "--quiet"]) == 0
    md = (tmp_path / "int8_accuracy.md").read_text()
    assert ("Activation scales refined at the logits (16 calibration images, 7 ranges changed): validation drop "
            "+0.12 +- ") in md and "FP32's top-1 kept on 93.21%" in md and "; kept." in md


def test_a_subset_is_not_judged_and_a_miss_says_so(canned):
    m, _ = canned
    rec = {"target_max_drop": 0.5, "exports": {"search": {"test": {"subset": True, "drop": 0.1}}}}
    assert bench.verdict(rec)["text"].startswith("not judged") and not bench.verdict(rec)["met"]
    rec["exports"]["search"]["test"] = {"subset": False, "drop": 0.51}
    assert bench.verdict(rec) == {"met": False, "full_test_split": True, "drop": 0.51, "text": "MISSED"}
    rec["exports"]["search"]["test"]["drop"] = 0.5
    assert bench.verdict(rec)["met"]


def test_missing_checkpoint_and_no_run_files_are_one_line(tmp_path, capsys):
    assert bench.main([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope.pt not found" in err
    assert bench.main(["--pages-only", "--out", str(tmp_path / "r")]) == 2
    assert "no run files" in capsys.readouterr().err


def test_network_names():
    assert bench.network_name(Path("runs/repro-red-s0/student/best.pt")) == "repro-red-s0"
    assert bench.network_name(Path("x/ck.pt")) == "ck"
    assert [bench.network_name(Path(c)) for c in bench.CHECKPOINTS] == [
        "quick", "repro-red-s0", "repro-red-s1", "repro-red_kd-s0", "repro-red_kd-s1"]


@pytest.mark.slow
def test_real_exports_end_to_end(checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "int8_accuracy"
    assert bench.main([str(checkpoint), "--out", str(out), "--work", str(tmp_path / "work"), "--calib-method", "minmax",
                       "--calib-images", "16", "--int8-max-float-nodes", "1", "--eval-subset", "10", "--quiet"]) == 0
    (run_file,) = out.glob("*.json")
    rec = json.loads(run_file.read_text())
    assert {v: rec["exports"][v]["test"]["images"] for v in bench.VARIANTS} == {v: 10 for v in bench.VARIANTS}
    assert rec["exports"]["plain"]["calibration"]["method"] == "minmax" and not rec["exports"]["plain"]["float_nodes"]
    assert "not judged: a test SUBSET" in (tmp_path / "int8_accuracy.md").read_text()

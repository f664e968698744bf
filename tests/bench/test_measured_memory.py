"""The measured-memory benchmark: one small network end to end (theory, eager trace, the agent), resumable, and
its page rewritten from the run file alone."""

import json

import pytest

from bench import measured_memory


def test_one_network_is_measured_resumed_and_paged(tmp_path, monkeypatch):
    out = str(tmp_path / "mm")
    argv = ["--sizes", "32", "--presets", "mobilenetv3_small_x4", "--networks", "student+RED", "--out", out]
    assert measured_memory.main(argv) == 0
    doc = json.loads((tmp_path / "mm.json").read_text())
    rec = doc["networks"]["32/mobilenetv3_small_x4/student+RED"]
    assert rec["theory"]["peak_bytes"] > 0 and rec["theory"]["int8_peak_bytes"] < rec["theory"]["peak_bytes"]
    assert rec["eager"]["activation_peak_bytes"] > 0 and rec["eager"]["top_activation_blocks"]
    for key in ("off", "on"):
        assert rec["ort"][key]["resolution_bytes"] > 0 and len(rec["ort"][key]["points"]) == 4
    page = (tmp_path / "mm.md").read_text()
    assert "mobilenetv3_small_x4 student+RED" in page and "res." in page

    # a re-run skips the finished network: nothing is measured again
    def boom(*a, **k):
        raise AssertionError("measured again")
    monkeypatch.setattr(measured_memory, "measure_network", boom)
    assert measured_memory.main(argv) == 0
    assert len(json.loads((tmp_path / "mm.json").read_text())["runs"]) == 2

    page = (tmp_path / "mm.md").read_text()
    (tmp_path / "mm.md").unlink()
    assert measured_memory.main(["--pages-only", "--out", out]) == 0
    assert (tmp_path / "mm.md").read_text() == page


def test_targets_and_ratios_follow_the_figures():
    """A figure below its resolution gets no ratio and misses the target; the bands are the issue's."""
    rec = {"theory": {"peak_bytes": 1000, "inplace_peak_bytes": 800},
           "eager": {"activation_peak_bytes": 1100, "resolution": "1 byte"},
           "ort": {"off": {"bytes": 1400, "resolution_bytes": 100}, "on": {"bytes": 50, "resolution_bytes": 100}}}
    assert measured_memory.eager_target(rec) == {"ratio": 1.38, "met": False}
    assert measured_memory.ort_target(rec, "off")["met"] is True
    assert measured_memory.ort_target(rec, "on") == pytest.approx(
        {"ratio": 0.05, "ratio_resolution": 0.1, "resolved": False, "met": False})
    assert "below resolution" in measured_memory._ort_cell(rec, "on")

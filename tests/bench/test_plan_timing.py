"""bench.plan_timing: its page rewrites from its run file, and its walk timer runs a given analysis module."""

import shutil
from pathlib import Path

from bench import plan_timing

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def test_committed_page_is_regenerated_unchanged(tmp_path, monkeypatch):
    for name in ("plan_timing.json", "plan_timing_remarks.md"):
        shutil.copyfile(RESULTS / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert plan_timing.main(["--pages-only", "--out", "plan_timing", "--remarks", "plan_timing_remarks.md"]) == 0
    assert (tmp_path / "plan_timing.md").read_text() == (RESULTS / "plan_timing.md").read_text()


def test_walk_timer_measures_the_module_it_is_given(tmp_path):
    got = plan_timing.time_walk(REPO / "redistill" / "memory" / "analysis.py", 50)
    # a Relu chain holds one input and one output of 8x16x16 float32 at a time; in place, one buffer
    assert (got["peak_bytes"], got["inplace_peak_bytes"]) == (2 * 8 * 16 * 16 * 4, 8 * 16 * 16 * 4 * 2)
    assert got["seconds"] > 0
    assert plan_timing.baseline_source("no-such-revision", tmp_path) is None

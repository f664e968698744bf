"""bench.plan_timing: its walk timer runs a given analysis module (its page: tests/bench/test_results_pages.py)."""

from pathlib import Path

from bench import plan_timing

REPO = Path(__file__).resolve().parents[2]


def test_walk_timer_measures_the_module_it_is_given(tmp_path):
    got = plan_timing.time_walk(REPO / "redistill" / "memory" / "analysis.py", 50)
    # a Relu chain holds one input and one output of 8x16x16 float32 at a time; in place, one buffer
    assert (got["peak_bytes"], got["inplace_peak_bytes"]) == (2 * 8 * 16 * 16 * 4, 8 * 16 * 16 * 4 * 2)
    assert got["seconds"] > 0
    assert plan_timing.baseline_source("no-such-revision", tmp_path) is None

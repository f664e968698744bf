import json

import pytest

from export.report import write_report
from redistill.errors import UserError


def test_report_files(bundles, tmp_path, capsys):
    fp32, int8 = bundles
    out = tmp_path / "results" / "export_test"
    r = write_report(fp32, int8, out, runs=5, warmup=1)
    data = json.loads((tmp_path / "results" / "export_test.json").read_text())
    md = (tmp_path / "results" / "export_test.md").read_text()
    assert data["fp32"]["latency"]["median_ms"] > 0 and data["int8"]["latency"]["batch"] == 1
    assert data["drop_points"] == pytest.approx(r["fp32"]["top1"] - r["int8"]["top1"])
    assert "| FP32 |" in md and "| INT8 |" in md and "machine:" in md and "(30 test images)" in md


def test_report_refuses_swapped_bundles(bundles, tmp_path):
    fp32, int8 = bundles
    with pytest.raises(UserError, match="swap the arguments"):
        write_report(int8, fp32, tmp_path / "r", runs=1, warmup=0)

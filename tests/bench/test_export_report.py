"""`redistill export-report`: FP32 vs INT8 figures from two bundles, and the page rewritten from its .json alone."""

import json

import pytest

from bench.export_report import rewrite_pages, write_report
from redistill.cli import main
from redistill.errors import UserError
from tests.export.conftest import bundles, checkpoint, image_root  # noqa: F401  the export stage's fixtures


def test_report_files(bundles, tmp_path):  # noqa: F811
    fp32, int8 = bundles
    out = tmp_path / "results" / "export_test"
    r = write_report(fp32, int8, out, runs=5, warmup=1)
    data = json.loads((tmp_path / "results" / "export_test.json").read_text())
    md = (tmp_path / "results" / "export_test.md").read_text()
    assert data["fp32"]["latency"]["median_ms"] > 0 and data["int8"]["latency"]["batch"] == 1
    assert data["drop_points"] == pytest.approx(r["fp32"]["top1"] - r["int8"]["top1"])
    assert "| FP32 |" in md and "| INT8 |" in md and "(30 test images)" in md
    assert f"- machine: {data['machine']['cores']} cores ({data['machine']['cpu']})" in md
    assert f"onnxruntime {data['machine']['onnxruntime']}" in md
    assert f"| FP32 | {data['fp32']['top1']:.2f} | {data['fp32']['latency']['median_ms']:.3f} |" in md


def test_pages_only_rewrites_the_page_from_the_json(bundles, tmp_path):  # noqa: F811
    fp32, int8 = bundles
    out = tmp_path / "export_test"
    write_report(fp32, int8, out, runs=3, warmup=0)
    page = out.with_suffix(".md").read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    data["int8"]["top1"] = 12.34  # the page follows the record, nothing is measured again
    out.with_suffix(".json").write_text(json.dumps(data))
    out.with_suffix(".md").unlink()
    assert main(["export-report", "--pages-only", "--out", str(out)]) == 0
    again = out.with_suffix(".md").read_text()
    assert "| INT8 | 12.34 |" in again and again.replace("| INT8 | 12.34 |", "") != page
    assert again.splitlines()[:9] == page.splitlines()[:9]  # title, created, commands, machine, data, latency: kept
    with pytest.raises(UserError, match="not found"):
        rewrite_pages(tmp_path / "missing")
    assert main(["export-report", "--pages-only", str(fp32), "--out", str(out)]) == 2


def test_report_refuses_swapped_bundles(bundles, tmp_path):  # noqa: F811
    fp32, int8 = bundles
    with pytest.raises(UserError, match="swap the arguments"):
        write_report(int8, fp32, tmp_path / "r", runs=1, warmup=0)


def test_the_report_says_whether_refined_scales_were_kept():
    from bench.export_report import _search_lines

    score = {"val_top1": 50.0, "val_drop": 0.3, "val_drop_se": 0.4, "agreement": 0.912, "logit_sqnr_db": 17.0}
    r = {"validation": {"images": 2500, "split": "held out", "fp32_top1": 50.3, "int8_top1": 50.0, "drop": 0.3,
                        "drop_se": 0.4}, "float_units": [],
         "search": {"goal": {"max_val_drop": 0.5, "max_float_nodes": 8}, "goal_met": False, "calibrations": [],
                    "failed": [], "refine_scales": {"kept": True, "changed": 12, "images": 256, "validation": score}}}
    text = "\n".join(_search_lines(r))
    assert ("Activation scales refined at the logits (12 ranges changed, 256 calibration images): FP32's top-1 kept "
            "on 91.20% of the validation images, drop +0.30 +- 0.40; kept.") in text
    r["search"]["refine_scales"] = None
    assert "refined" not in "\n".join(_search_lines(r))

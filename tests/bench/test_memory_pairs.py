"""The paper-pairs memory table: its rows come from the presets, its figures from the analysis."""

import json
import shutil

import pytest

import train.config
from bench import memory_pairs
from bench.memory_pairs import PAPER_MB
from redistill.memory import fmt_bytes
from train.config import PRESET_DIR, load_config


@pytest.fixture
def presets(tmp_path, monkeypatch):
    """A preset folder with one paper pair, one new pair (no published figures) and a CPU recipe at 32 px."""
    folder = tmp_path / "configs"
    folder.mkdir()
    for name in ("mobilenetv3_small_x4", "quick"):
        shutil.copy(PRESET_DIR / f"{name}.yaml", folder)
    (folder / "new_pair.yaml").write_text((PRESET_DIR / "mobilenetv3_small_x4.yaml").read_text()
                                          .replace("name: mobilenetv3_small_x4", "name: new_pair"))
    monkeypatch.setattr(train.config, "PRESET_DIR", folder)
    return folder


def test_a_new_preset_gets_a_row_and_the_page_shows_the_figures(presets, tmp_path):
    """No list to edit: a new paper-pair preset file is a new row (the presets lists and checks the predicate)."""
    out = tmp_path / "results"
    assert memory_pairs.main(["--image-size", "64", "--out-dir", str(out), "--plot-preset", "new_pair"]) == 0
    doc = json.loads((out / "memory_paper_pairs.json").read_text())
    md = (out / "memory_paper_pairs.md").read_text()
    rows = {r["preset"]: r for r in doc["pairs"]}
    assert list(rows) == ["mobilenetv3_small_x4", "new_pair"] and doc["image_size"] == 64
    old, new = rows["mobilenetv3_small_x4"], rows["new_pair"]
    for key in ("teacher_peak_bytes", "student_peak_bytes", "student_red_peak_bytes", "reduction_student_red"):
        assert old[key] == new[key]  # the same networks, so the same figures
    assert new["reduction_student_red"] == round(new["teacher_peak_bytes"] / new["student_red_peak_bytes"], 2)
    assert new["red_blocks"] == len(load_config(str(presets / "new_pair.yaml")).red.sites)
    assert (old["paper_teacher_mb"], old["paper_student_mb"]) == PAPER_MB["mobilenetv3_small_x4"]
    assert new["paper_teacher_mb"] is None and "not published" in md
    assert (f"| {fmt_bytes(new['teacher_peak_bytes'])} | {fmt_bytes(new['student_peak_bytes'])} | "
            f"{fmt_bytes(new['student_red_peak_bytes'])} |") in md
    assert f"| new_pair | {new['reduction_student']}x | **{new['reduction_student_red']}x** |" in md
    assert "64 px, FP32, batch 1" in md and (out / "memory_new_pair.png").is_file()
    assert "Bottleneck" not in md and "ResNeXt" not in md  # no fixed prose about the architectures
    # the page alone is rewritten from the .json, with the same figures
    (out / "memory_paper_pairs.md").unlink()
    assert memory_pairs.main(["--pages-only", "--out-dir", str(out)]) == 0
    assert (out / "memory_paper_pairs.md").read_text() == md


def test_a_pair_short_of_the_target_says_where_its_peak_is():
    row = {"preset": "p", "reduction_student_red": 2.0, "student_peak_bytes": 1 << 20, "student_red_peak_bytes": 2 << 20,
           "student_peak_node": "a", "student_red_peak_node": "b", "teacher_peak_node": "t"}
    assert memory_pairs._where(row) == "The RED blocks raise the peak above the plain student's (1.00 MiB at a) to 2.00 MiB at b."
    row.update(student_red_peak_bytes=1 << 19, student_red_peak_node="t")
    assert "Teacher and student+RED peak at the same node, t, where the student's live set is 2.0x smaller" in memory_pairs._where(row)

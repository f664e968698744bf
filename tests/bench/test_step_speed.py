"""bench.step_speed: a tiny run end to end (paper side skipped with one line, resumed, page rewritten), the paper's
own step where its code is on disk, the figures the page computes, and one-line errors for bad arguments."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from bench import step_speed
from bench.step_speed import page, run
from bench.step_speed.cli import paper_source
from bench.step_speed.measure import Side, interleaved, subset_images, train_epoch, untrained_teacher
from bench.step_speed.paper import EXPECTED
from train.config import load_config

REPO = Path(__file__).resolve().parents[2]
#: a copy of github.com/mengtang-lab/ReDistill, where this machine has one (never a dependency)
PAPER_CODE = Path(os.environ.get("REDISTILL_PAPER_CODE", REPO.parent / "paper-ReDistill"))
TINY = ["--pairs", "quick:32:4", "--switches", "--rounds", "2", "--warmup", "1", "--steps", "1", "--pool", "1",
        "--threads", "1", "--parts", "pairs"]


def test_tiny_run_skips_an_incomplete_paper_folder_resumes_and_rewrites_its_page(tmp_path, capsys):
    fake = tmp_path / "not-the-paper"
    (fake / "base" / "configs").mkdir(parents=True)
    (fake / "reed").mkdir()
    (fake / "reed" / "models.py").write_text("# not the paper's code\n")
    out, runs = tmp_path / "page", tmp_path / "run"
    argv = [*TINY, "--paper-code", str(fake), "--run-dir", str(runs), "--out", str(out)]
    assert step_speed.main(argv) == 0
    said = capsys.readouterr().out
    skip = [ln for ln in said.splitlines() if "paper side skipped" in ln]
    assert len(skip) == 1 and "lacks base/backbones/common.py" in skip[0]
    doc = json.loads(out.with_suffix(".json").read_text())
    pair = doc["pairs"]["quick:32:4"]
    ours = pair["sides"]["default"]
    assert "paper" not in pair["sides"] and pair["paper_skipped"] == doc["paper"]["why"]
    assert ours["error"] is None and len(ours["rounds"]) == 2 and len(ours["warmup_s"]) == 1
    assert ours["info"]["red_blocks"] == 5 and ours["info"]["trainable_params"] > 0
    assert all(r["steps"] == 1 and r["seconds"] > 0 and r["loss"] > 0 for r in ours["rounds"])
    assert (runs / "state.json").is_file() and (runs / "logs" / "quick_32_4" / "default.log").is_file()
    text = out.with_suffix(".md").read_text()
    assert "skipped: " in text and "| quick | 32 | 4 |" in text and "source folder" not in text

    # a rerun keeps the finished part; other settings over the same run folder are refused
    assert step_speed.main(argv) == 0
    assert "done in an earlier run (kept)" in capsys.readouterr().out
    doc2 = json.loads(out.with_suffix(".json").read_text())
    assert doc2["pairs"] == doc["pairs"] and len(doc2["runs"]) == 2 and doc2["runs"][1]["parts"] == []
    assert step_speed.main([*argv, "--rounds", "3"]) == 2
    assert "holds parts measured with rounds 2" in capsys.readouterr().err

    page_text = out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    assert step_speed.main(["--pages-only", "--out", str(out)]) == 0
    assert out.with_suffix(".md").read_text() == page_text


def test_the_paper_folder_is_identified_or_its_side_skipped_with_a_reason(tmp_path):
    assert paper_source(None)["why"] == "no --paper-code DIR given"
    assert "is not a folder" in paper_source(str(tmp_path / "absent"))["why"]
    copy = tmp_path / "ReDistill"
    for rel in EXPECTED:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_text(f"# {rel}\n")
    rec = paper_source(str(copy))
    assert rec["why"] is None and rec["commit"] is None and len(rec["digest"]) == 64
    (copy / "reed" / "hooks.py").write_text("# changed\n")
    assert paper_source(str(copy))["digest"] != rec["digest"]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(copy)]
    if subprocess.run([*git, "init", "-q"]).returncode != 0:
        pytest.skip("no git here")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    rec = paper_source(str(copy))
    assert rec["commit"] == head and rec["dirty"] is False
    (copy / "base" / "extra.py").write_text("x = 1\n")
    assert paper_source(str(copy))["dirty"] is True


@pytest.mark.slow
@pytest.mark.skipif(not all((PAPER_CODE / f).is_file() for f in EXPECTED), reason="no copy of the paper's code here")
def test_the_papers_own_step_runs_beside_ours(tmp_path):
    paper = paper_source(str(PAPER_CODE))
    assert paper["why"] is None and len(paper["digest"]) == 64
    common = {"seed": 0, "threads": 1, "image_size": 32, "batch": 4, "num_classes": 10, "pool": 1}
    sides = [Side("paper", "paper", dict(common, paper_code=str(PAPER_CODE), teacher="mobilenetv3_small-1-22121111211",
                                         student="mobilenetv3_small-4-22111111111", config="mobilenetv3_small-red.yaml",
                                         lr=0.01, cutmix=0.2, mixup=0.2)),
             Side("default", "ours", dict(common, preset="mobilenetv3_small_x4", settings={}))]
    rec = interleaved(sides, rounds=2, warmup=1, steps=1, round_seconds=1.0, log_dir=tmp_path, say=lambda s: None)
    paper_side, ours = rec["sides"]["paper"], rec["sides"]["default"]
    assert paper_side["error"] is None and paper_side["info"]["red_blocks"] == 5
    assert len(paper_side["rounds"]) == len(ours["rounds"]) == 2
    # the same pair: trainable parameters (student and RED blocks) within 0.1 % of each other
    assert abs(paper_side["info"]["trainable_params"] / ours["info"]["trainable_params"] - 1) < 1e-3
    assert [r["round"] for r in paper_side["rounds"]] == [0, 1]


def test_contention_parts_are_saved_one_by_one_and_kept_on_rerun(tmp_path, tiny_images, monkeypatch, capsys):
    calls = []

    def fake_epoch(preset, overrides, root, name, neighbour, say):
        calls.append((name, neighbour))
        return {"images_per_s": 100.0 if neighbour is None else 40.0, "train_time_s": 1.0, "neighbour": neighbour}

    monkeypatch.setattr(run, "train_epoch", fake_epoch)
    out = tmp_path / "page"
    argv = ["--parts", "contention", "--contention-threads", "2", "--neighbours", "spin", "--epoch-steps", "2",
            "--epoch-batch", "8",
            "--data-root", str(tiny_images), "--run-dir", str(tmp_path / "run"), "--out", str(out)]
    assert step_speed.main(argv) == 0
    assert calls == [("2-alone", None), ("2-spin", "spin")]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert set(doc["contention"]) == {"2/alone", "2/spin"}
    assert "| 2 | spin | 100 (1.0 s) | 40 (1.0 s) | 2.50x | met | - / - |" in out.with_suffix(".md").read_text()
    assert step_speed.main(argv) == 0 and len(calls) == 2


@pytest.mark.slow
def test_a_real_epoch_is_timed_by_the_trainer_beside_a_busy_loop(tmp_path, tiny_images):
    root = tmp_path / "contention"
    data = subset_images(tiny_images, root / "data", 4, 2)
    assert len(list((data / "train" / "cat").iterdir())) == 4
    cfg = load_config("quick")
    ck = untrained_teacher(cfg, sorted(p.name for p in (data / "train").iterdir()), root / "teacher.pt")
    common = [f"data.root={data}", f"teacher.checkpoint={ck}", "epochs=1", "device=cpu", "data.batch_size=8"]
    rec = train_epoch("quick", common, root, "busy", "spin", say=lambda s: None)
    assert rec["rc"] == 0 and rec["images_per_s"] > 0 and rec["train_time_s"] > 0, rec
    assert "loop iterations/s" in rec["neighbour_rate"]


def _side(kind, settings, seconds, warmup=(0.5,)):
    return {"kind": kind, "settings": settings, "info": {"trainable_params": 10, "build_s": 1.0}, "error": None,
            "warmup_s": list(warmup), "rounds": [{"round": r, "steps": 2, "seconds": s, "threads": 2, "loss": 1.0}
                                                 for r, s in enumerate(seconds)]}


def test_page_figures_follow_the_records():
    """Speed-ups are ratios of median images/s, with the range of back-to-back ratios; compile's cost and its
    break-even come from the warm-up; a missed target is marked."""
    pair = {"preset": "p", "image_size": 32, "batch": 8, "target": 1.5, "teacher": "t", "student": "s",
            "paper_config": "c.yaml", "paper_skipped": None, "steps_per_round": 2, "seconds": 10.0,
            "sides": {"paper": _side("paper", {}, [1.0, 1.0, 1.2]),
                      "default": _side("ours", {}, [0.8, 0.5, 0.5]),
                      "baseline": _side("ours", {"compile": False}, [1.0, 1.0, 1.0]),
                      "+compile": _side("ours", {"compile": True}, [0.5, 0.5, 0.5], warmup=(10.25, 0.25))}}
    ips = page.images_per_s(pair["sides"]["default"], 8)
    assert ips == {0: 20.0, 1: 32.0, 2: 32.0}
    sp = page.speedup(ips, page.images_per_s(pair["sides"]["paper"], 8))
    assert sp["ratio"] == pytest.approx(2.0) and (sp["low"], sp["high"]) == pytest.approx((1.25, 2.4))
    cc = page.compile_cost(pair, "+compile")
    assert cc["compile_s"] == pytest.approx(10.0) and cc["against"] == "baseline" and cc["break_even_steps"] == 40
    row = page.pair_rows({"pairs": {"k": pair}})[0]
    assert row[5].startswith("2.00x") and row[7] == "met"
    pair["target"] = 2.5
    assert page.pair_rows({"pairs": {"k": pair}})[0][7] == "**missed**"
    slow = _side("ours", {"compile": True}, [2.0, 2.0, 2.0], warmup=(5.0,))
    pair["sides"]["+compile"] = slow
    assert page.compile_cost(pair, "+compile")["break_even_steps"] == "never"


@pytest.mark.parametrize("argv, says", [
    (["--rounds", "1"], "--rounds 1: give at least 2"),
    (["--pairs", "quik:32:8"], "Did you mean 'quick'"),
    (["--pairs", "quick:32"], "give PRESET:SIZE:BATCH"),
    (["--pairs", "quick:16:8"], "data.image_size=16 is out of range"),
    (["--switches", "warp"], "unknown change 'warp'"),
    (["--contention-threads", "0"], "give auto or a thread count"),
    (["--epoch-steps", "0"], "give at least 1 step"),
    (["--parts", "contention", "--data-root", "no/such/folder"], "has no train/ folder"),
    (["--pages-only", "--out", "no/such/page"], "not found: --pages-only rewrites"),
])
def test_bad_arguments_are_one_line(argv, says, capsys, tmp_path):
    data = tmp_path / "data"  # a data folder that passes its own check (a clean checkout has no data/cifar10)
    (data / "train").mkdir(parents=True)
    assert step_speed.main(["--data-root", str(data), *argv, "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("step_speed: error:") and says in err
    assert not (tmp_path / "run").exists()

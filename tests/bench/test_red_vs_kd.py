"""The RED-vs-KD benchmark: its plan, its time estimate, the page from run files, and a tiny real run that resumes."""

import json
from datetime import datetime
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
import yaml

from bench import red_vs_kd, red_vs_kd_plan
from bench.red_vs_kd import estimate, parser, plan, settings_of
from bench.red_vs_kd_page import VARIANTS, write_results
from redistill.errors import UserError
from train.config import load_config


def _args(tmp_path, *extra):
    return parser().parse_args(["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res" / "red_vs_kd"),
                                *extra])


def _overrides(argv):
    return argv[argv.index("distill") + 2:-1]  # after the preset, before --resume


def test_the_plan_is_the_teacher_then_every_variant_and_seed_with_equal_settings(tmp_path):
    a = _args(tmp_path)
    s = settings_of(a)
    steps = plan(a, s)
    assert [st.name for st in steps] == ["teacher"] + [f"{v.name}-s{seed}" for seed in (0, 1) for v in VARIANTS] \
        + ["reference"]
    for st in steps:
        cfg = load_config(s.preset, _overrides(st.argv))  # every run's config is valid as the benchmark gives it
        assert cfg.data.image_size == 64 and st.argv[-1] == "--resume"
        if st.variant is None:
            assert cfg.method == "teacher" and cfg.epochs == 15 and cfg.data.train_subset == 0 and cfg.recipe == ""
            continue
        assert cfg.method == st.variant.method and cfg.epochs == 6
        assert cfg.data.train_subset == (0 if st.name == "reference" else 15000)
        assert cfg.teacher.checkpoint.endswith("rvk-teacher/teacher/best.pt")
        if st.variant.name == "kd_paper":
            assert cfg.recipe == "paper_kd" and (cfg.loss.w_ce, cfg.loss.w_dist) == (0.1, 0.9)
        else:
            assert cfg.recipe == "paper_student" and cfg.optim.weight_decay == 0 and cfg.data.batch_size == 8
        assert cfg.red.alpha == {"red_a1": 1.0}.get(st.variant.name, 50.0)
    without = plan(_args(tmp_path, "--no-reference"), settings_of(_args(tmp_path, "--no-reference")))
    assert [st.name for st in without] == [st.name for st in steps[:-1]]


def test_the_estimate_is_training_plus_evaluation_at_the_step_rates(tmp_path):
    a = _args(tmp_path)
    s = settings_of(a)
    teacher, kd_paper = plan(a, s)[0], plan(a, s)[3]
    rates = {"teacher": 100.0, "distill": 50.0, "student": 200.0, "distill_b64": 80.0}
    images, sec = estimate(teacher, s, rates, (50000, 10000))
    assert images == 47500 * 15
    assert sec == pytest.approx(47500 * 15 / 100 + (2500 * 15 + 20000) / 400 + red_vs_kd_plan.FIXED_S)
    images, sec = estimate(kd_paper, s, rates, (50000, 10000))
    assert kd_paper.name == "kd_paper-s0" and images == 14250 * 6
    assert sec == pytest.approx(14250 * 6 / 80 + (750 * 6 + 20000) / 320 + red_vs_kd_plan.FIXED_S)


def test_plan_prints_the_time_and_writes_nothing(tmp_path, capsys):
    assert red_vs_kd.main(["--plan", "--budget-h", "0.5", "--runs", str(tmp_path / "runs"), "--results",
                           str(tmp_path / "res" / "red_vs_kd"), "--data-root", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "over the budget" in out and "rates assumed" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()


def test_image_size_and_set_reach_every_run_and_are_settings(tmp_path):
    a = _args(tmp_path, "--image-size", "128", "--set", "runtime.amp=bf16", "--set=runtime.threads=2")
    s = settings_of(a)
    for st in plan(a, s):
        cfg = load_config(s.preset, _overrides(st.argv))
        assert cfg.data.image_size == 128 and cfg.runtime.amp == "bf16" and cfg.runtime.threads == "2"
    red_vs_kd.State(a, s).save()
    with pytest.raises(UserError, match="image_size=128, not 0"):
        red_vs_kd.State(a, settings_of(_args(tmp_path, "--set", "runtime.amp=bf16", "--set=runtime.threads=2")))
    with pytest.raises(UserError, match="runtime.amp.*bf16"):  # a bad --set is one line before anything runs
        settings_of(_args(tmp_path, "--set", "runtime.amp=bf17"))
    for key in ("epochs=2", "data.batch_size=64", "teacher.checkpoint=x.pt"):  # the benchmark's own keys
        with pytest.raises(UserError, match="sets .* itself"):
            settings_of(_args(tmp_path, "--set", key))


def test_a_calibration_for_other_settings_is_not_used(tmp_path, capsys):
    cal = tmp_path / "runs" / "calibration"
    cal.mkdir(parents=True)
    (cal / "rates.json").write_text(json.dumps({"rates": {"teacher": 1.0}, "jobs": 1, "image_size": 0, "overrides": []}))
    argv = ["--plan", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res" / "r"), "--data-root",
            str(tmp_path / "none")]
    assert red_vs_kd.main(argv) == 0
    assert "rates measured here" in capsys.readouterr().out
    assert red_vs_kd.main([*argv, "--jobs", "8"]) == 0
    out = capsys.readouterr().out
    assert "measured for other settings (jobs 1)" in out and "rates assumed" in out


def test_the_settings_added_later_are_recorded_only_when_set(tmp_path):
    a = _args(tmp_path)
    state = red_vs_kd.State(a, settings_of(a))
    assert "image_size" not in state.data["settings"]  # at their defaults the later settings are not written,
    state.save()  # so that the code before them still reads this state
    assert red_vs_kd.State(a, settings_of(a)).data["settings"] == state.data["settings"]
    a128 = _args(tmp_path / "b", "--image-size", "128")
    assert red_vs_kd.State(a128, settings_of(a128)).data["settings"]["image_size"] == 128


def test_wall_time_with_jobs_is_the_teacher_then_the_students_shared(tmp_path):
    times = {"teacher": 10.0, "a": 20.0, "b": 20.0, "c": 20.0}
    assert red_vs_kd_plan.wall_s(times, 1) == 70.0
    assert red_vs_kd_plan.wall_s(times, 2) == 40.0
    assert red_vs_kd_plan.wall_s(times, 8) == 30.0  # never shorter than the longest student
    a = _args(tmp_path)
    s = settings_of(a)
    rates = {"teacher": 100.0, "distill": 50.0, "student": 200.0, "distill_b64": 80.0}
    one, eight = (red_vs_kd_plan.subset_for(plan(a, s), s, rates, (50000, 10000), 4 * 3600, j) for j in (1, 8))
    assert one < eight  # eight students at once (at these rates) train on more images in the same time


def test_other_settings_or_bad_options_are_refused(tmp_path):
    a = _args(tmp_path)
    state = red_vs_kd.State(a, settings_of(a))
    state.save()
    with pytest.raises(UserError, match="epochs=6, not 3"):
        red_vs_kd.State(a, settings_of(_args(tmp_path, "--epochs", "3")))
    with pytest.raises(UserError, match="unknown 'red_a5'.*red_a50"):
        settings_of(_args(tmp_path, "--variants", "kd,red_a5"))


# --- the page, from run files written as the benchmark writes them ------------------------------------------------

TOP1 = {"student": (60.0, 61.0), "kd": (64.0, 64.4), "kd_paper": (65.0, 65.6), "fitnet": (61.0, 62.0),
        "at": (62.0, 62.5), "red_a50": (67.5, 68.5), "red_a1": (66.0, 66.4), "red_kd_paper": (66.0, 67.0),
        "reference": (63.0,)}
#: alpha 1 wins on validation although alpha 50 wins on test: the page must follow validation
VAL = {"red_a50": 70.0, "red_a1": 71.0}


def _stage(folder: Path, stage: str, test: float, val: float, n_train: int, peak: int, cfg) -> None:
    (folder / stage).mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    hist = [{"epoch": e + 1, "train_time_s": 100.0, "train_images_per_s": 150.0, "val_top1": val - 2 + e}
            for e in range(3)]
    (folder / stage / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    (folder / stage / "summary.json").write_text(json.dumps(
        {"best": {"test_top1": test, "epoch": 3, "test_images": 10000}, "last": {"test_top1": test - 0.1}}))
    (folder / "memory.json").write_text(json.dumps({"peak_bytes": peak}))
    (folder / "log.txt").write_text(f"data: imagefolder:x: {n_train} train, {round(n_train / 19)} val, 10000 test images\n")


def _fake_results(tmp_path) -> Namespace:
    a = _args(tmp_path)
    s = settings_of(a)
    copy = Path(a.results + "_run")
    steps = {}
    for st in plan(a, s):
        cfg = load_config(s.preset, _overrides(st.argv))
        if st.variant is None:
            _stage(copy / "teacher", "teacher", 84.0, 85.0, 47500, 786432, cfg)
        else:
            seed = st.seed
            red = st.variant.method.startswith("red")
            n_train = 47500 if st.name == "reference" else 14250
            _stage(copy / st.name, "student", TOP1[st.variant.name][seed], VAL.get(st.variant.name, 65.0) + seed, n_train,
                   122880 if red else 116736, cfg)
        steps[st.name] = {"done": True, "seconds": 600.0, "estimate_s": 650.0, "load_1min_at_start": 0.4, "attempts": 1}
    (copy / "state.json").write_text(json.dumps({
        "settings": red_vs_kd._settings_record(s), "steps": steps, "created": "2026-01-01T00:00:00Z",
        "command": "python -m bench.red_vs_kd --commit",
        "machine": {"cores": 2, "cpu": "Test CPU", "os": "Linux", "gpu": None, "python": "3.11.7"}}))
    return a


def test_the_page_answers_from_the_run_files(tmp_path):
    a = _fake_results(tmp_path)
    write_results(a)
    md, record = Path(a.results + ".md").read_text(), json.loads(Path(a.results + ".json").read_text())
    f = record["facts"]
    assert f["red"] == "red_a1" and f["kd"] == "kd_paper"  # alpha by validation; the better KD by test
    assert f["red_top1"] == pytest.approx(66.2) and f["kd_top1"] == pytest.approx(65.3)
    assert f["gap"] == pytest.approx(84.0 - 60.5) and f["recovered"]["red_a1"] == pytest.approx(5.7 / 23.5)
    assert "| teacher >= 80 % test top-1 | 84.00 % | met |" in md
    assert "| RED (alpha chosen on validation) >= the better KD + 1 point | RED alpha 1 66.20 vs KD (paper recipe) " \
           "65.30: +0.90 | **missed** |" in md
    assert "| RED recovers >= 50% of the teacher - student gap | 24% of 23.50 points | **missed** |" in md
    assert "RED alpha 50 val top-1 70.50, RED alpha 1 val top-1 71.50" in md and "ranges do not overlap" in md
    assert "| RED alpha 50 | 2/2 | 68.00 | 0.71 | 67.50 - 68.50 |" in md
    assert "recipe `paper_student`" in md and "6 epochs on 14,250 training images" in md and "5 RED sites" in md
    assert "Machine time: **3.00 h**" in md and "18 of 18 planned runs finished" in md
    assert "whole training split and 60.50 % on the 15,000-image subset with the same epochs (+2.50 points" in md
    assert Path(a.results + ".png").is_file()
    again = md
    assert red_vs_kd.main(["--pages-only", "--runs", a.runs, "--results", a.results]) == 0
    assert Path(a.results + ".md").read_text() == again


def test_a_partial_benchmark_still_has_a_page(tmp_path):
    a = _fake_results(tmp_path)
    copy = Path(a.results + "_run")
    for name in ("red_a1-s1", "red_a1-s0", "kd-s1"):
        for p in sorted((copy / name).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
    write_results(a)
    md = Path(a.results + ".md").read_text()
    assert "| RED alpha 1 | 0/2 | n/a |" in md and "| KD (1:1) | 1/2 | 64.00 | 0.00 |" in md
    assert json.loads(Path(a.results + ".json").read_text())["facts"]["red"] == "red_a50"


# --- a tiny real run ------------------------------------------------------------------------------------------------


def _git(repo, *argv):
    return subprocess.run(["git", "-C", str(repo), *argv], capture_output=True, text=True, check=True).stdout


def test_a_tiny_benchmark_runs_commits_resumes_and_rerenders(tiny_images, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "bench@example.invalid")
    _git(repo, "config", "user.name", "bench")
    (repo / "other.txt").write_text("staged by someone else\n")
    _git(repo, "add", "other.txt")
    monkeypatch.chdir(repo)
    argv = ["--data-root", str(tiny_images), "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1",
            "--train-subset", "40", "--variants", "student,fitnet", "--no-reference", "--runs", "runs/rvk", "--results",
            "bench/results/red_vs_kd", "--commit"]
    assert red_vs_kd.main([*argv, "--max-steps", "2"]) == 0
    state = json.loads(Path("bench/results/red_vs_kd_run/state.json").read_text())
    assert {n for n, v in state["steps"].items() if v.get("done")} == {"teacher", "student-s0"}
    log = _git(repo, "log", "--format=%s").splitlines()
    assert [m.split(" (")[0] for m in log] == ["red_vs_kd: student-s0 finished", "red_vs_kd: teacher finished"]
    committed = _git(repo, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    assert "bench/results/red_vs_kd_run/teacher/best.pt" in committed and "bench/results/red_vs_kd.md" in committed
    assert "other.txt" not in committed  # only the benchmark's own files are committed
    assert red_vs_kd.main(argv) == 0  # resumes: only fitnet-s0 is left
    state = json.loads(Path("bench/results/red_vs_kd_run/state.json").read_text())
    assert state["steps"]["fitnet-s0"]["done"] and state["steps"]["teacher"]["attempts"] == 1
    assert len(_git(repo, "log", "--format=%s").splitlines()) == 3 and _git(repo, "status", "--porcelain",
                                                                           "bench") == ""
    fit = load_config(str(Path("bench/results/red_vs_kd_run/fitnet-s0/config.yaml")))
    assert fit.teacher.checkpoint == "bench/results/red_vs_kd_run/teacher/best.pt"
    md = Path("bench/results/red_vs_kd.md").read_text()
    assert red_vs_kd.main(["--pages-only", "--results", "bench/results/red_vs_kd"]) == 0
    assert Path("bench/results/red_vs_kd.md").read_text() == md
    assert "| FitNet | 1/1 |" in md and "3 of 3 planned runs finished" in md


def test_students_run_jobs_at_once_and_a_deadline_stops_a_run_that_resumes(tiny_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(red_vs_kd_plan, "FIXED_S", 0.0)  # tiny runs: every estimate fits the deadline below
    argv = ["--data-root", str(tiny_images), "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1", "--train-subset",
            "40", "--variants", "student,red_a50", "--no-reference", "--runs", "runs", "--results", "res/rvk",
            "--jobs", "2", "--set", "runtime.threads=1"]
    assert red_vs_kd.main([*argv, "--stop-after-s", "2"]) == 0  # the teacher's process is stopped while it starts
    teacher = json.loads(Path("runs/state.json").read_text())["steps"]["teacher"]
    assert not teacher.get("done") and teacher["attempts"] == 1 and teacher["seconds_before"] >= 2
    assert red_vs_kd.main(argv) == 0
    steps = json.loads(Path("runs/state.json").read_text())["steps"]
    assert all(steps[n]["done"] for n in ("teacher", "student-s0", "red_a50-s0")) and steps["teacher"]["attempts"] == 2
    spans = []
    for n in ("student-s0", "red_a50-s0"):
        end = datetime.fromisoformat(steps[n]["finished"].replace("Z", "+00:00")).timestamp()
        spans.append((end - steps[n]["seconds"], end))
    assert max(s for s, _ in spans) < min(e for _, e in spans) - 1  # the two students ran at the same time
    md = Path("res/rvk.md").read_text()
    assert "students ran up to 2 at once" in md and "`runtime.threads=1`" in md

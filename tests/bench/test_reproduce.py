"""The reproduction benchmark's page: every figure and setting on it follows from the run files."""

import json
import sys

import pytest
import yaml

from bench import reproduce
from bench.reproduce import student_methods
from bench.steps import Steps
from redistill.memory import fmt_bytes
from train.config import load_config
from train.losses import METHODS

PREFIX = "repro"
TEACHER, STUDENT = "mobilenetv3_small-1-22121111211", "mobilenetv3_small-4-22111111111"


def _write_runs(res, optim=("adam", 0.003), counts=(47500, 2500, 10000), epochs=4, seeds=(0, 1)):
    """The files the benchmark leaves: run configs (the trainer's writer), state.json and a step log (Steps),
    compare.json and the loopback deploy record (their fields as the page reads them)."""
    run_copy = res.parent / (res.name + "_run")
    common = [f"epochs={epochs}", f"optim.name={optim[0]}", f"optim.lr={optim[1]}"]
    names = {f"{PREFIX}-teacher": load_config("quick", ["method=teacher", "seed=0", *common])}
    for seed in seeds:
        for m in student_methods():
            names[f"{PREFIX}-{m}-s{seed}"] = load_config("quick", [f"method={m}", f"seed={seed}", *common])
    for name, cfg in names.items():
        (run_copy / name).mkdir(parents=True, exist_ok=True)
        (run_copy / name / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    steps = Steps(run_copy / "state.json")
    line = f"data: imagefolder:data/cifar10/test: {counts[0]} train, {counts[1]} val, {counts[2]} test images"
    steps.run("train teacher", [sys.executable, "-c", f"print({line!r})", "distill", "quick", "method=teacher"],
              run_copy / "logs" / "teacher.log")
    steps.run("compare", [sys.executable, "-c", "pass"], run_copy / "logs" / "compare.log")

    top1 = {"teacher": 66.0, "student": 45.0, "kd": 49.0, "red": 48.0, "red_kd": 51.0}
    res.mkdir(parents=True, exist_ok=True)
    gap = top1["teacher"] - top1["student"]
    (res / "compare.json").write_text(json.dumps({
        "models": [{"method": m, "arch": TEACHER if m == "teacher" else STUDENT,
                    "top1": {"n": 1 if m == "teacher" else len(seeds), "mean": v, "std": 0.5, "min": v - 0.5, "max": v + 0.5}}
                   for m, v in top1.items()],
        "pairs": [{"method": m, "gap": gap, "recovered": None if m == "student" else (top1[m] - top1["student"]) / gap}
                  for m in student_methods()]}))
    theory = {"teacher": 196608, "student": 29184, "red": 29184}
    measured = {"teacher": 438272, "student": 163840, "red": 155648}
    p50 = {"teacher": 0.48, "student": 0.36, "red": 0.47}
    rows = [(f"{PREFIX}-teacher-fp32", "teacher")] + [(f"{PREFIX}-{m}-s{s}-fp32", m) for s in seeds for m in student_methods()]
    (res.parent / (res.name + "_deploy.json")).write_text(json.dumps({
        "machine": {"cpu": "Test CPU", "cores": 2, "platform": "Linux-x86_64", "python": "3.11.7", "onnxruntime": "1.0"},
        "note": "loopback sshd on this machine, ONNX Runtime CPU backend; not a Jetson",
        "results": [{"bundle": f"bundles/{b}", "precision": "fp32", "backend": "onnxruntime",
                     "providers": ["CPUExecutionProvider"], "batch": 1, "theoretical_peak_bytes": theory.get(m, 29184),
                     "measured_activation_bytes": measured.get(m, 170000), "latency_ms": {"p50_ms": p50.get(m, 0.4)}}
                    for b, m in rows]}))
    return run_copy, steps


def _page(res, *extra):
    assert reproduce.main(["--pages-only", "--results", str(res), "--prefix", PREFIX, "--probe-size", "0", *extra]) == 0
    return res.with_suffix(".md").read_text(), json.loads(res.with_suffix(".json").read_text())


def test_the_page_states_what_the_runs_say(tmp_path):
    res = tmp_path / "results" / "reproduce"
    run_copy, steps = _write_runs(res)
    md, record = _page(res)
    assert "adam lr 0.003, cosine schedule" in md and "batch 128" in md
    assert "47,500 training images (2,500 held out for picking the best epoch), 10,000 test images" in md
    assert "4 epochs for every network (teacher, " + ", ".join(METHODS.get(m).label for m in student_methods()) in md
    assert "every student method with seeds 0, 1" in md and "with 5 RED sites" in md and "the `quick` preset" in md
    total = sum(v["seconds"] for v in steps.state.values())
    assert f"Wall time: **{total / 60:.1f} min**" in md
    assert record["facts"]["theory_ratio"] == pytest.approx(196608 / 29184)
    assert record["facts"]["measured_ratio"] == pytest.approx(438272 / 155648)
    assert record["facts"]["recovered_red"] == pytest.approx(3 / 21) and record["facts"]["recovered_kd"] == pytest.approx(4 / 21)
    assert f"| teacher | 32 px | {fmt_bytes(196608)} | {fmt_bytes(438272)} | 2.2x | 0.480 ms |" in md
    assert "| RED recovers >= 60% of the teacher - student-alone gap | 14% | **missed** |" in md
    assert "RED alone did not beat KD here" in md
    assert "Machine: 2 cores (Test CPU), Linux-x86_64, Python 3.11.7, onnxruntime 1.0" in md  # from the deploy record
    for claim in ("Adam 3e-3", "shared the two cores", "## Remarks"):  # prose that no run file says
        assert claim not in md


def test_changing_a_run_file_changes_the_page(tmp_path):
    res = tmp_path / "reproduce"
    _write_runs(res, optim=("sgd", 0.1), counts=(9000, 1000, 2000), epochs=2, seeds=(3,))
    md, _ = _page(res)
    assert "sgd lr 0.1, cosine schedule" in md and "adam" not in md
    assert "9,000 training images (1,000 held out for picking the best epoch), 2,000 test images" in md
    assert "47,500" not in md and "2 epochs for every network" in md and "seeds 3." in md


def test_remarks_are_included_under_their_own_heading(tmp_path):
    res = tmp_path / "reproduce"
    _write_runs(res)
    remarks = tmp_path / "remarks.md"
    remarks.write_text("- The training shared the two cores with other work.\n")
    md, record = _page(res, "--remarks", str(remarks))
    assert "## Remarks (written by hand" in md and "- The training shared the two cores with other work." in md
    assert record["command"] == f"python -m bench.reproduce --results {res} --prefix repro --probe-size 0 --remarks {remarks}"
    assert "this page rewritten from the run files by `python -m bench.reproduce --pages-only" in md


def test_pages_only_needs_the_run_files(tmp_path):
    from redistill.errors import UserError

    with pytest.raises(UserError, match="state.json not found"):
        reproduce.main(["--pages-only", "--results", str(tmp_path / "reproduce")])

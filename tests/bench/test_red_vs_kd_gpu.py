"""The GPU driver of the RED-vs-KD comparison: sizing to the time left, the archive it returns, unpacking it here."""

import json
import tarfile

import pytest

from bench import red_vs_kd, red_vs_kd_gpu, red_vs_kd_plan
from redistill.errors import UserError


def _args(tmp_path, *extra):
    return red_vs_kd_gpu.parser().parse_args(["--archive", "x", "--work", str(tmp_path / "work"), "--out",
                                              str(tmp_path / "out"), *extra])


def _rates(tmp_path, **rates):
    cal = tmp_path / "work" / "runs" / "calibration"
    cal.mkdir(parents=True, exist_ok=True)
    (cal / "rates.json").write_text(json.dumps({"rates": rates}))


def test_sizing_gives_the_teacher_its_share_and_the_students_the_rest(tmp_path):
    a = _args(tmp_path)
    _rates(tmp_path, teacher=5000.0, distill=300.0, student=600.0, distill_b64=1500.0)
    rung = red_vs_kd_gpu.LADDER[0]
    epochs, subset = red_vs_kd_gpu.size(a, rung, 400.0)
    assert 1 <= epochs <= red_vs_kd_gpu.TEACHER_MAX_EPOCHS and subset % 1000 == 0 and subset >= 1000
    probe = red_vs_kd.parser().parse_args(red_vs_kd_gpu.bench_argv(a, rung, teacher_epochs=epochs, subset=subset))
    s = red_vs_kd.settings_of(probe)
    counts = red_vs_kd_plan.image_counts(s.data_root)
    steps = red_vs_kd_plan.plan(probe, s)
    times = {st.name: red_vs_kd_plan.estimate(st, s, json.loads((tmp_path / "work/runs/calibration/rates.json")
                                                           .read_text())["rates"], counts)[1] for st in steps}
    assert times["teacher"] <= red_vs_kd_gpu.TEACHER_SHARE * 400.0
    assert red_vs_kd_plan.wall_s(times, a.jobs) <= 400.0  # the plan fits the time left
    assert s.image_size == 128 and "runtime.amp=bf16" in s.overrides and not s.reference
    _rates(tmp_path, teacher=50000.0, distill=3000.0, student=6000.0, distill_b64=15000.0)
    assert red_vs_kd_gpu.size(a, rung, 400.0)[0] == red_vs_kd_gpu.TEACHER_MAX_EPOCHS  # fast: capped


def _archive(tmp_path, names):
    src = tmp_path / "src"
    for n in names:
        (src / n).parent.mkdir(parents=True, exist_ok=True)
        (src / n).write_text(n)
    out = tmp_path / "a.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for n in names:
            tar.add(src / n, arcname=n)
    return out


def test_unpack_puts_the_results_beside_the_others_and_never_overwrites(tmp_path):
    run = f"results/{red_vs_kd_gpu.RESULTS}_run"
    archive = _archive(tmp_path, [f"{run}/state.json", f"{run}/teacher/summary.json", "results/red_vs_kd_128.md",
                                  "logs/teacher.log", "calibration/rates.json", "environment.json"])
    dest = tmp_path / "bench" / "results" / "rvk128"
    dest.parent.mkdir(parents=True)
    assert red_vs_kd_gpu.main(["--unpack", str(archive), "--results", str(dest)]) == 0
    got = sorted(str(p.relative_to(dest.parent)) for p in dest.parent.rglob("*") if p.is_file())
    assert got == ["rvk128_run/calibration/rates.json", "rvk128_run/environment.json", "rvk128_run/logs/teacher.log",
                   "rvk128_run/state.json", "rvk128_run/teacher/summary.json"]
    with pytest.raises(UserError, match="exists: move it away"):
        red_vs_kd_gpu.main(["--unpack", str(archive), "--results", str(dest)])
    with pytest.raises(UserError, match="not this command's archive"):
        red_vs_kd_gpu.main(["--unpack", str(_archive(tmp_path, ["logs/x.log"])), "--results", str(tmp_path / "other")])


def test_pack_leaves_the_checkpoints_out_but_the_teachers_weights(tmp_path):
    work = tmp_path / "work"
    for n in (f"results/{red_vs_kd_gpu.RESULTS}_run/teacher/best.pt", f"results/{red_vs_kd_gpu.RESULTS}_run/state.json",
              "runs/calibration/teacher/teacher/best.pt", "runs/calibration/teacher/teacher/last.pt",
              "runs/calibration/distill0/student/best.pt", "runs/calibration/rates.json", "runs/logs/teacher.log"):
        (work / n).parent.mkdir(parents=True, exist_ok=True)
        (work / n).write_text("x")
    with tarfile.open(red_vs_kd_gpu.pack(_args(tmp_path), "r.tar.gz")) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {f"results/{red_vs_kd_gpu.RESULTS}_run/teacher/best.pt",
                     f"results/{red_vs_kd_gpu.RESULTS}_run/state.json", "calibration/rates.json", "logs/teacher.log"}


def test_bad_options_are_one_line(tmp_path):
    with pytest.raises(UserError, match="give --archive"):
        red_vs_kd_gpu.main(["--out", str(tmp_path)])
    (tmp_path / "a.tar.gz").write_text("x")
    with pytest.raises(UserError, match="--minutes must leave room"):
        red_vs_kd_gpu.main(["--archive", str(tmp_path / "a.tar.gz"), "--out", str(tmp_path), "--minutes", "1"])


def test_no_fit_is_none_and_every_rung_is_checked_before_the_data_is_unpacked(tmp_path):
    a = _args(tmp_path)
    _rates(tmp_path, teacher=5.0, distill=1.0, student=1.0, distill_b64=1.0)
    assert red_vs_kd_gpu.size(a, red_vs_kd_gpu.LADDER[0], 60.0) is None  # nothing fits: said, not run anyway
    (tmp_path / "a.tar.gz").write_text("not read")
    for rung, match in (("runtime.amp=bf17", "runtime.amp.*bf16"), ("epochs=3", "sets epochs itself")):
        with pytest.raises(UserError, match=match):
            red_vs_kd_gpu.main(["--archive", str(tmp_path / "a.tar.gz"), "--work", str(tmp_path / "w"), "--out",
                                str(tmp_path / "out"), "--rung", rung])
    assert not (tmp_path / "w").exists()


def test_a_calibration_only_archive_unpacks_and_a_broken_one_is_one_line(tmp_path):
    archive = _archive(tmp_path, ["calibration/rates.json", "calibration-failed-0/distill0.log", "environment.json"])
    dest = tmp_path / "res" / "rvk128"
    assert red_vs_kd_gpu.main(["--unpack", str(archive), "--results", str(dest)]) == 0
    assert sorted(p.name for p in (tmp_path / "res" / "rvk128_run").iterdir()) == [
        "calibration", "calibration-failed-0", "environment.json"]
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(archive.read_bytes()[:40])
    with pytest.raises(UserError, match="not a readable archive"):
        red_vs_kd_gpu.main(["--unpack", str(broken), "--results", str(tmp_path / "other")])


@pytest.mark.slow
def test_the_driver_runs_tiny_on_a_cpu_and_its_archive_unpacks_into_a_page(tiny_images, tmp_path, monkeypatch):
    src = tmp_path / "data.tar.gz"
    with tarfile.open(src, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(tiny_images / split, arcname=split)
    out = tmp_path / "out"
    rc = red_vs_kd_gpu.main(["--archive", str(src), "--work", str(tmp_path / "work"), "--out", str(out), "--minutes", "8",
                             "--jobs", "2", "--seeds", "0", "--epochs", "1", "--variants", "student,red_a50",
                             "--image-size", "32", "--rung", "runtime.threads=1"])
    assert rc == 0
    monkeypatch.chdir(tmp_path)
    assert red_vs_kd_gpu.main(["--unpack", str(out / f"{red_vs_kd_gpu.RESULTS}.tar.gz"), "--results", "res/r"]) == 0
    run = tmp_path / "res" / "r_run"
    state = json.loads((run / "state.json").read_text())
    assert all(state["steps"][n]["done"] for n in ("teacher", "student-s0", "red_a50-s0"))
    assert (run / "calibration" / "rates.json").is_file() and (run / "environment.json").is_file()
    assert not list(run.rglob("last.pt")) and (run / "teacher" / "best.pt").is_file()
    assert red_vs_kd.main(["--pages-only", "--results", "res/r"]) == 0
    md = (tmp_path / "res" / "r.md").read_text()
    assert "# RED vs KD at 32 px" in md and "Environment: torch" in md and "`runtime.threads=1`" in md


def test_the_probes_fastest_settings_are_tried_first(tmp_path):
    a = _args(tmp_path)
    ladder = list(red_vs_kd_gpu.LADDER)
    assert red_vs_kd_gpu.rungs(a) == ladder
    fast = red_vs_kd_gpu.rungs(a, {"best": {"amp": "none", "channels_last": "true"}})
    assert fast[0] == ("runtime.amp=none", "runtime.channels_last=true", *ladder[0][2:]) == ladder[1]
    assert fast[1:] == [ladder[0], *ladder[2:]]  # the same settings are never tried twice
    slow = red_vs_kd_gpu.rungs(a, {"best": {"amp": "bf16", "channels_last": "false"}})
    assert slow[0] == ("runtime.amp=bf16", "runtime.channels_last=false", *ladder[0][2:]) and slow[1:] == ladder
    assert red_vs_kd_gpu.rungs(a, {"best": None}) == ladder
    given = _args(tmp_path, "--rung", "runtime.threads=1,runtime.amp=bf16")
    assert red_vs_kd_gpu.rungs(given, {"best": {"amp": "none", "channels_last": "true"}}) == [
        ("runtime.threads=1", "runtime.amp=bf16")]

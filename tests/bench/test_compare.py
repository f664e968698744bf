"""`redistill compare` on what the real stages write: tiny training runs (run_distill), their exports (run_export),
device reports of the agent run locally on each bundle, and a `redistill quality` result. Expected figures are read
back from those files, so every assertion checks a join, an aggregate or a ratio against its source."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench.compare import build, collect
from deploy.agent.contract import RSS_DELTA_RESOLUTION_BYTES
from bench.compare.tables import MEASURE_COLUMNS, csv_columns, render_markdown
from export.bundle import read_manifest
from export.pipeline import ExportOptions, run_export
from redistill.cli import main
from redistill.errors import UserError
from tests.conftest import REPO, cli_env
from train.config import load_config
from train.tasks import TASKS, ClassifyTask, OnnxFigures, TaskMetric, metric_of
from train.trainer import run_distill

AGENT = REPO / "deploy" / "agent"
TINY = ["data.batch_size=8", "data.eval_batch_size=16", "data.val_fraction=0.1", "optim.warmup_epochs=0"]
DDPM = ["unet.ch=8", "unet.num_res_blocks=2", "unet.norm_groups=4", "unet.dropout=0.0", "diffusion.timesteps=50",
        "data.train_subset=0", "data.test_subset=0", "data.batch_size=16", "data.val_fraction=0.1"]


def _no_runs(tmp_path: Path) -> Path:
    """An empty runs folder: compare's default ``runs/`` may hold real runs on a developer's machine."""
    d = tmp_path / "no-runs"
    d.mkdir(exist_ok=True)
    return d


def _distill(preset: str, data: Path, runs: Path, name: str, *extra: str) -> Path:
    run_distill(load_config(preset, [f"data.root={data}", f"out_dir={runs}", f"name={name}", "epochs=1", "device=cpu",
                                     *extra]))
    return runs / name


def _export(ck: Path, out: Path, **kw) -> Path:
    path, _ = run_export(ExportOptions(str(ck), out=str(out), verify_images=8, reference_images=4, quiet=True, **kw))
    return path


def _measure(bundle: Path, reports: Path, stamp: str) -> Path:
    """The agent run on ``bundle`` here (as on a device), its report filed like deploy's: reports/HOST/BUNDLE/STAMP.json."""
    out = reports / "loop0" / bundle.name / f"{stamp}.json"
    r = subprocess.run([sys.executable, str(AGENT), "--bundle", str(bundle), "--json-out", str(out), "--warmup", "1",
                        "--iters", "5", "--mem-iters", "2", "--sample-ms", "10", "--threads", "1", "--slope-batches",
                        "1,2,4"],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _best(run: Path, role: str, key: str):
    return _json(run / "summary.json")[role]["best"][key]


@pytest.fixture(scope="module")
def cls(tmp_path_factory, tiny_images, one_thread):
    """Classifiers: RED with its teacher (seeds 0 and 1), student alone, KD reusing seed 0's teacher; the teacher and
    the RED student exported (RED also as INT8); both FP32 bundles measured, the RED one twice."""
    root = tmp_path_factory.mktemp("cls")
    runs, bundles, reports = root / "runs", root / "bundles", root / "reports"
    red0 = _distill("quick", tiny_images, runs, "red_s0", *TINY, "seed=0")
    _distill("quick", tiny_images, runs, "red_s1", *TINY, "seed=1")
    _distill("quick", tiny_images, runs, "alone_s0", *TINY, "method=student")
    _distill("quick", tiny_images, runs, "kd_s0", *TINY, "method=kd", f"teacher.checkpoint={red0 / 'teacher' / 'best.pt'}")
    t32 = _export(red0 / "teacher" / "best.pt", bundles / "teacher-fp32")
    r32 = _export(red0 / "student" / "best.pt", bundles / "red-fp32")
    _export(red0 / "student" / "best.pt", bundles / "red-int8", target="orin-int8", calib_images=8)
    _measure(t32, reports, "1")
    _measure(r32, reports, "1")
    _measure(r32, reports, "2")  # the newer report: the one compare keeps
    out = root / "out"
    assert main(["compare", "--runs", str(runs), "--bundles", str(bundles), "--reports", str(reports), "--out", str(out)]) == 0
    return root, out


def _model(doc, method, task="classify"):
    return next(m for m in doc["models"] if m["method"] == method and m["task"] == task)


def _pair(doc, method, task="classify"):
    return next(p for p in doc["pairs"] if p["method"] == method and p["task"] == task)


def test_outputs_exist(cls):
    _, out = cls
    for name in ("compare.md", "compare.csv", "compare.json", "memory_theory_vs_measured.png",
                 "accuracy_vs_peak_memory.png", "footprint_teacher_vs_student_red.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "footprint_teacher_vs_student_red.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "denoising_loss_vs_peak_memory.png").exists()  # no denoiser among the inputs


def test_models_aggregate_the_runs_summaries(cls):
    root, out = cls
    doc = _json(out / "compare.json")
    runs = root / "runs"
    t_top1 = [_best(runs / r, "teacher", "test_top1") for r in ("red_s0", "red_s1")]
    t = _model(doc, "teacher")
    assert t["top1"]["n"] == 2 and t["seeds"] == [0, 1]  # KD's reused teacher is not counted again
    assert t["top1"]["mean"] == pytest.approx(statistics.fmean(t_top1))
    assert t["top1"]["std"] == pytest.approx(statistics.stdev(t_top1))
    assert (t["top1"]["min"], t["top1"]["max"]) == (min(t_top1), max(t_top1))
    assert t["diffusion_loss"]["n"] == 0  # a classifier is never given a denoising loss
    kd = _model(doc, "kd")
    assert kd["top1"]["mean"] == _best(runs / "kd_s0", "student", "test_top1") and kd["label"].startswith("KD (")
    assert [r["run"] for r in kd["runs"]] == ["kd_s0"]


def test_bundles_and_newest_report_join_their_model(cls):
    root, out = cls
    doc = _json(out / "compare.json")
    fp32, int8 = read_manifest(root / "bundles" / "red-fp32"), read_manifest(root / "bundles" / "red-int8")
    red = _model(doc, "red")
    assert red["theory"] == {k: fp32["memory"][k] for k in ("peak_bytes", "inplace_peak_bytes", "layerwise_peak_bytes")}
    assert red["theory_source"] == "bundle red-fp32 manifest"
    assert red["onnx_fp32_top1"] == fp32["accuracy"]["fp32_top1"] and red["onnx_int8_top1"] == int8["accuracy"]["int8_top1"]
    assert {b["name"]: b["from_run"] for b in red["bundles"]} == {"red-fp32": "red_s0 (seed 0)", "red-int8": "red_s0 (seed 0)"}
    newest = _json(root / "reports" / "loop0" / "red-fp32" / "2.json")
    (dep,) = red["deployments"]
    assert dep["report"].endswith("2.json") and dep["host"] == "loop0" and dep["backend"] == "onnxruntime"
    assert dep["activation_bytes"] == newest["memory"]["activation"]["bytes"]
    assert dep["latency_p50_ms"] == newest["latency"]["p50_ms"] and dep["bundle_id"] == newest["bundle"]["id"]
    assert dep["ratio_measured_theoretical"] == pytest.approx(dep["activation_bytes"] / fp32["memory"]["peak_bytes"])
    for method in ("kd", "student"):  # no bundle: sized by analysing the run's checkpoint
        m = _model(doc, method)
        assert m["theory_source"].startswith("analysis of ") and m["theory"]["inplace_peak_bytes"]
        assert "not deployed (no device report)" in m["notes"] and m["deployments"] == []


def test_batch1_bundles_say_why_there_is_no_per_image_figure(cls):
    """The export's default bundles have a fixed batch of 1: their reports carry the batch-1 delta with its resolution
    and the reason there is no slope, and compare shows both."""
    _, out = cls
    red = _model(_json(out / "compare.json"), "red")
    (dep,) = red["deployments"]
    (x,) = dep["measures"]
    assert x["method"] == "onnxruntime_rss_delta" and x["resolution_bytes"] == RSS_DELTA_RESOLUTION_BYTES
    assert x["below_resolution"] == (dep["activation_bytes"] < RSS_DELTA_RESOLUTION_BYTES)
    assert "--dynamic-batch" in dep["per_image_skipped"]
    md = (out / "compare.md").read_text()
    assert "## Theory against each measurement" in md and "per image not measured: the bundle's input" in md
    assert (out / "memory_measured_vs_theory.png").read_bytes()[:4] == b"\x89PNG"


def test_pairs_gap_recovered_and_ratios(cls):
    root, out = cls
    doc = _json(out / "compare.json")
    t, alone, red = _model(doc, "teacher"), _model(doc, "student"), _model(doc, "red")
    p = _pair(doc, "red")
    gap = t["top1"]["mean"] - alone["top1"]["mean"]
    assert p["gap"] == pytest.approx(gap) and (p["teacher_top1"], p["top1"]) == (t["top1"]["mean"], red["top1"]["mean"])
    assert p["recovered"] == (pytest.approx((red["top1"]["mean"] - alone["top1"]["mean"]) / gap) if gap else None)
    assert p["theory_ratio"] == pytest.approx(t["theory"]["peak_bytes"] / red["theory"]["peak_bytes"])
    (meas,) = p["measured"]
    td, rd = t["deployments"][0], red["deployments"][0]
    assert meas["activation_ratio"] == pytest.approx(td["activation_bytes"] / rd["activation_bytes"])
    assert meas["latency_p50_ratio"] == pytest.approx(td["latency_p50_ms"] / rd["latency_p50_ms"])
    (per_method,) = meas["methods"]  # fixed-batch bundles: the batch-1 delta only, flagged where below resolution
    assert per_method["method"] == "onnxruntime_rss_delta" and per_method["ratio"] == pytest.approx(meas["activation_ratio"])
    below = [who for who, d in (("teacher", td), ("student", rd)) if d["activation_bytes"] < RSS_DELTA_RESOLUTION_BYTES]
    assert per_method["below_resolution"] == below
    cell = (f"{' and '.join(below)} below resolution (192.00 KiB)" if below
            else f"ORT batch-1 RSS delta {per_method['ratio']:.2f}x")
    assert cell in (out / "compare.md").read_text()
    assert _pair(doc, "student")["recovered"] is None
    assert "teacher and student not measured on the same device/backend" in _pair(doc, "kd")["notes"]
    assert f"{p['theory_ratio']:.2f}x" in (out / "compare.md").read_text()


def test_csv_rows(cls):
    _, out = cls
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert list(rows[0]) == csv_columns() + MEASURE_COLUMNS  # these reports have per-method figures
    kd = next(r for r in rows if r["kind"] == "model" and r["method"] == "kd")
    assert kd["activation_bytes"] == "" and kd["latency_p50_ms"] == "" and "not deployed" in kd["notes"]
    doc = _json(out / "compare.json")
    red_model = _model(doc, "red")
    red = next(r for r in rows if r["kind"] == "model" and r["method"] == "red")
    assert int(red["theoretical_peak_bytes"]) == red_model["theory"]["peak_bytes"]
    assert int(red["activation_bytes"]) == red_model["deployments"][0]["activation_bytes"]
    assert sorted(r["seed"] for r in rows if r["kind"] == "run" and r["method"] == "teacher") == ["0", "1"]
    assert red["diffusion_loss"] == "" and red["task"] == "classify"


def test_without_analysis_the_run_summary_sizes_the_model(cls, tmp_path):
    root, _ = cls
    assert main(["compare", str(root / "runs" / "kd_s0"), "--out", str(tmp_path), "--no-analyze"]) == 0
    kd = _model(_json(tmp_path / "compare.json"), "kd")
    assert kd["theory_source"] == "run summary.json (liveness only)"
    assert kd["theory"]["peak_bytes"] == _json(root / "runs" / "kd_s0" / "summary.json")["memory"]["student_peak_bytes"]


def test_paths_and_bad_path(cls, tmp_path, capsys):
    root, _ = cls
    out = tmp_path / "o"
    rc = main(["compare", str(root / "runs" / "alone_s0"), str(root / "reports" / "loop0" / "red-fp32"),
               "--out", str(out), "--no-analyze"])
    assert rc == 0
    doc = _json(out / "compare.json")
    assert {m["method"] for m in doc["models"]} == {"student", "red"}  # the report alone makes the RED model
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("run", ["cls", "mixed"])
def test_pages_only_rewrites_the_full_runs_pages(run, request, tmp_path, capsys):
    """--pages-only from compare.json alone writes the full run's compare.md, compare.csv and plots byte for byte;
    a record from before ``run_order`` and the footprint curves still gives the same tables (footprint plot kept)."""
    _, out = request.getfixturevalue(run)
    doc = _json(out / "compare.json")
    (tmp_path / "compare.json").write_bytes((out / "compare.json").read_bytes())
    assert main(["compare", "--pages-only", "--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == written
    for name in written:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    old = tmp_path / "old"
    old.mkdir()
    doc.pop("run_order")
    doc["footprint"] = [{k: c[k] for k in ("label", "model", "peak_bytes")} for c in doc["footprint"]]
    (old / "compare.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["compare", "--pages-only", "--out", str(old)]) == 0
    assert "kept footprint_teacher_vs_student_red.png" in capsys.readouterr().out
    assert not (old / "footprint_teacher_vs_student_red.png").exists()
    for name in ("compare.md", "compare.csv"):
        assert (old / name).read_bytes() == (out / name).read_bytes(), name
    assert main(["compare", "--pages-only", str(out), "--out", str(old)]) == 2  # reads nothing but OUT/compare.json


# --- denoisers (DDPM U-Nets): their quality figure is the test denoising loss, lower is better ------------------


@pytest.fixture(scope="module")
def mixed(cls, tmp_path_factory, tiny_images):
    """Denoisers beside the classifiers: RED with its teacher, student alone, both FP32 exports measured, and a
    quality result of the RED student's samples; compare scans both folders."""
    croot, _ = cls
    root = tmp_path_factory.mktemp("ddpm")
    runs, bundles, reports = root / "runs", root / "bundles", root / "reports"
    red = _distill("ddpm_bench", tiny_images, runs, "ddpm_red", *DDPM)
    _distill("ddpm_bench", tiny_images, runs, "ddpm_alone", *DDPM, "method=student")
    _measure(_export(red / "teacher" / "best.pt", bundles / "ddpm-teacher-fp32"), reports, "1")
    _measure(_export(red / "student" / "best.pt", bundles / "ddpm-red-fp32"), reports, "1")
    assert main(["quality", str(red / "student" / "best.pt"), "--steps", "2", "--n", "8", "--classifier",
                 str(croot / "runs" / "red_s0" / "teacher" / "best.pt"), "--real", "8",
                 "--cache", str(tmp_path_factory.mktemp("qcache")), "--json", str(red / "student" / "quality.json")]) == 0
    out = tmp_path_factory.mktemp("mixed-out")
    assert main(["compare", str(croot / "runs"), str(croot / "bundles"), str(croot / "reports"), str(root),
                 "--out", str(out), "--no-analyze"]) == 0
    return root, out


def test_denoiser_figures_in_json(mixed):
    root, out = mixed
    doc = _json(out / "compare.json")
    red_run = root / "runs" / "ddpm_red"
    red = _model(doc, "red", "denoise")
    loss = _best(red_run, "student", "test_diffusion_loss")
    assert red["diffusion_loss"]["n"] == 1 and red["diffusion_loss"]["mean"] == loss
    assert red["top1"]["n"] == 0 and red["onnx_fp32_top1"] is None  # never presented as a top-1
    manifest = read_manifest(root / "bundles" / "ddpm-red-fp32")
    assert red["onnx_fp32_mse"] == manifest["denoising"]["fp32_onnx_mse"] and red["label"].endswith(", denoiser)")
    assert red["theory"]["peak_bytes"] == manifest["memory"]["peak_bytes"]
    q = _json(red_run / "student" / "quality.json")
    (g,) = red["generation"]
    assert (g["cfd"], g["precision"], g["recall"], g["sampler"], g["steps"]) == (q["cfd"], q["precision"], q["recall"],
                                                                                 "ddim", 2)
    (dep,) = red["deployments"]
    report = _json(root / "reports" / "loop0" / "ddpm-red-fp32" / "1.json")
    assert dep["activation_bytes"] == report["memory"]["activation"]["bytes"] and dep["task"] == "denoise"
    assert red["bundles"][0]["from_run"] == "ddpm_red (seed 0)"


def test_denoiser_pairs_recover_a_loss_gap(mixed):
    root, out = mixed
    doc = _json(out / "compare.json")
    runs = root / "runs"
    t_loss = _best(runs / "ddpm_red", "teacher", "test_diffusion_loss")
    a_loss = _best(runs / "ddpm_alone", "student", "test_diffusion_loss")
    r_loss = _best(runs / "ddpm_red", "student", "test_diffusion_loss")
    p = _pair(doc, "red", "denoise")
    assert p["gap"] == pytest.approx(a_loss - t_loss)  # lower is better: student-alone loss - teacher loss
    assert p["recovered"] == pytest.approx((a_loss - r_loss) / (a_loss - t_loss))
    assert p["top1"] is None and p["diffusion_loss"] == r_loss and p["metric"] == "diffusion_loss"
    t, red = _model(doc, "teacher", "denoise"), _model(doc, "red", "denoise")
    assert p["theory_ratio"] == pytest.approx(t["theory"]["peak_bytes"] / red["theory"]["peak_bytes"])
    (meas,) = p["measured"]
    assert meas["activation_ratio"] == pytest.approx(t["deployments"][0]["activation_bytes"] /
                                                     red["deployments"][0]["activation_bytes"])
    assert _pair(doc, "student", "denoise")["recovered"] is None


def test_mixed_scan_keeps_tasks_apart(mixed):
    _, out = mixed
    doc = _json(out / "compare.json")
    assert {(m["task"], m["method"]) for m in doc["models"]} == {
        ("classify", "teacher"), ("classify", "red"), ("classify", "student"), ("classify", "kd"),
        ("denoise", "teacher"), ("denoise", "red"), ("denoise", "student")}
    assert [m["task"] for m in doc["models"]] == sorted((m["task"] for m in doc["models"]), key=lambda t: t != "classify")
    md = (out / "compare.md").read_text()
    for text in ("| top-1 (%) |", "| test denoising loss (lower is better) |", "Denoisers (one denoising step",
                 "gap (points)", "gap (loss)", metric_of("denoise").rule, "Denoiser runs:", "| denoising loss (best) |",
                 "(classifiers), `denoising_loss_vs_peak_memory.png` (denoisers)"):
        assert text in md, text
    red = _model(doc, "red", "denoise")
    assert f"{red['diffusion_loss']['mean']:.4f}" in md
    rows = list(csv.DictReader((out / "compare.csv").open()))
    drow = next(r for r in rows if r["kind"] == "model" and r["task"] == "denoise" and r["method"] == "red")
    assert drow["top1"] == "" and float(drow["diffusion_loss"]) == red["diffusion_loss"]["mean"]
    assert float(drow["cfd"]) == red["generation"][0]["cfd"]
    crow = next(r for r in rows if r["kind"] == "model" and r["task"] == "classify" and r["method"] == "red")
    assert crow["top1"] != "" and crow["diffusion_loss"] == "" and crow["cfd"] == ""
    for name in ("accuracy_vs_peak_memory.png", "denoising_loss_vs_peak_memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_same_names_never_pool_across_tasks(cls, mixed):
    """A denoiser run given the classifier's architecture names stays apart: a model is keyed by its task too.
    A quality result whose checkpoint is not among the runs is a note."""
    croot, _ = cls
    root, _ = mixed
    c = collect([str(croot / "runs" / "red_s0"), str(root / "runs" / "ddpm_red"),
                 str(root / "runs" / "ddpm_red" / "student" / "quality.json")])
    den = next(r for r in c.runs if r.summary.name == "ddpm_red")
    cl = next(r for r in c.runs if r.summary.name == "red_s0").summary
    den.summary = replace(den.summary, teacher=replace(den.summary.teacher, arch=cl.teacher.arch),
                          student=replace(den.summary.student, arch=cl.student.arch))
    res = build(c, analyze=False)
    assert sorted(m["task"] for m in res["models"] if m["method"] == "red") == ["classify", "denoise"]
    assert {p["task"] for p in res["pairs"]} == {"classify", "denoise"}
    c2 = collect([str(croot / "runs" / "red_s0"), str(root / "runs" / "ddpm_red" / "student" / "quality.json")])
    assert any("quality.json" in n and "not shown" in n for n in build(c2, analyze=False)["notes"])


# --- a task compare has never seen -------------------------------------------------------------------------


@pytest.fixture
def toy_task():
    """A task registered for one test: its figure is the stage summaries' test cross-entropy, lower is better."""

    class ToyTask(ClassifyTask):
        metric = TaskMetric(
            key="xent", summary_key="test_loss", higher_is_better=False, fmt=".3f", title="cross-entropy",
            column="test cross-entropy (lower is better)", short="xent", gap_unit="nats", noun="cross-entropy",
            plural="toys", intro="toys: test cross-entropy", label_suffix="toy",
            onnx=OnnxFigures("toy_figures", "fp32_xent", "int8_xent", "xent", "xent"), plot_file="xent_vs_peak.png",
            plot_title="Cross-entropy vs peak", plot_ylabel="test cross-entropy", plot_what="a test cross-entropy",
            models_heading="Toys:", runs_heading="Toy runs:")

    TASKS.register("toy")(ToyTask)
    yield ToyTask.metric
    TASKS.unregister("toy")


def test_a_new_task_needs_no_compare_edit(cls, toy_task, tmp_path):
    """Runs whose stages say task ``toy`` get the toy metric's columns, tables, rule and plot from its record alone."""
    root, _ = cls
    c = collect([str(root / "runs" / n) for n in ("red_s0", "alone_s0")])
    for run in c.runs:
        s = run.summary
        run.summary = replace(s, **{r: replace(getattr(s, r), task="toy") for r in ("teacher", "student")
                                    if getattr(s, r) is not None})
    res = build(c, analyze=False)
    assert {m["task"] for m in res["models"]} == {"toy"}
    red = next(m for m in res["models"] if m["method"] == "red")
    assert red["label"].endswith(", toy)") and red["xent"]["mean"] == _best(root / "runs" / "red_s0", "student", "test_loss")
    p = next(p for p in res["pairs"] if p["method"] == "red")
    t_x = _best(root / "runs" / "red_s0", "teacher", "test_loss")
    a_x = _best(root / "runs" / "alone_s0", "student", "test_loss")
    assert p["metric"] == "xent" and p["gap"] == pytest.approx(a_x - t_x) and p["teacher_xent"] == t_x
    md = render_markdown(res)
    assert "| test cross-entropy (lower is better) |" in md and toy_task.rule in md and "| cross-entropy (best) |" in md
    assert "toys: test cross-entropy" in md
    cols = csv_columns()
    assert {"xent", "xent_std", "onnx_fp32_xent", "int8_xent", "teacher_xent", "student_alone_xent"} <= set(cols)
    assert cols.index("top1") < cols.index("xent")  # the default task's columns first


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """A tiny bundle and the agent's report on it, filed as deploy files it: (bundles folder, reports folder)."""
    from tests.support.fixtures import tiny_bundle

    root = tmp_path_factory.mktemp("tiny-report")
    bundle = tiny_bundle(root / "bundles" / "tiny-fp32", image_size=16)
    _measure(bundle, root / "reports", "1")
    return root / "bundles", root / "reports"


def test_truncated_and_incomplete_reports_are_skipped_with_a_note(tiny_report, tmp_path, capsys):
    """A truncated report JSON and a report of schema fields only are named on stderr and in compare.md's notes,
    and never become a "None (None, None px)" row."""
    import shutil

    bundles, good = tiny_report
    reports = tmp_path / "reports"
    shutil.copytree(good, reports)
    text = next(reports.rglob("1.json")).read_text()
    cut = reports / "loop0" / "tiny-fp32" / "2.json"
    cut.write_text(text[: len(text) // 2])
    bare = reports / "loop0" / "tiny-fp32" / "3.json"
    bare.write_text(json.dumps({k: json.loads(text)[k] for k in ("schema", "schema_version")}))
    out, runs = tmp_path / "out", tmp_path / "runs"  # not the default runs/: it may hold real runs
    runs.mkdir()
    assert main(["compare", "--runs", str(runs), "--bundles", str(bundles), "--reports", str(reports), "--out", str(out),
                 "--no-analyze"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {cut}: not valid JSON" in err and "truncated" in err
    assert f"skipped {bare}: incomplete device report (no bundle.id, bundle.model.arch" in err
    doc, md = _json(out / "compare.json"), (out / "compare.md").read_text()
    assert any(n.startswith(f"skipped {cut}: not valid JSON") for n in doc["notes"])
    assert f"- skipped {bare}: incomplete device report" in md
    assert "None (None" not in md and [m["arch"] for m in doc["models"]] == ["tiny-conv"]
    (dep,) = doc["models"][0]["deployments"]
    assert dep["report"].endswith("1.json")
    with pytest.raises(UserError, match="incomplete device report"):
        collect([str(bare)])


def test_a_report_of_an_edited_manifest_is_flagged(tiny_report, tmp_path):
    """The device's bundle id differing from the one the server verified or export recorded is said on the row."""
    import shutil

    bundles, good = tiny_report
    reports = tmp_path / "reports"
    shutil.copytree(good, reports)
    path = next(reports.rglob("1.json"))
    report = json.loads(path.read_text())
    device_id = report["bundle"]["id"]
    report["deploy"] = {**report.get("deploy", {}), "bundle_id": device_id, "exported_bundle_id": "f" * 64}
    path.write_text(json.dumps(report))
    out = tmp_path / "out"
    assert main(["compare", "--runs", str(_no_runs(tmp_path)), "--bundles", str(bundles), "--reports", str(reports), "--out", str(out), "--no-analyze"]) == 0
    (dep,) = _json(out / "compare.json")["models"][0]["deployments"]
    assert dep["notes"] == [f"manifest differs from the one recorded at export (device {device_id[:12]}, "
                            f"recorded at export ffffffffffff)"]
    assert dep["notes"][0] in (out / "compare.md").read_text() and dep["notes"][0] in (out / "compare.csv").read_text()
    report["deploy"]["exported_bundle_id"] = device_id
    path.write_text(json.dumps(report))
    assert main(["compare", "--runs", str(_no_runs(tmp_path)), "--bundles", str(bundles), "--reports", str(reports), "--out", str(out), "--no-analyze"]) == 0
    assert _json(out / "compare.json")["models"][0]["deployments"][0]["notes"] == []


def test_slope_columns_and_the_below_resolution_flag(tiny_report, tmp_path):
    """A dynamic-batch bundle's real report: the batch-1 delta and both ORT slopes side by side with the theory. A
    figure below its method's resolution is flagged, never given a bare ratio; one above it gets its ratio and
    resolution."""
    import shutil

    bundles, good = tiny_report
    reports = tmp_path / "reports"
    shutil.copytree(good, reports)
    path = next(reports.rglob("1.json"))
    report = json.loads(path.read_text())
    mem = report["memory"]
    assert [f["method"] for f in mem["per_image"]["figures"]] == ["onnxruntime_slope_opt_off", "onnxruntime_slope_opt_on"]
    theory = mem["theoretical_peak"]["bytes"]
    # pin the figures on either side of their resolutions, so the flag is tested whatever this machine measured
    mem["activation"]["bytes"] = mem["activation"]["resolution_bytes"] // 2
    off, on = mem["per_image"]["figures"]
    off["resolution_bytes"], off["bytes"] = 1024, 3 * theory
    on["resolution_bytes"], on["bytes"] = 4 * theory, 2 * theory
    path.write_text(json.dumps(report))
    out = tmp_path / "out"
    assert main(["compare", "--runs", str(_no_runs(tmp_path)), "--bundles", str(bundles), "--reports", str(reports), "--out", str(out), "--no-analyze"]) == 0
    (dep,) = _json(out / "compare.json")["models"][0]["deployments"]
    by = {x["method"]: x for x in dep["measures"]}
    assert list(by) == ["onnxruntime_rss_delta", "onnxruntime_slope_opt_off", "onnxruntime_slope_opt_on"]
    assert by["onnxruntime_rss_delta"]["below_resolution"] and not by["onnxruntime_slope_opt_off"]["below_resolution"]
    assert by["onnxruntime_slope_opt_off"]["ratio_liveness"] == pytest.approx(3.0) and by["onnxruntime_slope_opt_on"][
        "below_resolution"]
    md = (out / "compare.md").read_text()
    table = md.split("## Theory against each measurement")[1].split("\n## ")[0]
    assert ("| ORT RSS delta (batch 1 unless noted) | ORT per image, optimisations off | ORT per image, optimisations "
            "on |") in table
    row = next(line for line in table.splitlines() if "tiny-conv" in line)
    assert "96.00 KiB: below resolution (192.00 KiB)" in row
    assert "/image: 3.00x / n/a (resolution 1.00 KiB)" in row  # this bundle's manifest has no in-place peak
    assert f"below resolution ({_kib(4 * theory)})" in row
    # the devices table flags the batch-1 figure too, beside its resolution, instead of its ratio
    devices = md.split("## Measured on devices")[1].split("\n## ")[0]
    assert "| 96.00 KiB | 192.00 KiB | below resolution (192.00 KiB) |" in devices
    rows = [r for r in csv.DictReader((out / "compare.csv").open()) if r["kind"] == "measure"]
    assert [r["measure"] for r in rows] == list(by) and [r["below_resolution"] for r in rows] == ["True", "False", "True"]
    assert float(rows[1]["ratio_liveness"]) == pytest.approx(3.0) and rows[1]["per_image"] == "True"
    assert (out / "memory_measured_vs_theory.png").is_file()


def _kib(b: int) -> str:
    from redistill.memory import fmt_bytes

    return fmt_bytes(b)

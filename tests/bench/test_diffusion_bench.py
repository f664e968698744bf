"""The diffusion benchmark end to end on a tiny generated data set (slow: it trains, samples, exports and deploys)."""

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import PYTHON, REPO, cli_env


@pytest.mark.slow
def test_diffusion_bench_runs_every_step_and_writes_its_page(tiny_images, tmp_path):
    from deploy.loopback import sshd_available

    why = sshd_available()
    if why:
        pytest.skip(f"no loopback sshd: {why}")
    preset = (REPO / "train" / "configs" / "ddpm_bench.yaml").read_text()
    for old, new in (("ch: 32,", "ch: 8,"), ("train_subset: 40000", "train_subset: 0"), ("test_subset: 2000", "test_subset: 0"),
                     ("timesteps: 1000", "timesteps: 20"), ("batch_size: 64", "batch_size: 16"), ("epochs: 3", "epochs: 1"),
                     ("val_fraction: 0.02", "val_fraction: 0.1")):
        assert old in preset, old
        preset = preset.replace(old, new)
    (tmp_path / "tiny.yaml").write_text(preset)
    env = cli_env()
    clf = subprocess.run([PYTHON, "-m", "redistill.cli", "distill", "quick", "method=teacher", "name=clf", "epochs=1",
                          f"data.root={tiny_images}", f"out_dir={tmp_path / 'runs'}"], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert clf.returncode == 0, clf.stderr[-2000:]
    args = ["--preset", str(tmp_path / "tiny.yaml"), "--name", "tb", "--runs", str(tmp_path / "runs"),
            "--bundles", str(tmp_path / "bundles"), "--reports", str(tmp_path / "reports"), "--n", "8", "--steps", "3",
            "--ddpm-n", "2", "--real", "16", "--data-root", str(tiny_images), "--results", str(tmp_path / "res" / "diffusion"),
            "--classifier", str(tmp_path / "runs" / "clf" / "teacher" / "best.pt")]

    def bench(*extra, timeout=1200):
        r = subprocess.run([PYTHON, "-m", "bench.diffusion_bench", *args, *extra], env=env, capture_output=True, text=True,
                           timeout=timeout, cwd=REPO)
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
        return r.stdout, (tmp_path / "res" / "diffusion.md").read_text()

    _, page = bench("--parts", "base")
    assert "classifier-feature Frechet distance (CFD)" in page and "**No FID**" in page
    assert "## RED site placement" not in page
    for label in ("teacher", "student+RED", "student alone", "real training images (floor)"):
        assert f"| {label}" in page
    facts = json.loads((tmp_path / "res" / "diffusion.json").read_text())
    assert facts["facts"]["theory_ratio_red"] > 3.5
    rows = {row["network"]: row for row in facts["rows"]}
    assert rows["student+RED"]["red_blocks"] == 5 and rows["student alone"]["red_blocks"] == 0
    assert all(row["preflight_passed"] and row["verify_max_abs_diff"] < row["verify_atol"] for row in rows.values())
    assert (tmp_path / "res" / "diffusion" / "student-RED-ddim.png").is_file()
    assert (tmp_path / "res" / "diffusion" / "compare" / "compare.md").is_file()

    # the placement part alone: the base run's teacher is reused, the base section of the page is unchanged
    out, both = bench("--parts", "placement")
    assert "train teacher" not in json.loads((tmp_path / "runs" / "tb-work" / "placement" / "state.json").read_text())
    assert both.split("\n## RED site placement")[0] == page.split("\n## Samples")[0]
    record = json.loads((tmp_path / "res" / "diffusion.json").read_text())
    assert record["rows"] == facts["rows"] and record["command"] == facts["command"]
    prow = {row["network"]: row for row in record["placement"]["rows"]}
    assert [prow[k]["red_blocks"] for k in ("placement teacher", "student+RED paper sites",
                                            "student+RED paper sites alpha 0.1")] == [0, 10, 10]
    assert all(row["preflight_passed"] and row["verify_max_abs_diff"] < row["verify_atol"] for row in prow.values())
    assert prow["student+RED paper sites"]["steps"] == rows["student+RED"]["steps"]
    assert "--parts placement" in record["placement"]["command"]
    assert record["placement"]["teacher"]["checkpoint"].endswith("runs/tb/teacher/best.pt")
    cfgs = [yaml.safe_load((tmp_path / "res" / "diffusion" / "runs" / f"tb{s}" / "config.yaml").read_text())
            for s in ("-paper", "-paper-alpha0.1")]
    assert [c["red"]["alpha"] for c in cfgs] == [1.0, 0.1] and len(cfgs[0]["red"]["sites"]) == 10
    assert "the teacher of the runs above (the same sha256)" in both and "the classifier of the table above" in both
    for label in ("student+RED paper sites (`unet-2-221`)", "student+RED (`unet-2-221`, run above)",
                  "teacher (`unet-1-222`, this part)", "real training images (floor, this part)"):
        assert f"| {label} |" in both
    assert (tmp_path / "res" / "diffusion" / "placement" / "student-RED-paper-sites-alpha-0.1-ddim.png").is_file()
    assert "diffusion/placement/student-RED-paper-sites-ddim.png" in both

    # the page again from the copied run files alone: the same figures
    _, again = bench("--pages-only", timeout=300)
    assert again.split("## Setup")[1] == both.split("## Setup")[1]
    # resumable: a second run skips every finished step of both parts
    out, _ = bench(timeout=600)
    assert out.count("skipped") >= 20, out[-2000:]

    # without the base run's teacher on disk the placement part trains it again (as NAME-teacher) and says so
    shutil.rmtree(tmp_path / "runs" / "tb" / "teacher")
    for d in ("tb-paper", "tb-paper-alpha0.1", "tb-work/placement"):
        shutil.rmtree(tmp_path / "runs" / d)
    _, retrained = bench("--parts", "placement")
    record = json.loads((tmp_path / "res" / "diffusion.json").read_text())
    assert "train teacher" in record["placement"]["steps"]
    assert record["placement"]["teacher"]["checkpoint"].endswith("runs/tb-teacher/teacher/best.pt")
    assert "trained again by this part with the same preset and seed" in retrained


def test_placement_section_renders_from_its_files_beside_the_committed_page(tmp_path, monkeypatch):
    """The committed run files plus a placement part's (made here from the base run's, relabelled): --pages-only adds
    the side-by-side section and its grids and leaves every line of the base page before them as committed."""
    from bench import diffusion_bench
    from bench.diffusion_placement import PLACEMENT_RUNS, TEACHER
    from train.config import load_config

    results = REPO / "bench" / "results"
    res = tmp_path / "bench" / "results"
    shutil.copytree(results / "diffusion", res / "diffusion")
    for name in ("diffusion.json", "diffusion_deploy.json", "diffusion_remarks.md"):
        shutil.copyfile(results / name, res / name)
    d, p = res / "diffusion", res / "diffusion" / "placement"
    for stale in (p, d / "runs" / "ddpm-bench-teacher", *(d / "runs" / f"ddpm-bench{sfx}" for _, sfx, _ in PLACEMENT_RUNS)):
        shutil.rmtree(stale, ignore_errors=True)  # the committed placement part: this test makes its own
    shutil.copytree(d / "runs" / "ddpm-bench" / "teacher", p / "teacher")
    paper = [dict(vars(s)) for s in load_config("ddpm_bench").red.sites]
    record = json.loads((res / "diffusion.json").read_text())
    by = {r["network"]: r for r in record["rows"]}
    base_state = json.loads((d / "state.json").read_text())
    state = {k: v for k, v in base_state.items() if not k.startswith("train")}
    deploy = json.loads((res / "diffusion_deploy.json").read_text())
    bundles = {"ddpm-bench-teacher-fp32": f"ddpm-bench-{TEACHER.replace(' ', '-')}-fp32"}
    (p / "quality").mkdir(parents=True)
    shutil.copyfile(d / "quality" / "teacher.json", p / "quality" / "placement-teacher.json")
    shutil.copyfile(d / "quality" / "real.json", p / "quality" / "real.json")
    shutil.copytree(d / "samples" / "teacher-ddim", p / "samples" / "placement-teacher-ddim")
    rows = [dict(by["teacher"], network=TEACHER)]
    for label, suffix, alpha in PLACEMENT_RUNS:
        run = d / "runs" / f"ddpm-bench{suffix}"
        shutil.copytree(d / "runs" / "ddpm-bench", run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["red"].update(sites=paper, alpha=alpha)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        s = label.replace("+", "-").replace(" ", "-")
        shutil.copyfile(d / "quality" / "student-RED.json", p / "quality" / f"{s}.json")
        shutil.copyfile(d / "student-RED-ddim.png", p / f"{s}-ddim.png")
        state[f"train {label}"] = dict(base_state["train teacher and student+RED"])
        bundles["ddpm-bench-student-RED-fp32" if alpha == 1.0 else "ddpm-bench-student-alone-fp32"] = f"ddpm-bench-{s}-fp32"
        rows.append(dict(by["student+RED"], network=label))
    for r in deploy["results"]:
        r["bundle"] = "bundles/" + bundles[r["bundle"].rstrip("/").split("/")[-1]]
    (p / "deploy.json").write_text(json.dumps(deploy))
    (p / "state.json").write_text(json.dumps(state))
    record["placement"] = {"command": "python -m bench.diffusion_bench --parts placement", "machine": record["machine"],
                           "rows": rows}
    (res / "diffusion.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    assert diffusion_bench.main(["--pages-only", "--remarks", "bench/results/diffusion_remarks.md"]) == 0
    page, committed = (res / "diffusion.md").read_text(), (results / "diffusion.md").read_text()
    head, tail = page.split("\n## RED site placement")
    assert head == committed.split("\n## RED site placement")[0].split("\n## Remarks")[0]
    assert "Command: `python -m bench.diffusion_bench --parts placement` (part `placement`" in tail
    assert "the teacher of the runs above (the same sha256)" in tail and "the classifier of the table above" in tail
    assert "`paper`, the paper code's (pipeline_diffusion/config/reedx2_dist_config.yaml" in tail
    assert "10 blocks): head out -> down.1.0 out, down.1.0 in -> down.2.0 in" in tail
    for cells in ("| student+RED (`unet-2-221`, run above) | outputs | 1 | 5 | 0.07968 |",
                  "| student+RED paper sites (`unet-2-221`) | paper | 1 | 10 | 0.07968 |",
                  "| student+RED paper sites alpha 0.1 (`unet-2-221`) | paper | 0.1 | 10 |",
                  "| teacher (`unet-1-222`, this part) | - | - | 0 | 0.03547 | 10.94 |"):
        assert cells in tail
    assert "mean 1 - cos 0.2104 at alpha 0.1" in tail
    assert "![student+RED paper sites alpha 0.1](diffusion/placement/student-RED-paper-sites-alpha-0.1-ddim.png)" in tail
    assert tail.index("## Remarks") < tail.index("## Samples")


def test_a_classifier_training_cut_short_is_run_again(tmp_path):
    """best.pt exists after the first better epoch: a classifier step stopped before it finished must run on the
    next run, while a classifier on disk that this benchmark did not train is used as it is."""
    from types import SimpleNamespace

    from bench.diffusion_bench import _classifier
    from bench.steps import Steps

    ck = tmp_path / "clf" / "best.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"weights")
    ran = []
    steps = Steps(tmp_path / "state.json")
    steps.run = lambda name, argv, log: ran.append(name)
    a = SimpleNamespace(classifier=str(ck), runs=str(tmp_path / "runs"), data_root="data")
    _classifier(a, steps, ["redistill"], tmp_path)
    assert ran == []
    steps.state["train the CIFAR-10 classifier for CFD"] = {"done": False, "seconds_before": 60.0}
    _classifier(a, steps, ["redistill"], tmp_path)
    assert ran == ["train the CIFAR-10 classifier for CFD"]

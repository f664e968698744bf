"""The diffusion benchmark end to end on a tiny generated data set (slow: it trains, samples, exports and deploys)."""

import json
import subprocess

import pytest

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
    r = subprocess.run([PYTHON, "-m", "bench.diffusion_bench", *args], env=env, capture_output=True, text=True,
                       timeout=1200, cwd=REPO)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    page = (tmp_path / "res" / "diffusion.md").read_text()
    assert "classifier-feature Frechet distance (CFD)" in page and "**No FID**" in page
    for label in ("teacher", "student+RED", "student alone", "real training images (floor)"):
        assert f"| {label}" in page
    facts = json.loads((tmp_path / "res" / "diffusion.json").read_text())
    assert facts["facts"]["theory_ratio_red"] > 3.5
    rows = {row["network"]: row for row in facts["rows"]}
    assert rows["student+RED"]["red_blocks"] == 5 and rows["student alone"]["red_blocks"] == 0
    assert all(row["preflight_passed"] and row["verify_max_abs_diff"] < row["verify_atol"] for row in rows.values())
    assert (tmp_path / "res" / "diffusion" / "student-RED-ddim.png").is_file()
    assert (tmp_path / "res" / "diffusion" / "compare" / "compare.md").is_file()
    # the page again from the copied run files alone: the same figures
    rewrite = subprocess.run([PYTHON, "-m", "bench.diffusion_bench", *args, "--pages-only"], env=env, capture_output=True,
                             text=True, timeout=300, cwd=REPO)
    assert rewrite.returncode == 0, rewrite.stderr[-2000:]
    again = (tmp_path / "res" / "diffusion.md").read_text()
    assert again.split("## Setup")[1] == page.split("## Setup")[1]
    # resumable: a second run skips every finished step
    again = subprocess.run([PYTHON, "-m", "bench.diffusion_bench", *args], env=env, capture_output=True, text=True,
                           timeout=600, cwd=REPO)
    assert again.returncode == 0 and again.stdout.count("skipped") >= 10, again.stdout[-2000:]

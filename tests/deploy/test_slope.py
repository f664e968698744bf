"""Per-image memory by slope: the fit on synthetic points, the real agent with ONNX Runtime on a tiny dynamic-batch
bundle (each point a fresh process, graph optimisations off and on), a batch-1-only bundle said so, TensorRT's
device memory per profile batch through the FAKE tensorrt of tests/deploy/fake_tensorrt.py, and the option."""

import json
import subprocess
import sys

import numpy as np
import pytest

from deploy.agent import phases
from deploy.agent.bundle import load_and_verify_bundle
from deploy.agent.contract import ERROR_PREFIX, EXIT_REFUSED, batch_list
from deploy.agent.slope import fit_line, measure_per_image, slope_figure, slope_resolution
from tests.deploy.fake_tensorrt import FAKE_BYTES_PER_IMAGE, device_memory
from tests.support.agent import AGENT_DIR, agent_args, install_fake_trt


def test_fit_recovers_an_exact_line():
    fit = fit_line([1, 4, 16, 64], [5000 + 300 * b for b in (1, 4, 16, 64)])
    assert fit["a_bytes"] == pytest.approx(5000) and fit["b_bytes"] == pytest.approx(300)
    assert fit["max_abs_residual_bytes"] == pytest.approx(0, abs=1e-6) and fit["r2"] == pytest.approx(1)
    assert fit["b_stderr_bytes"] == pytest.approx(0, abs=1e-6)


def test_fit_of_noisy_points_is_least_squares():
    x, y = [1, 2, 4, 8], [1100.0, 1900.0, 4300.0, 7900.0]
    fit = fit_line(x, y)
    b, a = np.polyfit(x, y, 1)
    assert (fit["a_bytes"], fit["b_bytes"]) == (pytest.approx(a), pytest.approx(b))
    residuals = np.asarray(y) - (a + b * np.asarray(x))
    assert fit["residuals_bytes"] == pytest.approx(list(residuals))
    assert fit["max_abs_residual_bytes"] == pytest.approx(np.max(np.abs(residuals)))
    assert fit["r2"] == pytest.approx(1 - np.sum(residuals ** 2) / np.sum((np.asarray(y) - np.mean(y)) ** 2))
    assert 0.99 < fit["r2"] < 1
    with pytest.raises(ValueError, match="at least two different batch sizes"):
        fit_line([4, 4], [1, 2])
    assert fit_line([1, 2], [3, 5])["b_stderr_bytes"] is None and fit_line([1, 2], [3, 3])["r2"] is None


def test_resolution_is_the_larger_of_quantum_and_point_error_over_the_span():
    assert slope_resolution([1, 4, 16, 64], 4096, 100) == pytest.approx(2 * 4096 / 63)
    # four points: the largest residual understates a point's error by sqrt(4 / 2) on average
    assert slope_resolution([1, 4, 16, 64], 4096, 63 * 1024) == pytest.approx(2 * 1024 * 2 ** 0.5)
    assert slope_resolution([1, 2, 4], 4096, 3000) == pytest.approx(2 * 3000 * 3 ** 0.5 / 3)
    assert slope_resolution([1, 4], 4096, 0) == float("inf")  # two points fit any line: nothing is resolved
    # a slope smaller than what its residuals allow is below its resolution
    points = [{"batch": b, "bytes": 10000 + 50 * b + (3000 if b == 4 else 0)} for b in (1, 4, 16, 64)]
    fig = slope_figure("m", "label", points, 4096, "a page", "what", "how")
    assert fig["bytes"] < fig["resolution_bytes"] and fig["per_image"] is True and fig["unit"] == "bytes per image"
    assert fig["points"] == points and "batch span 1-64" in fig["resolution_how"]


def test_unmeasurable_bundles_and_backends_are_said_not_failed():
    def never(_):
        raise AssertionError("no point is measured")

    fixed = measure_per_image((1, 4, 16), False, "onnxruntime", ["CPUExecutionProvider"], never)
    assert fixed["figures"] == [] and "--dynamic-batch" in fixed["skipped"] and fixed["batches"] == [1, 4, 16]
    assert "at least three" in measure_per_image((4, 1, 4), True, "onnxruntime", None, never)["skipped"]
    assert measure_per_image((), True, "onnxruntime", None, never)["skipped"] == "--slope-batches none"
    cuda = measure_per_image((1, 4, 16), True, "onnxruntime", ["CUDAExecutionProvider", "CPUExecutionProvider"], never)
    assert cuda["figures"] == [] and "--ort-device cpu" in cuda["skipped"]


def test_slope_batches_option():
    assert batch_list("1,4,16,64") == (1, 4, 16, 64) and batch_list("none") == ()
    args = agent_args("b", "c")
    assert args.slope_batches == (1, 4, 16, 64)  # the default


@pytest.mark.parametrize("value, message", [("4,16", "--slope-batches needs at least three different batch sizes "
                                                      "(got 4,16)"),
                                            ("0,4", "--slope-batches must be at least 1 (got 0)"),
                                            ("1,x", "invalid batch_list value: '1,x'")])
def test_bad_slope_batches_are_refused(value, message, capsys):
    with pytest.raises(SystemExit) as e:
        agent_args("b", "c", "--slope-batches", value)
    assert e.value.code == EXIT_REFUSED
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(ERROR_PREFIX + " bad-argument: ") and message in last


def test_real_agent_measures_onnxruntime_per_image(bundles, tmp_path):
    """The copied-folder agent run as on a device: one fresh process per batch and setting, both fits reported."""
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, str(AGENT_DIR), "--bundle", str(bundles["fp32"]), "--json-out", str(out),
                        "--backend", "onnxruntime", "--warmup", "1", "--iters", "3", "--mem-iters", "2", "--threads", "1",
                        "--slope-batches", "1,2,4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    section = json.loads(out.read_text())["memory"]["per_image"]
    assert section["batches"] == [1, 2, 4] and section["skipped"] is None
    figs = {f["method"]: f for f in section["figures"]}
    assert sorted(figs) == ["onnxruntime_slope_opt_off", "onnxruntime_slope_opt_on"]
    assert figs["onnxruntime_slope_opt_off"]["graph_optimization"] == "off"
    assert "ORT_DISABLE_ALL" in figs["onnxruntime_slope_opt_off"]["what"]
    assert "ORT_ENABLE_ALL" in figs["onnxruntime_slope_opt_on"]["what"]
    # the tiny net holds conv1's 16x64x64 and conv2's 16x32x32 float32 outputs at once: 320 KiB per image
    per_image = 16 * 4 * (64 * 64 + 32 * 32)
    for f in figs.values():
        assert [pt["batch"] for pt in f["points"]] == [1, 2, 4]
        assert all(pt["hwm_reset"] and pt["baseline_bytes"] > 0 for pt in f["points"])
        assert f["bytes"] == round(f["fit"]["b_bytes"]) and 0.8 * per_image < f["bytes"] < 1.3 * per_image, f
        assert f["fit"]["r2"] > 0.95 and f["quantum_bytes"] > 0 and f["what"] and f["how"]
        error = f["fit"]["max_abs_residual_bytes"] * 3 ** 0.5
        assert f["resolution_bytes"] == pytest.approx(2 * max(f["quantum_bytes"], error) / 3, abs=1)
    assert p.stderr.count("agent: slope: batch") == 6  # 3 batches x 2 settings, each logged by its own process


@pytest.mark.parametrize("version", ["8.2.1.8", "10.3.0"])
def test_tensorrt_device_memory_per_profile_batch_against_fakes(bundles, tmp_path, monkeypatch, version):
    """One engine per batch, its one optimisation profile at that batch; the FAKE engine's device memory grows by
    FAKE_BYTES_PER_IMAGE per image, so the slope is exactly that."""
    calls = install_fake_trt(monkeypatch, version)
    base = 23456 if version.startswith("10") else 12345
    bundle = str(bundles["fp32"])
    manifest, bid = load_and_verify_bundle(bundle)

    def run_point(extra):
        args = agent_args(bundle, tmp_path / "engines", "--backend", "tensorrt", *extra)
        return phases.phase_slope_point(args, bundle, manifest, bid)

    section = measure_per_image((1, 2, 4), True, "tensorrt", None, run_point)
    (fig,) = section["figures"]
    assert fig["method"] == "tensorrt_slope" and fig["bytes"] == FAKE_BYTES_PER_IMAGE
    assert [(pt["batch"], pt["bytes"]) for pt in fig["points"]] == [(b, device_memory(base, b)) for b in (1, 2, 4)]
    assert fig["fit"]["max_abs_residual_bytes"] == pytest.approx(0, abs=1e-6) and fig["resolution_bytes"] == 1
    attr = "device_memory_size_v2" if version.startswith("10") else "device_memory_size"
    assert all(pt["attr"] == attr for pt in fig["points"]) and attr in fig["how"]
    for b in (1, 2, 4):
        assert f"profile.set_shape(input, ({b}, 3, 64, 64), ({b}, 3, 64, 64), ({b}, 3, 64, 64))" in calls
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "engines").glob("*.engine")) == [
        "b1.engine", "b2.engine", "b4.engine"]

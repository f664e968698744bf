"""A DDPM U-Net denoiser through the same export pipeline as the classifiers: fold, export (x, t -> eps),
TensorRT 8.2 pre-flight, ONNX Runtime vs PyTorch on noisy test images, INT8 calibration, bundle manifest."""

import numpy as np
import onnx
import pytest
import torch

from export.bundle import verify_bundle
from train.fold import fold_batchnorm
from export.onnx_export import export_onnx, graph_io
from export.pipeline import ExportOptions, run_export
from export.verify import FP32_ATOL, denoise_inputs, run, session, take, torch_logits
from redistill.errors import UserError
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.models import build_model


def _bn_count(model):
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_fold_two_input_unet_with_red_block(denoiser_checkpoint):
    ck = load_checkpoint(denoiser_checkpoint)
    model = model_from_checkpoint(ck)
    assert _bn_count(model) == 2  # the RED block's gate and encode BNs, with non-trivial running stats
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_var.sub(1).abs().max() > 1e-3
    folded = fold_batchnorm(model, 32)
    assert _bn_count(folded) == 0 and folded.fold_stats == {"into_conv": 2, "as_affine": 0}
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0.0, 500.0, 999.0])
    with torch.no_grad():
        assert torch.allclose(model(x, t), folded(x, t), atol=1e-4)


def test_denoiser_bundle_matches_pytorch_and_describes_every_input(denoiser_bundle, denoiser_checkpoint, image_root):
    path, _ = denoiser_bundle
    m = verify_bundle(path)
    assert m["schema_version"] == 2 and m["task"] == "denoise" and "input" not in m
    assert [(i["name"], i["shape"], i["dtype"]) for i in m["inputs"]] == [("x", [1, 3, 32, 32], "float32"),
                                                                         ("t", [1], "float32")]
    assert m["inputs"][1]["range"] == [0, 999]
    assert m["output"] == {"name": "eps", "shape": [1, 3, 32, 32], "dtype": "float32"}
    assert m["diffusion"]["timesteps"] == 1000 and m["model"]["checkpoint"]["weights"] == "ema"
    # no fake top-1: the denoising MSE of PyTorch and ONNX on the verification inputs instead
    assert m["accuracy"] is None
    v, d = m["verification"]["fp32"], m["denoising"]
    assert v["passed"] and v["max_abs_diff"] <= FP32_ATOL == 1e-4 and v["samples"] == 8
    assert v["timesteps"][0] == 0 and v["timesteps"][-1] == 999
    assert d["pytorch_mse"] == pytest.approx(d["fp32_onnx_mse"], abs=1e-6) and d["pytorch_mse"] > 0
    assert m["memory"]["peak_bytes"] > 0
    assert m["preflight"]["fp32"]["target"] == "tx2" and "InstanceNormalization" in m["preflight"]["fp32"]["op_counts"]
    proto = onnx.load(str(path / "model.onnx"))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert [i["name"] for i in graph_io(proto)] == ["x", "t"] and graph_io(proto, outputs=True)[0]["name"] == "eps"
    assert m["onnx"]["opset"] == 13 and proto.ir_version == 7
    # the reference files reproduce with ONNX Runtime
    ref = {k: np.load(path / f) for k, f in m["reference"]["inputs"].items()}
    assert ref["t"].dtype == np.float32 and ref["x"].shape == (4, 3, 32, 32) and ref["t"][:2].tolist() == [0.0, 999.0]
    y = np.load(path / "reference/outputs.npy")
    assert np.abs(run(session(proto), ref) - y).max() <= 1e-5
    # independently: fresh noisy test images at other seeded time steps, ONNX Runtime vs the PyTorch checkpoint
    from train.config import DataConfig
    from train.data import load_data

    ck = load_checkpoint(denoiser_checkpoint)
    data = load_data(DataConfig(root=str(image_root), image_size=32), mean=ck["mean"], std=ck["std"], need_train=False)
    x0, labels = take(data.test, 6)
    assert x0.min() >= -1.0001 and x0.max() <= 1.0001  # images in [-1, 1]
    feeds, _ = denoise_inputs(ck, x0, labels, seed=7)
    diff = np.abs(torch_logits(model_from_checkpoint(ck), feeds) - run(session(proto), feeds)).max()
    assert diff <= 1e-4


def test_conditional_unet_exports_int32_label():
    torch.manual_seed(0)
    model = build_model("unet-2-221", 10, 32, ch=16, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=1).eval()
    proto = export_onnx(model, 32)
    assert [(i["name"], i["shape"], i["dtype"]) for i in graph_io(proto)] == [
        ("x", [1, 3, 32, 32], "float32"), ("t", [1], "float32"), ("y", [1], "int32")]
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32),
             "t": np.array([0, 400, 999], np.float32), "y": np.array([1, 10, 3], np.int32)}
    assert np.abs(torch_logits(model, feeds) - run(session(proto), feeds)).max() <= 1e-4


def test_denoiser_int8_reports_eps_error(denoiser_checkpoint, denoiser_bundle, tmp_path):
    path, _ = run_export(ExportOptions(str(denoiser_checkpoint), out=str(tmp_path / "q"), target="cpu-int8",
                                       calib_images=8, verify_images=4, reference_images=2, quiet=True))
    m = verify_bundle(path)
    assert m["precision"] == "int8" and m["quantization"]["format"] == "QDQ"
    assert "noised by q_sample" in m["quantization"]["calibration"]["selection"]
    # no search for a denoiser (it judges top-1): auto means minmax, nothing kept in float, and the manifest says so
    assert m["quantization"]["calibration"]["method"] == "minmax" and m["quantization"]["search"] is None
    assert m["quantization"]["float_nodes"] == [] and "no search for denoisers" in m["quantization"]["search_note"]
    q = m["verification"]["int8"]
    assert q["max_abs_diff"] > 0 and q["atol"] is None
    assert m["denoising"]["int8_onnx_mse"] == pytest.approx(q["mse_got"])
    assert m["reference"]["atol"] >= q["max_abs_diff"]
    proto = onnx.load(str(path / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    # export-report: denoising MSE (not top-1) and one-step latency of both bundles, every input fed
    from bench.export_report import write_report

    r = write_report(denoiser_bundle[0], path, tmp_path / "report", runs=3, warmup=1)
    assert r["task"] == "denoise" and r["int8"]["mse"] == pytest.approx(q["mse_got"])
    assert r["fp32"]["latency"]["median_ms"] > 0 and r["int8"]["latency"]["batch"] == 1
    md = (tmp_path / "report.md").read_text()
    assert "| PyTorch |" in md and "| INT8 |" in md and "denoising MSE" in md


def test_denoiser_dynamic_batch_refused(denoiser_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--dynamic-batch is not supported for denoisers.*drop --dynamic-batch"):
        run_export(ExportOptions(str(denoiser_checkpoint), out=str(tmp_path / "b"), dynamic_batch=True, quiet=True))
    assert not (tmp_path / "b").exists()

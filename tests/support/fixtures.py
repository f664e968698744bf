"""Tiny bundles (FP32 and Q/DQ INT8) for the tests: a 3-layer conv net, seconds to build;
and a tiny DDPM U-Net denoiser checkpoint (exported with the real pipeline by the tests)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union


def tiny_bundle(out_dir: Union[str, Path], int8: bool = False, image_size: int = 64, count: int = 4, seed: int = 0) -> Path:
    """Export a small conv net with the legacy exporter at opset 13 and write it as a bundle."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from torch import nn

    from export.bundle import write_bundle

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    x = torch.randn(count, 3, image_size, image_size)
    buf = io.BytesIO()
    torch.onnx.export(net, x[:1], buf, dynamo=False, opset_version=13, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = buf.getvalue()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if int8:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{"input": x[i:i + 1].numpy()} for i in range(count)])

            def get_next(self):
                return next(self.items, None)

        src, dst = out_dir.parent / f".{out_dir.name}.fp32.onnx", out_dir.parent / f".{out_dir.name}.int8.onnx"
        src.write_bytes(model)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        model = dst.read_bytes()
        src.unlink()
        dst.unlink()
    xs = x.numpy().astype(np.float32)
    ys = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": xs})[0].astype(np.float32)

    def npy(a):
        b = io.BytesIO()
        np.save(b, a)
        return b.getvalue()

    manifest = {
        "name": out_dir.name,
        "created": "2026-01-01T00:00:00Z",
        "model": {"arch": "tiny-conv", "method": "fixture", "role": "student", "num_classes": 10,
                  "classes": [str(i) for i in range(10)], "image_size": image_size},
        "input": {"name": "input", "shape": ["batch", 3, image_size, image_size], "dtype": "float32",
                  "layout": "NCHW", "dynamic_batch": True},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "preprocess": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": 1.0},
        "precision": "int8" if int8 else "fp32",
        "target": "orin-int8" if int8 else "cpu", "backend": "tensorrt" if int8 else "onnxruntime",
        "onnx": {"file": "model.onnx", "opset": 13, "ir_version": None, "producer": "pytorch"},
        "reference": {"inputs": "reference/inputs.npy", "outputs": "reference/outputs.npy", "count": count, "atol": 1e-4},
        # 16 x H x W float32 after the first conv, the largest activation of this net
        "memory": {"peak_bytes": 16 * image_size * image_size * 4 + 3 * image_size * image_size * 4},
        "accuracy": None, "verification": None, "versions": {"torch": torch.__version__},
    }
    files = {"model.onnx": model, "reference/inputs.npy": npy(xs), "reference/outputs.npy": npy(ys)}
    return write_bundle(out_dir, files, manifest)


#: a tiny DDPM U-Net: seconds to build, export and verify on a laptop CPU
TINY_UNET = {"ch": 16, "ch_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 1}
TINY_DIFFUSION = {"schedule": "linear", "timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


def tiny_denoiser_checkpoint(path: Union[str, Path], data_root: Union[str, Path], classes, num_classes: int = 0,
                             arch: str = "unet-2-221", red: bool = True, seed: int = 0) -> Path:
    """A denoiser checkpoint as training writes it (EMA weights, schedule, build kwargs), with one RED block.

    The BatchNorms of the RED block get non-trivial running statistics from a few train-mode forwards,
    so that folding them is really exercised.
    """
    import torch

    from train.checkpoint import make_payload, save_checkpoint
    from train.config import RunConfig
    from train.models import build_model, example_inputs
    from train.red import plan_sites, insert_red_blocks

    torch.manual_seed(seed)
    model = build_model(arch, num_classes, 32, **TINY_UNET)
    plans = []
    if red:
        teacher = build_model("unet-1-222", num_classes, 32, **TINY_UNET)
        plans = plan_sites(model, teacher, [{"student": "head", "where": "out", "teacher": "down.1.0"}], 32, 1.0)
        insert_red_blocks(model, plans)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            ex = example_inputs(model, 32, batch=4)
            x = torch.randn(ex[0].shape, generator=g) * 2 + 0.5
            t = torch.randint(0, 1000, (4,), generator=g).float()
            rest = (torch.randint(0, num_classes + 1, (4,), generator=g).int(),) if num_classes else ()
            model(x, t, *rest)
    model.eval()
    cfg = RunConfig()
    cfg.data.root = str(data_root)
    cfg.data.image_size = 32
    cfg.name = "tiny-denoiser"
    payload = make_payload(
        model, arch=arch, role="student", method="red" if red else "student", num_classes=num_classes,
        image_size=32, classes=list(classes), mean=(0.5,) * 3, std=(0.5,) * 3, width_mult=1.0, plans=plans,
        red_distance="cosine", config=cfg.to_dict(), epoch=1, history=[], best_val=0.0, build_kwargs=dict(TINY_UNET),
        extra={"ema": model.state_dict(), "diffusion": dict(TINY_DIFFUSION)},
    )
    return save_checkpoint(payload, path)

"""Tiny bundles (FP32 and Q/DQ INT8) for tests and the loopback bench dry run: a 3-layer conv net, seconds to build."""

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
        "target": "orin" if int8 else "cpu",
        "onnx": {"file": "model.onnx", "opset": 13, "ir_version": None, "producer": "pytorch"},
        "reference": {"inputs": "reference/inputs.npy", "outputs": "reference/outputs.npy", "count": count, "atol": 1e-4},
        # 16 x H x W float32 after the first conv, the largest activation of this net
        "memory": {"peak_bytes": 16 * image_size * image_size * 4 + 3 * image_size * image_size * 4},
        "accuracy": None, "verification": None, "versions": {"torch": torch.__version__},
    }
    files = {"model.onnx": model, "reference/inputs.npy": npy(xs), "reference/outputs.npy": npy(ys)}
    return write_bundle(out_dir, files, manifest)

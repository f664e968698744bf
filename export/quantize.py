"""INT8 post-training static quantization with onnxruntime.quantization, in the form TensorRT accepts.

QDQ format, per-channel symmetric int8 weights, symmetric int8 activations (every zero point 0).
neural-compressor is not used: 3.x has no ONNX quantization, 2.6 needs onnx<1.19, and
onnx-neural-compressor 1.0 pins numpy<2 and dropped the ReLU6 Clip nodes (see docs/export.md).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import numpy as np
import onnx

from export.calibration import CALIBRATION
from export.preflight import zero_point_problems
from redistill.errors import UserError


class _Reader:
    """Feeds calibration samples (one array per graph input) one batch at a time, the shape the graph takes."""

    def __init__(self, feeds: Mapping[str, np.ndarray], batch: int):
        self.feeds, self.batch, self.i = dict(feeds), batch, 0
        self.n = len(next(iter(self.feeds.values())))

    def get_next(self):
        if self.i >= self.n:
            return None
        x = {k: v[self.i:self.i + self.batch] for k, v in self.feeds.items()}
        self.i += self.batch
        return x

    def rewind(self):
        self.i = 0


def quantize_int8(fp32: onnx.ModelProto, calib: Union[np.ndarray, Mapping[str, np.ndarray]],
                  method: str = "minmax") -> onnx.ModelProto:
    """Quantize ``fp32`` with calibration samples; returns the QDQ model.

    ``calib``: N x C x H x W float32 normalised images for a one-input classifier, or ``{input name: N x ...}``
    for a graph with several inputs (a denoiser's noisy images ``x`` and time steps ``t``).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    inp = fp32.graph.input[0]
    feeds = {inp.name: calib} if isinstance(calib, np.ndarray) else dict(calib)
    if not feeds or len(next(iter(feeds.values()))) == 0:
        raise UserError("INT8 calibration needs at least one image: raise --calib-images")
    calibration = CALIBRATION.get(method)
    dim0 = inp.type.tensor_type.shape.dim[0]
    batch = 1 if dim0.HasField("dim_value") and dim0.dim_value == 1 else 32
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ORT's "consider pre-processing" advice: its optimiser would add ops outside the allow-list
    with tempfile.TemporaryDirectory(prefix="redistill-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(fp32, src)
        try:
            quantize_static(
                str(src), str(dst), _Reader(feeds, batch),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[calibration.method],
                # bias stays float (TensorRT quantizes it itself; its DequantizeLinear takes INT8 only);
                # ReLU6/ReLU stay explicit so no runtime depends on a quantization range to clip
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "QDQKeepRemovableActivations": True, **calibration.options},
            )
        finally:
            root.setLevel(level)
        q = onnx.load(str(dst))
    bad = zero_point_problems(q)
    if bad:
        raise UserError(f"INT8 quantization produced a non-symmetric Q/DQ node {bad[0]}; TensorRT needs zero point 0")
    return q


def qdq_summary(q: onnx.ModelProto) -> Dict[str, Any]:
    ops = [n.op_type for n in q.graph.node]
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "zero_points": "all 0 (symmetric int8)"}

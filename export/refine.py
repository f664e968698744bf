"""Activation scales chosen by what they do to the logits: each quantized activation's range scaled by the factor
that, with only that tensor quantized, brings the logits closest to FP32's on calibration images.

Why: the calibrators pick each range from that tensor's own histogram (its min/max, a percentile, the least KL),
blind to how much its rounding and clipping cost at the output. On a 32 px RED student the activations' noise was
most of the INT8 error (logit SQNR 16 dB with activations alone quantized, 31 dB with weights alone), spread over
about 180 tensors; in a trial, choosing each one's factor at the logits raised the SQNR to 19 dB and the images
keeping FP32's top-1 from 89.7 to 91.3 % (4,096 training images the calibration did not see). On the INT8 page it
raised the RED students' agreement on validation by 1-2 points, not visibly their test drops (within what the
splits resolve: ``bench/results/int8_accuracy.md``). Symmetric ranges stay symmetric,
so the graph is what TensorRT takes; only the scales differ. Nothing here sees validation or test images: the
search in ``export.int8_search`` keeps the refined ranges only when they keep FP32's top-1 on more validation images.
"""

from __future__ import annotations

import time
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from export.quantize import Ranges, quantize_int8, range_ties, read_float, with_symmetric
from export.verify import batched, run, session, symbolic_batch

#: the factors each activation's symmetric range is tried at (1.0: the calibrator's own)
FACTORS: Sequence[float] = (0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.12, 1.25, 1.5, 2.0)
#: calibration images the logits' error is measured on (evenly spaced among those given)
REFINE_IMAGES = 256
#: a factor other than 1.0 must lower the error by at least this fraction (noise in the error itself)
MIN_GAIN = 0.01


def activation_quantizers(q: onnx.ModelProto) -> Dict[str, onnx.NodeProto]:
    """``{tensor: its QuantizeLinear}`` for every activation (not weight) a QDQ graph quantizes."""
    inits = {t.name for t in q.graph.initializer}
    return {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def only(q: onnx.ModelProto, fp32: onnx.ModelProto, tensors: Collection[str]) -> onnx.ModelProto:
    """A copy of ``q`` in which only ``tensors`` are rounded: every other activation and every weight read in float."""
    m = onnx.ModelProto()
    m.CopyFrom(q)
    read_float(m, fp32, lambda node: True, keep=tuple(tensors), missing_ok=True)
    return m


def scale_groups(q: onnx.ModelProto, ties: Optional[Dict[str, str]] = None) -> Dict[str, List[str]]:
    """``{tensor whose range sets the scale: every tensor rounded at that scale}``: onnxruntime gives the output of
    a MaxPool, Flatten, Reshape, ... its input's scale initializer (``<input>_scale``) and ignores its own range,
    and gives a tensor in ``ties`` (``export.quantize.range_ties`` of the FP32 graph: a Relu's or Clip's input) the
    range of the tensor it names, so such tensors are measured and refined together, through that one range."""
    by_scale: Dict[str, List[str]] = {}
    for tensor, qnode in activation_quantizers(q).items():
        by_scale.setdefault(qnode.input[1], []).append(tensor)
    groups = {next((t for t in ts if f"{t}_scale" == name), ts[0]): ts for name, ts in by_scale.items()}
    merged: Dict[str, List[str]] = {}
    for provider, ts in groups.items():  # one pass: ties are one level (export.quantize.range_ties)
        target = (ties or {}).get(provider, provider)
        merged.setdefault(target if target in groups else provider, []).extend(ts)
    return merged


def _set_scale(m: onnx.ModelProto, name: str, value: float) -> None:
    """Set the per-tensor scale initializer ``name`` of ``m`` to ``value`` (in place)."""
    for t in m.graph.initializer:
        if t.name == name:
            shape = numpy_helper.to_array(t).shape
            t.CopyFrom(numpy_helper.from_array(np.full(shape, value, dtype=np.float32), name))
            return
    raise KeyError(name)


def scaled(ranges: Ranges, factors: Dict[str, float]) -> Ranges:
    """``ranges`` with each named tensor's range made symmetric and scaled by its factor."""
    absmax = {}
    for name, f in factors.items():
        if f != 1.0 and name in ranges.data.data:
            lo, hi = (np.asarray(v) for v in ranges.data.data[name].range_value)
            absmax[name] = f * max(float(np.abs(lo).max()), float(np.abs(hi).max()))
    return with_symmetric(ranges, absmax)


def refine_scales(fp32: onnx.ModelProto, ranges: Ranges, images: np.ndarray,
                  say: Callable[[str], None] = lambda _: None, reference: Optional[onnx.ModelProto] = None,
                  q: Optional[onnx.ModelProto] = None) -> Tuple[Ranges, Dict[str, float]]:
    """Each activation's factor from ``FACTORS`` by the logits' relative squared error against ``reference``'s
    (default: ``fp32``'s; the original network's when ``fp32`` holds fine-tuned weights) on at most
    ``REFINE_IMAGES`` of ``images``, evenly spaced, that tensor (with any tensor sharing its scale) alone rounded;
    returns the refined ranges and the factors that are not 1.0. ``q``: ``fp32`` already quantized at ``ranges``
    (made here when not given). One graph per tensor and factor: about 2 minutes
    for a 32 px MobileNetV3-small on 2 cores."""
    pick = np.unique(np.linspace(0, len(images) - 1, min(len(images), REFINE_IMAGES)).round().astype(int))
    x = images[pick]
    ev = batched(fp32, x[:2])
    as_run = (lambda g: symbolic_batch(g)) if ev is not fp32 else (lambda g: g)
    ref_graph = ev if reference is None else batched(reference, x[:2])
    ref = run(session(ref_graph), x, batch=64).astype(np.float64)
    power = max(float(np.sum(ref ** 2)), 1e-30)
    q = quantize_int8(fp32, ranges) if q is None else q
    acts = activation_quantizers(q)
    groups = scale_groups(q, range_ties(fp32))
    t0 = time.time()
    chosen: Dict[str, float] = {}
    for provider, tensors in groups.items():
        if provider not in ranges.data.data:
            continue
        m = only(q, fp32, tensors)
        names = sorted({acts[t].input[1] for t in tensors})
        base = {t.name: float(numpy_helper.to_array(t).reshape(-1)[0]) for t in m.graph.initializer if t.name in names}
        errors = {}
        for f in FACTORS:
            for scale in names:
                _set_scale(m, scale, base[scale] * f)
            out = run(session(as_run(m)), x, batch=64).astype(np.float64)
            errors[f] = float(np.sum((out - ref) ** 2)) / power
        best = min(errors, key=errors.get)
        if best != 1.0 and errors[best] < errors[1.0] * (1 - MIN_GAIN):
            chosen[provider] = best
    say(f"  activation scales refined at the logits on {len(x)} calibration images: {len(chosen)} of {len(groups)} "
        f"ranges changed ({time.time() - t0:.0f} s)")
    return scaled(ranges, chosen), chosen

"""INT8 post-training static quantization with onnxruntime.quantization, in the form TensorRT accepts.

QDQ format, per-channel symmetric int8 weights, symmetric int8 activations (every zero point 0).
Calibration (``calibrate``) is kept apart from quantization (``quantize_int8``) so that one set of
activation ranges serves every variant the INT8 search tries (nodes kept in float, ``export.int8_search``).
neural-compressor is not used: 3.x has no ONNX quantization, 2.6 needs onnx<1.19, and
onnx-neural-compressor 1.0 pins numpy<2 and dropped the ReLU6 Clip nodes (see docs/export.md).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
import onnx

from export.calibration import CALIBRATION
from export.preflight import zero_point_problems
from redistill.errors import UserError

Calib = Union[np.ndarray, Mapping[str, np.ndarray]]
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class FeedReader:
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

    def __iter__(self):
        self.rewind()
        return iter(self.get_next, None)


def graph_batch(proto: onnx.ModelProto) -> int:
    """How many samples one run of the graph takes: 1 for a static batch-1 graph, else 32."""
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return 1 if dim0.HasField("dim_value") and dim0.dim_value == 1 else 32


def as_feeds(proto: onnx.ModelProto, calib: Calib) -> Dict[str, np.ndarray]:
    """``{input name: N x ...}``; a bare array is the first (a classifier's only) input."""
    feeds = {proto.graph.input[0].name: calib} if isinstance(calib, np.ndarray) else dict(calib)
    if not feeds or len(next(iter(feeds.values()))) == 0:
        raise UserError("INT8 calibration needs at least one image: raise --calib-images")
    return feeds


@contextlib.contextmanager
def quiet_ort():
    """onnxruntime's calibrators print progress and its quantizer logs "consider pre-processing" advice (its
    optimiser would add ops outside the allow-list): neither belongs in the export's output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


@dataclass
class Ranges:
    """Activation ranges of one calibration (an onnxruntime ``TensorsData``), with what produced them."""

    method: str  # a CALIBRATION name
    images: int
    data: Any  # onnxruntime.quantization.TensorsData


def with_symmetric(ranges: Ranges, absmax: Mapping[str, float]) -> Ranges:
    """``ranges`` with each named tensor's range set to [-absmax, absmax] (its other calibration data kept): what
    onnxruntime's symmetric quantizer turns into scale absmax / 127 for int8."""
    from onnxruntime.quantization import TensorsData
    from onnxruntime.quantization.calibrate import TensorData

    data = dict(ranges.data.data)
    for name, m in absmax.items():
        td = data[name]
        lo, hi = (np.asarray(v) for v in td.range_value)
        attrs = {k: v for k, v in td.to_dict().items() if k not in ("lowest", "highest", "CLS")}
        data[name] = TensorData(lowest=np.full(lo.shape, -m, dtype=np.float32),
                                highest=np.full(hi.shape, m, dtype=np.float32), **attrs)
    return Ranges(ranges.method, ranges.images, TensorsData(ranges.data.calibration_method, data))


def calibrate(fp32: onnx.ModelProto, calib: Calib, method: str = "minmax") -> Ranges:
    """Run ``method``'s calibrator over the calibration samples once; the ranges feed any number of quantizations."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    feeds = as_feeds(fp32, calib)
    calibration = CALIBRATION.get(method)
    with tempfile.TemporaryDirectory(prefix="redistill-calib-") as tmp, quiet_ort():
        src = Path(tmp) / "fp32.onnx"
        onnx.save(fp32, src)
        calibrator = create_calibrator(src, [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod[calibration.method],
                                       extra_options=dict(calibration.options))
        try:
            calibrator.collect_data(FeedReader(feeds, graph_batch(fp32)))
            collector = getattr(calibrator, "collector", None)
            if calibration.method == "Entropy" and hasattr(collector, "histogram_dict"):
                data = _entropy_data(collector.histogram_dict, calibration.options.get("num_quantized_bins", 128))
            else:
                data = calibrator.compute_data()
        except (ValueError, RuntimeError, AssertionError) as e:  # numpy/onnxruntime on degenerate activations
            why = (str(e).strip().splitlines() or [""])[0][:160]
            raise UserError(f"INT8 calibration '{method}' failed in onnxruntime ({type(e).__name__}: {why}); "
                            "choose another --calib-method") from None
        finally:
            del calibrator
    return Ranges(method, len(next(iter(feeds.values()))), data)


def entropy_threshold(histogram, num_quantized_bins: int):
    """onnxruntime's ``HistogramCollector.get_entropy_threshold`` (the KL search over symmetric windows of the
    histogram), with its per-bin Python loops done by numpy: the same thresholds, 10-20x sooner."""
    from onnxruntime.quantization.calibrate import entropy
    from onnxruntime.quantization.quant_utils import smooth_distribution

    hist, edges = histogram[0], histogram[1]
    num_bins = hist.size
    zero, half = num_bins // 2, num_quantized_bins // 2
    csum = np.concatenate([[0], np.cumsum(hist)])
    best, best_div = None, None
    for i in range(half, zero + 1):
        start, end = zero - i, min(zero + i + 1, num_bins)
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += csum[start]
        p[-1] += csum[-1] - csum[end]
        merged = sliced.size // num_quantized_bins
        whole = num_quantized_bins * merged
        qbins = sliced[:whole].reshape(num_quantized_bins, merged).sum(1)
        qbins[-1] += sliced[whole:].sum()
        norm = (p[:whole] != 0).reshape(num_quantized_bins, merged).sum(1)
        q = np.zeros(p.size, dtype=np.int64)  # int64 as onnxruntime's: the division truncates
        q[:whole] = np.repeat(np.where(norm > 0, qbins / np.maximum(norm, 1), 0).astype(np.int64), merged)
        ps, qs = smooth_distribution(p), smooth_distribution(q)
        div = np.inf if ps is None or qs is None else float(entropy(ps, qs))
        if best_div is None or div < best_div:  # the first of equal divergences, as np.argmin
            best, best_div = (edges[start], edges[end]), div
    lo, hi = best
    if lo < histogram[2]:
        lo = histogram[2]
    if hi > histogram[3]:
        hi = histogram[3]
    return edges.dtype.type(lo), edges.dtype.type(hi)


def _entropy_data(histograms: Dict[str, Any], num_quantized_bins: int):
    from onnxruntime.quantization import CalibrationMethod, TensorsData

    return TensorsData(CalibrationMethod.Entropy, {name: (*entropy_threshold(h, num_quantized_bins), *h[:2])
                                                   for name, h in histograms.items()})


def _cache_supported() -> bool:
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def quantize_int8(fp32: onnx.ModelProto, calib: Union[Calib, Ranges], method: str = "minmax",
                  exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """Quantize ``fp32``; returns the QDQ model. Nodes named in ``exclude`` stay in float (no Q/DQ on their
    inputs or weights; a quantized consumer of their output still gets its own Q/DQ). The graph's outputs stay
    float (``_float_outputs``).

    ``calib``: ``Ranges`` from ``calibrate``, or the calibration samples themselves (N x C x H x W float32
    normalised images for a one-input classifier, or ``{input name: N x ...}`` for a graph with several inputs,
    a denoiser's noisy images ``x`` and time steps ``t``), which are calibrated here with ``method``.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static, save_tensors_data

    ranges = calib if isinstance(calib, Ranges) else None
    method = ranges.method if ranges else method
    calibration = CALIBRATION.get(method)
    names = {n.name for n in fp32.graph.node}
    unknown = [n for n in exclude if n not in names]
    if unknown:
        raise UserError(f"cannot keep node {unknown[0]!r} in float: the graph has no node of that name")
    with tempfile.TemporaryDirectory(prefix="redistill-int8-") as tmp:
        src, dst, cache = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx", Path(tmp) / "ranges.json"
        onnx.save(fp32, src)
        if _cache_supported():
            if ranges is None:
                ranges = calibrate(fp32, calib, method)
            save_tensors_data(ranges.data, cache)
            source: Dict[str, Any] = {"calibration_data_reader": None, "calibration_cache_path": str(cache)}
        else:  # an onnxruntime without calibration caching calibrates inside quantize_static, with its own options
            feeds = as_feeds(fp32, calib) if ranges is None else None
            if feeds is None:
                raise UserError("this onnxruntime cannot reuse calibration ranges (no calibration_cache_path): "
                                "upgrade onnxruntime (pip install -U onnxruntime)")
            source = {"calibration_data_reader": FeedReader(feeds, graph_batch(fp32))}
        with quiet_ort():
            quantize_static(
                str(src), str(dst), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod[calibration.method], nodes_to_exclude=list(exclude),
                # bias stays float (TensorRT quantizes it itself; its DequantizeLinear takes INT8 only);
                # ReLU6/ReLU stay explicit so no runtime depends on a quantization range to clip
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "QDQKeepRemovableActivations": True},
                **source,
            )
        q = onnx.load(str(dst))
    _float_outputs(q)
    if exclude:
        _float_inputs(q, fp32, set(exclude))
    bad = zero_point_problems(q)
    if bad:
        raise UserError(f"INT8 quantization produced a non-symmetric Q/DQ node {bad[0]}; TensorRT needs zero point 0")
    return q


def range_ties(fp32: onnx.ModelProto) -> Dict[str, str]:
    """``{tensor: the tensor whose calibrated range onnxruntime's quantizer gives it}``: the input of a Relu or Clip
    that nothing else reads takes the output's range (``adjust_tensor_ranges``), so the two scales move together.
    One level only, as onnxruntime copies them: in Conv -> Relu -> Clip the conv output gets the Relu output's
    calibrated range while the Relu output gets the Clip output's."""
    readers: Dict[str, int] = {}
    for n in fp32.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    ties = {n.input[0]: n.output[0] for n in fp32.graph.node
            if n.op_type in ("Relu", "Clip") and readers.get(n.input[0]) == 1}
    return ties


def _producers(proto: onnx.ModelProto) -> Dict[str, onnx.NodeProto]:
    return {o: n for n in proto.graph.node for o in n.output}


def _float_outputs(q: onnx.ModelProto) -> None:
    """Drop the Q/DQ pair onnxruntime puts on a graph output (in place): rounding the logits themselves to 8 bits
    only adds noise (alone it changed the top-1 of 1.6 % of a RED student's images), and TensorRT hands the
    output over in float anyway."""
    prod = _producers(q)
    for out in q.graph.output:
        dq = prod.get(out.name)
        qn = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if qn is None or qn.op_type != "QuantizeLinear" or qn.input[0] not in prod:  # not a graph input passed through
            continue
        inner = qn.input[0]
        for node in q.graph.node:
            if node is dq or node is qn:
                continue
            node.input[:] = [out.name if i == inner else i for i in node.input]
            node.output[:] = [out.name if o == inner else o for o in node.output]
        q.graph.node.remove(dq)
        q.graph.node.remove(qn)
        prod = _producers(q)
    _prune(q)


def _float_inputs(q: onnx.ModelProto, fp32: onnx.ModelProto, names: set) -> None:
    """Feed the nodes in ``names`` their float inputs (in place): onnxruntime leaves their weights float but
    quantizes a tensor once for all its consumers, so an excluded node would still read it through Q/DQ.
    Q/DQ pairs and quantized weights left without a consumer are removed."""
    read_float(q, fp32, lambda node: node.name in names)


def read_float(q: onnx.ModelProto, fp32: onnx.ModelProto, select, keep: Sequence[str] = (),
               missing_ok: bool = False) -> None:
    """Rewire the nodes ``select(node)`` picks (in place) to read in float what they read through a
    DequantizeLinear: an activation the tensor before its QuantizeLinear (except the tensors in ``keep``), a
    weight its float original from ``fp32``, under its own name. A weight without a float original is a
    UserError, or stays rounded when ``missing_ok``. Q/DQ pairs and initializers left unread are removed."""
    prod = _producers(q)
    float_inits = {t.name: t for t in fp32.graph.initializer}
    have = {t.name for t in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type in QDQ_OPS or not select(node):
            continue
        for k, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = prod.get(dq.input[0])
            if src is not None and src.op_type == "QuantizeLinear":
                if src.input[0] not in keep:
                    node.input[k] = src.input[0]
                continue
            orig = dq.input[0][: -len("_quantized")] if dq.input[0].endswith("_quantized") else None
            if orig not in float_inits:
                if missing_ok:
                    continue
                raise UserError(f"cannot keep node {node.name!r} in float: no float original of {dq.input[0]}")
            if orig not in have:
                q.graph.initializer.append(float_inits[orig])
                have.add(orig)
            node.input[k] = orig
    _prune(q)


def _prune(q: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads, then initializers nothing reads."""
    outputs = {o.name for o in q.graph.output}
    while True:
        used = {i for n in q.graph.node for i in n.input} | outputs
        dead = [n for n in q.graph.node if n.op_type in QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            q.graph.node.remove(n)
    used = {i for n in q.graph.node for i in n.input} | outputs
    for t in [t for t in q.graph.initializer if t.name not in used]:
        q.graph.initializer.remove(t)


def quantized_nodes(q: onnx.ModelProto) -> List[str]:
    """Names of the nodes of a QDQ graph that read a dequantized tensor (an activation or a weight), in graph order."""
    prod = _producers(q)
    return [n.name for n in q.graph.node if n.op_type not in QDQ_OPS
            and any(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)]


def float_nodes(q: onnx.ModelProto, names: Sequence[str]) -> Dict[str, bool]:
    """For each name: whether that node runs in float in ``q`` (present, and no input comes from a DequantizeLinear)."""
    prod = _producers(q)
    by_name = {n.name: n for n in q.graph.node}
    return {name: name in by_name and not any(i in prod and prod[i].op_type == "DequantizeLinear"
                                              for i in by_name[name].input) for name in names}


def qdq_summary(q: onnx.ModelProto) -> Dict[str, Any]:
    ops = [n.op_type for n in q.graph.node]
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "quantized_nodes": len(quantized_nodes(q)), "zero_points": "all 0 (symmetric int8)"}


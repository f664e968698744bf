"""Quantization-aware fine-tuning on the exact INT8 graph: the FP32 ONNX graph run in torch, rounded where
onnxruntime's QDQ model of it rounds.

``GraphModule`` runs an FP32 ONNX classifier graph node by node with torch operators and its float initializers as
trainable parameters. Given a QDQ model of the same graph (``export.quantize.quantize_int8``: onnxruntime keeps the
node and tensor names and puts a QuantizeLinear/DequantizeLinear pair in front of each tensor it quantizes), every
input a node reads through a DequantizeLinear there is fake-quantized here, and so is every graph output that comes
from one: activations at that Q/DQ pair's scale and zero point (frozen: the calibration's ranges), weights per
channel along the DequantizeLinear's axis (or per tensor) at the scale onnxruntime's quantizer computes from the
weight's current values (checked equal to the stored one at build), with straight-through gradients; a Conv/Gemm
bias is rounded to int32 at input scale x weight scale, as onnxruntime's optimiser does before it runs the graph. So
the tensors around element-wise ops (hard-swish's HardSigmoid and Mul, squeeze-excitation's gate, residual Adds,
pools) and the folded BatchNorm's per-channel Mul/Add constants are rounded as onnxruntime rounds them (an earlier
emulation that rounded only convs and linear layers, at min-max ranges, was further from onnxruntime's INT8 logits
than the FP32 graph itself; docs/export.md). On the students here
the logits equal those of onnxruntime's optimised CPU session of the QDQ model bit for bit, but where a float sum
lands on a rounding tie (tests/export/test_qat_graph.py).

``finetune_graph`` fine-tunes that module with ``export.qat``'s loss and loop and returns the FP32 graph with the
fine-tuned initializers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn
from torch.utils.data import Dataset

from export.qat import QATSettings, mean_kl, train_kl
from export.quantize import QDQ_OPS, Ranges, calibrate, quantize_int8, range_ties, with_symmetric
from export.verify import batched
from redistill.errors import UserError

#: ops whose float initializer inputs are trained (their other initializers, e.g. Clip's bounds, stay fixed)
TRAINED_BY = {"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div"}
#: integer range of each quantized type QuantizeLinear saturates to; symmetric int8 weights use -127..127
QRANGE = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
          onnx.TensorProto.INT16: (-32768, 32767), onnx.TensorProto.UINT16: (0, 65535)}
WEIGHT_SYMMETRIC = {onnx.TensorProto.INT8: 127, onnx.TensorProto.INT16: 32767}
_TORCH_DTYPE = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
                onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
                onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.FLOAT16: torch.float16}


def learnt_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``fake_quant`` with a trainable scale (LSQ, Esser et al. 2020): the rounding alone passes gradients straight
    through, so the scale learns from the rounding error inside the range and from the clipped values outside it."""
    v = x / scale
    v = v + (torch.round(v) - v).detach()
    return (torch.clamp(v + zero, qmin, qmax) - zero) * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear as onnxruntime computes them (x / scale, rounded half to even, plus the
    zero point, saturated); the gradient passes straight through inside the range and is zero outside it."""
    y = (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale
    if not x.requires_grad:
        return y
    inside = x.clamp((qmin - zero) * scale, (qmax - zero) * scale)
    return inside + (y - inside).detach()


def weight_scale(w: torch.Tensor, axis: Optional[int], qmax: int) -> torch.Tensor:
    """onnxruntime's symmetric weight scale (``quant_utils.compute_scale_zp``): max |w| (per slice along ``axis``,
    0 included) * 2 / (2 * qmax), in float64 then stored as float32; 1.0 where that is below float32's tiny."""
    a = w.detach().abs()
    absmax = a.amax() if axis is None else a.movedim(axis, 0).flatten(1).amax(1)
    s = (absmax.double() * 2 / (2 * qmax)).float()
    return torch.where(s < torch.finfo(torch.float32).tiny, torch.ones_like(s), s)


@dataclass(frozen=True)
class _Q:
    """How one DequantizeLinear output is computed from its float original."""

    kind: str  # activation | weight
    scale: torch.Tensor  # activation: the frozen scale; weight: the stored one (used when ``live`` is False)
    zero: torch.Tensor
    qmin: int
    qmax: int
    qtype: int  # onnx.TensorProto data type of the quantized values
    axis: Optional[int] = None  # weight: per-channel axis (None: per tensor)
    live: bool = False  # weight: scale recomputed from the current weight as onnxruntime's quantizer would
    scale_name: str = ""  # activation: the QDQ model's scale initializer


def _attrs(node: onnx.NodeProto) -> Dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> Tuple[torch.Tensor, List[int]]:
    """ONNX ``pads`` (begins then ends): symmetric pads as a padding argument, others applied here."""
    n = len(pads) // 2
    begin, end = list(pads[:n]), list(pads[n:])
    if begin == end:
        return x, begin
    flat = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
    return F.pad(x, flat, value=value), [0] * n


def _conv(a, x, w, b=None):
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UserError("cannot emulate Conv with auto_pad in the QAT graph: export with explicit pads")
    nd = w.dim() - 2
    x, pad = _pads(x, a.get("pads", [0] * 2 * nd))
    return getattr(F, f"conv{nd}d")(x, w, b, a.get("strides", [1] * nd), pad, a.get("dilations", [1] * nd),
                                    a.get("group", 1))


def _gemm(a, x, w, c=None):
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y if c is None else y + a.get("beta", 1.0) * c


def _pool(kind: str):
    def run(a, x):
        nd = x.dim() - 2
        k, pads = a["kernel_shape"], a.get("pads", [0] * 2 * nd)
        if kind == "avg" and pads[:nd] != pads[nd:]:  # zeros padded here would count in the average
            raise UserError("QAT on the ONNX graph cannot run AveragePool with asymmetric pads; drop --int8-qat-epochs")
        x, pad = _pads(x, pads, -math.inf)
        strides, ceil = a.get("strides", [1] * nd), bool(a.get("ceil_mode", 0))
        if kind == "max":
            return getattr(F, f"max_pool{nd}d")(x, k, strides, pad, a.get("dilations", [1] * nd), ceil)
        return getattr(F, f"avg_pool{nd}d")(x, k, strides, pad, ceil, bool(a.get("count_include_pad", 0)))
    return run


def _axes(a, axes):
    return [int(v) for v in (axes.tolist() if axes is not None else a.get("axes", []))]


def _gather(a, x, idx):
    axis = a.get("axis", 0) % x.dim()
    y = x.movedim(axis, 0)[idx.long()]
    return y.movedim(list(range(idx.dim())), list(range(axis, axis + idx.dim())))


def _reshape(a, x, shape):
    dims = [x.shape[i] if s == 0 and not a.get("allowzero", 0) else s for i, s in enumerate(shape.tolist())]
    return x.reshape(dims)


def _flatten(a, x):
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _squeeze(a, x, axes=None):
    ax = _axes(a, axes)
    return x.squeeze() if not ax else x.squeeze(tuple(v % x.dim() for v in ax))


def _unsqueeze(a, x, axes=None):
    for v in sorted(v % (x.dim() + len(_axes(a, axes))) for v in _axes(a, axes)):
        x = x.unsqueeze(v)
    return x


def _clip(a, x, lo=None, hi=None):
    lo = lo if lo is not None else a.get("min")
    hi = hi if hi is not None else a.get("max")
    return x if lo is None and hi is None else torch.clamp(x, lo, hi)


#: op type -> f(attributes, *inputs) -> output (a tensor, or a tuple for several outputs); absent optional
#: inputs are None
OPS: Dict[str, Callable[..., Any]] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": lambda a, x, y: x @ y,
    "Relu": lambda a, x: torch.relu(x), "Sigmoid": lambda a, x: torch.sigmoid(x), "Tanh": lambda a, x: torch.tanh(x),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda a, x: x * torch.clamp(x / 6 + 0.5, 0, 1), "Clip": _clip,
    "Add": lambda a, x, y: x + y, "Sub": lambda a, x, y: x - y, "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y if x.is_floating_point() else torch.div(x, y, rounding_mode="trunc"),
    "GlobalAveragePool": lambda a, x: x.mean(tuple(range(2, x.dim())), keepdim=True),
    "GlobalMaxPool": lambda a, x: x.amax(tuple(range(2, x.dim())), keepdim=True),
    "AveragePool": _pool("avg"), "MaxPool": _pool("max"),
    "ReduceMean": lambda a, x, axes=None: x.mean(tuple(_axes(a, axes)) or tuple(range(x.dim())),
                                                 keepdim=bool(a.get("keepdims", 1))),
    "Softmax": lambda a, x: torch.softmax(x, a.get("axis", -1)),
    "Flatten": _flatten, "Reshape": _reshape, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": lambda a, x: x.permute(a.get("perm", list(range(x.dim()))[::-1])),
    "Concat": lambda a, *xs: torch.cat(xs, a["axis"]),
    "Identity": lambda a, x: x, "Dropout": lambda a, x, *_: x,
    "Shape": lambda a, x: torch.tensor(x.shape, dtype=torch.int64), "Gather": _gather,
    "Cast": lambda a, x: x.to(_TORCH_DTYPE[a["to"]]),
    "Constant": lambda a: torch.from_numpy(numpy_helper.to_array(a["value"]).copy()),
}


def _array(t: onnx.TensorProto) -> torch.Tensor:
    return torch.from_numpy(np.array(numpy_helper.to_array(t)))


def trained_initializers(proto: onnx.ModelProto) -> List[str]:
    """The float initializers fine-tuning changes: those a conv, Gemm or MatMul reads, and the non-scalar ones an
    element-wise Add/Sub/Mul/Div reads (a folded BatchNorm's per-channel constants), directly or through Identity.
    Scalars of arithmetic and Clip's bounds stay as they are."""
    inits = {t.name: t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity" and n.input[0] in inits}
    out = []
    for n in proto.graph.node:
        if n.op_type not in TRAINED_BY:
            continue
        for name in n.input:
            src = alias.get(name, name)
            if src in inits and src not in out and (n.op_type in ("Conv", "Gemm", "MatMul")
                                                     or int(np.prod(inits[src].dims)) > 1):
                out.append(src)
    return out


class GraphModule(nn.Module):
    """An FP32 ONNX graph as a torch module: trainable float initializers (``trained_initializers``), constant
    subgraphs folded at build time, and, given ``qdq`` (a QDQ model of the same graph), the tensors it quantizes
    fake-quantized while ``quantize`` is True (``set_quantize``). With ``learn_scales`` each activation range
    onnxruntime computes a scale from gets a trainable factor (``log_scales``, the log of scale / calibrated scale,
    0 at build), read back as ranges by ``learnt_ranges``."""

    def __init__(self, proto: onnx.ModelProto, qdq: Optional[onnx.ModelProto] = None, learn_scales: bool = False):
        super().__init__()
        g = proto.graph
        self.trained = trained_initializers(proto)
        trained = [t for t in g.initializer if t.name in self.trained]
        self.params = nn.ParameterList([nn.Parameter(_array(t).float()) for t in trained])
        self._param = {t.name: i for i, t in enumerate(trained)}
        consts = {t.name: _array(t) for t in g.initializer if t.name not in self._param}
        inits = {t.name for t in g.initializer}
        self._alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity"}
        self.inputs = [v.name for v in g.input if v.name not in inits]
        self.outputs = [v.name for v in g.output]
        self.program: List[Tuple[onnx.NodeProto, Dict[str, Any]]] = []  # what runs per call: (node, attributes)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        for node in g.node:
            op = OPS.get(node.op_type)
            if op is None or node.domain not in ("", "ai.onnx") or (node.op_type == "Softmax" and opset < 13):
                raise UserError(f"QAT on the ONNX graph cannot run op type {node.op_type!r} (node {node.name!r}, "
                                f"opset {opset}); drop --int8-qat-epochs for this network")
            a = _attrs(node)
            if all(x == "" or x in consts for x in node.input):  # constants and shape arithmetic: folded now
                out = op(a, *[consts[x] if x else None for x in node.input])
                consts.update(zip(node.output, out if isinstance(out, tuple) else (out,)))
            else:
                self.program.append((node, a))
        self._const = {}
        for k, (name, t) in enumerate(consts.items()):
            self.register_buffer(f"c{k}", t, persistent=False)
            self._const[name] = f"c{k}"
        self.reads: Dict[Tuple[int, int], str] = {}  # (program position, input position) -> DequantizeLinear output
        self.out_reads: Dict[int, str] = {}  # graph output position -> DequantizeLinear output
        self.bias_reads: Dict[int, Tuple[str, str]] = {}  # Conv/Gemm position -> its input's and weight's keys
        self.q: Dict[str, _Q] = {}
        self.quantize = False
        self.scale_groups: List[str] = []  # learnt scales: each one's scale initializer, in ``log_scales`` order
        self._scale_index: Dict[str, int] = {}  # activation key -> its entry in ``log_scales``
        if qdq is not None:
            self._map(proto, qdq)
            self.quantize = True
        if learn_scales:
            if qdq is None:
                raise ValueError("learn_scales needs the QDQ model whose scales are learnt")
            self._learn(proto)

    def set_quantize(self, on: bool) -> "GraphModule":
        self.quantize = on
        return self

    def _map(self, proto: onnx.ModelProto, qdq: onnx.ModelProto) -> None:
        """Which inputs of which nodes (and which graph outputs) ``qdq`` reads through a DequantizeLinear, and how."""
        prod = {o: n for n in qdq.graph.node for o in n.output}
        qinits = {t.name: t for t in qdq.graph.initializer}
        by_name = {n.name: n for n in qdq.graph.node if n.op_type not in QDQ_OPS}
        mine = {n.name for n in proto.graph.node}
        extra = [n for n in by_name if n not in mine]
        if extra or len(by_name) != len(proto.graph.node):
            raise UserError(f"the QDQ model is not of this FP32 graph (node {(extra or ['?'])[0]!r} differs): "
                            "quantize the same graph")

        def dq_of(name: str) -> Optional[str]:
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                return None
            if dq.output[0] not in self.q:
                self.q[dq.output[0]] = self._spec(dq, prod, qinits)
            return dq.output[0]

        for pos, (node, a) in enumerate(self.program):
            qn = by_name.get(node.name)
            if qn is None or qn.op_type != node.op_type or len(qn.input) != len(node.input):
                raise UserError(f"the QDQ model is not of this FP32 graph (node {node.name!r} differs): "
                                "quantize the same graph")
            for k, name in enumerate(qn.input):
                key = dq_of(name)
                if key is not None:
                    self.reads[(pos, k)] = key
                    spec = self.q[key]
                    if spec.kind == "weight":
                        self._check_weight(node.input[k], spec, key)
            self._bias_rounding(pos, node, a)
        for j, v in enumerate(qdq.graph.output):
            key = dq_of(v.name)
            if key is not None:
                self.out_reads[j] = key

    def _spec(self, dq: onnx.NodeProto, prod, qinits) -> _Q:
        def arr(name):
            return _array(qinits[name]) if name in qinits else None

        scale = arr(dq.input[1])
        zero_t = qinits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        qtype = zero_t.data_type if zero_t is not None else onnx.TensorProto.UINT8
        zero = arr(dq.input[2]).float() if zero_t is not None else torch.zeros(())
        if scale is None or qtype not in QRANGE:
            raise UserError(f"QAT on the ONNX graph cannot emulate DequantizeLinear {dq.name!r} (a computed scale or "
                            f"type {onnx.TensorProto.DataType.Name(qtype)}); quantize with export.quantize")
        src = prod.get(dq.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            if scale.numel() != 1 or not torch.equal(arr(src.input[1]), scale):
                raise UserError(f"QAT on the ONNX graph takes per-tensor activations with one scale per Q/DQ pair; "
                                f"{dq.name!r} has another")
            return _Q("activation", scale.float().reshape(()), zero.reshape(()), *QRANGE[qtype], qtype,
                      scale_name=dq.input[1])
        if dq.input[0] not in qinits:
            raise UserError(f"QAT on the ONNX graph cannot emulate DequantizeLinear {dq.name!r}: its input is neither "
                            "a QuantizeLinear nor a quantized weight")
        axis = None
        if scale.numel() > 1:
            axis = _attrs(dq).get("axis", 1) % len(qinits[dq.input[0]].dims)
        return _Q("weight", scale.float(), zero.float(), *QRANGE[qtype], qtype, axis)

    def _learn(self, proto: onnx.ModelProto) -> None:
        """One trainable log factor per activation range: tensors reading one scale initializer share it, and so do
        the tensors whose ranges onnxruntime's quantizer ties (``export.quantize.range_ties``)."""
        alias = {f"{a}_scale": f"{b}_scale" for a, b in range_ties(proto).items()}
        softmax = {f"{n.output[0]}_scale" for n in proto.graph.node if n.op_type == "Softmax"}
        base: Dict[str, torch.Tensor] = {}  # in insertion order: the groups' order in ``log_scales``
        group: Dict[str, int] = {}
        for key, spec in self.q.items():
            if spec.kind != "activation" or spec.scale_name in softmax:  # onnxruntime fixes a Softmax's to [0, 1]
                continue
            if spec.qtype != onnx.TensorProto.INT8 or spec.zero.item() != 0 or not spec.scale_name.endswith("_scale"):
                raise UserError(f"learnt activation scales need symmetric int8 activations with onnxruntime's scale "
                                f"names ({spec.scale_name!r} is not): quantize with export.quantize, or fine-tune at "
                                "frozen scales (scale_lr 0)")
            name = alias.get(spec.scale_name, spec.scale_name)
            if name not in base:
                base[name] = spec.scale
                group[name] = len(group)
            self._scale_index[key] = group[name]
        self.scale_groups = list(base)
        self.register_buffer("base_scales", torch.stack(list(base.values())) if base else torch.zeros(0),
                             persistent=False)
        self.log_scales = nn.Parameter(torch.zeros(len(base)))

    def activation_scale(self, key: str) -> torch.Tensor:
        """The scale activation ``key`` is rounded at: learnt (calibrated x exp(factor)) or frozen."""
        i = self._scale_index.get(key)
        return self.q[key].scale if i is None else self.base_scales[i] * self.log_scales[i].exp()

    def learnt_ranges(self, ranges: Ranges) -> Ranges:
        """``ranges`` (those the QDQ model was quantized at) with each learnt scale's range set so that onnxruntime's
        quantizer computes that scale again: symmetric, max |x| = scale x 127 for int8."""
        qmax = WEIGHT_SYMMETRIC[onnx.TensorProto.INT8]
        absmax = {}
        for i, name in enumerate(self.scale_groups):
            tensor = name[:-len("_scale")]  # ``_learn`` takes only onnxruntime's ``<tensor>_scale`` names
            if tensor not in ranges.data.data:
                raise UserError(f"no calibrated range for {tensor!r}, whose scale {name!r} is learnt: give "
                                "finetune_graph the ranges its QDQ model was quantized at, or scale_lr 0")
            absmax[tensor] = float(self.base_scales[i] * self.log_scales[i].detach().exp()) * qmax
        return with_symmetric(ranges, absmax)

    def _check_weight(self, name: str, spec: _Q, key: str) -> None:
        """Recompute the weight's scale as onnxruntime's quantizer does; where it equals the stored one, training
        recomputes it from the current weight (as re-quantizing the fine-tuned graph will), else keeps it frozen."""
        w = self._value(self._source(name), {})
        qmax = WEIGHT_SYMMETRIC.get(spec.qtype)
        live = (qmax is not None and not spec.zero.any()
                and torch.equal(weight_scale(w, spec.axis, qmax).reshape(spec.scale.shape), spec.scale))
        lo = -qmax if live else spec.qmin
        self.q[key] = _Q("weight", spec.scale, spec.zero, lo, spec.qmax, spec.qtype, spec.axis, live)

    def _bias_rounding(self, pos: int, node: onnx.NodeProto, a: Dict[str, Any]) -> None:
        """onnxruntime's optimiser (``WeightBiasQuantization``, on at every optimisation level the export uses) rounds
        the float bias of a Conv/Gemm whose input and weight are dequantized to int32 at scale input scale x weight
        scale; the same Conv/Gemm is marked to round it so (conditions as onnxruntime checks them)."""
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            return
        x_key, w_key = self.reads.get((pos, 0)), self.reads.get((pos, 1))
        bias = self._source(node.input[2])  # onnxruntime folds an Identity of an initializer first
        if x_key is None or w_key is None or (pos, 2) in self.reads or self.q[x_key].kind != "activation":
            return
        if bias not in self._param and bias not in self._const:
            return
        b, w = self._value(bias, {}), self.q[w_key]
        if b.dim() != 1 or w.kind != "weight":
            return
        expected = 0 if node.op_type == "Conv" or a.get("transB", 0) else 1
        if w.axis is not None and (w.axis != expected or w.scale.numel() != b.numel()):
            return
        self.bias_reads[pos] = (x_key, w_key)

    def _rounded_bias(self, pos: int, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x_key, w_key = self.bias_reads[pos]
        w_spec = self.q[w_key]
        ws = weight_scale(w, w_spec.axis, w_spec.qmax) if w_spec.live else w_spec.scale
        xs = self.activation_scale(x_key).detach()
        scale = xs * ws.reshape(-1) if w_spec.axis is not None else xs * ws.reshape(())
        y = torch.round(b / scale) * scale
        return y if not b.requires_grad else b + (y - b).detach()

    def _source(self, name: str) -> str:
        """The tensor ``name`` is an Identity of (through any chain of them), or ``name`` itself."""
        while name in self._alias:
            name = self._alias[name]
        return name

    def _value(self, name: str, env: Dict[str, torch.Tensor]) -> torch.Tensor:
        if name in env:
            return env[name]
        if name in self._param:
            return self.params[self._param[name]]
        return getattr(self, self._const[name])

    def _fake(self, key: str, x: torch.Tensor) -> torch.Tensor:
        s = self.q[key]
        if s.kind == "activation":
            if key in self._scale_index:
                return learnt_quant(x, self.activation_scale(key), s.zero, s.qmin, s.qmax)
            return fake_quant(x, s.scale, s.zero, s.qmin, s.qmax)
        scale = weight_scale(x, s.axis, s.qmax) if s.live else s.scale
        zero = s.zero
        if s.axis is not None:
            shape = [1] * x.dim()
            shape[s.axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        return fake_quant(x, scale, zero, s.qmin, s.qmax)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        env: Dict[str, torch.Tensor] = dict(zip(self.inputs, inputs))
        seen: Dict[str, torch.Tensor] = {}  # a DequantizeLinear output read by several nodes is computed once

        def read(pos: int, k: int, name: str):
            if not name:
                return None
            x = self._value(name, env)
            key = self.reads.get((pos, k)) if self.quantize else None
            if key is None:
                return x
            if key not in seen:
                seen[key] = self._fake(key, x)
            return seen[key]

        for pos, (node, a) in enumerate(self.program):
            args = [read(pos, k, name) for k, name in enumerate(node.input)]
            if self.quantize and pos in self.bias_reads:
                args[2] = self._rounded_bias(pos, self._value(node.input[1], env), args[2])
            out = OPS[node.op_type](a, *args)
            env.update(zip(node.output, out if isinstance(out, tuple) else (out,)))
        outs = []
        for j, name in enumerate(self.outputs):
            x = self._value(name, env)
            key = self.out_reads.get(j) if self.quantize else None
            outs.append(x if key is None else self._fake(key, x))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def counts(self) -> Dict[str, int]:
        """Fake-quantized tensors by kind, and the nodes reading at least one."""
        kinds = [s.kind for s in self.q.values()]
        return {"activations": kinds.count("activation"), "weights": kinds.count("weight"),
                "biases_int32": len(self.bias_reads),
                "weights_live_scale": sum(s.live for s in self.q.values()),
                "nodes": len({pos for pos, _ in self.reads})}

    def to_onnx(self, proto: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``proto`` (the graph this was built from) whose trained initializers hold the current values."""
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        for t in out.graph.initializer:
            if t.name in self._param:
                dtype = numpy_helper.to_array(t).dtype
                value = self.params[self._param[t.name]].detach().cpu().numpy()
                t.CopyFrom(numpy_helper.from_array(value.astype(dtype), t.name))
        return out


def ranges_for(fp32: onnx.ModelProto, calib_images: np.ndarray, method: str) -> Ranges:
    """The activation ranges the INT8 search computes for ``method`` on these images (calibrated on the graph with a
    symbolic batch when it allows, as ``export.int8_search`` does)."""
    return calibrate(batched(fp32, calib_images[:2]), calib_images, method)


def qdq_for(fp32: onnx.ModelProto, calib_images: np.ndarray, method: str) -> onnx.ModelProto:
    """The QDQ model of ``fp32`` with every node quantized at ``ranges_for``'s ranges."""
    return quantize_int8(fp32, ranges_for(fp32, calib_images, method))


def finetune_graph(fp32: onnx.ModelProto, ranges: Ranges, train: Dataset, check_images: np.ndarray,
                   settings: QATSettings, say: Callable[[str], None] = lambda _: None
                   ) -> Tuple[onnx.ModelProto, Ranges, Dict[str, Any]]:
    """``fp32`` with fine-tuned initializers (nothing else changed), the activation ranges it was fine-tuned to
    (learnt; ``ranges`` itself when ``settings.scale_lr`` is 0) and the record of the run.

    Trains ``GraphModule`` of ``fp32`` rounded as its QDQ model at ``ranges`` rounds it, with ``export.qat.train_kl``:
    KL from the FP32 graph's outputs, SGD with momentum for the initializers, Adam for the activation scales' log
    factors, cosine to zero, seeded shuffling and flips. ``train``: the run's training images (eval transform);
    ``check_images``: images the KL from FP32 is reported on before and after.
    """
    if settings.epochs < 1:
        raise ValueError("QAT needs at least one epoch")
    learn = settings.scale_lr > 0
    reference = GraphModule(fp32).eval().requires_grad_(False)
    model = GraphModule(fp32, quantize_int8(fp32, ranges), learn_scales=learn).eval()
    if learn:
        model.learnt_ranges(ranges)  # a range it could not write back fails now, not after the training
    before = mean_kl(model, reference, check_images)
    curve, images, seconds = train_kl(model, reference, list(model.params), train, settings, say,
                                      scale_params=[model.log_scales] if learn else ())
    after = mean_kl(model, reference, check_images)
    counts = model.counts()
    factors = model.log_scales.detach().exp() if learn else torch.ones(0)
    record = {"settings": asdict(settings), "layers": counts["nodes"], "train_images": len(train),
              "images_trained": images, "seconds": round(seconds, 1), "train_kl_per_epoch": curve,
              "check_images": int(len(check_images)), "kl_before": float(f"{before:.4g}"),
              "kl_after": float(f"{after:.4g}"),
              "loss": "KL(FP32 graph || fake-quantized graph), batch mean",
              "emulation": "onnx-graph",
              "quantized_tensors": counts,
              "trained_initializers": len(model.trained),
              "activation_scales": ({"learnt": True, "ranges": len(factors),
                                     "factor_min": round(float(factors.min()), 4) if len(factors) else None,
                                     "factor_max": round(float(factors.max()), 4) if len(factors) else None,
                                     "changed_over_1pct": int(((factors - 1).abs() > 0.01).sum())}
                                    if learn else {"learnt": False}),
              "rounding": "the FP32 ONNX graph run in torch, every tensor the QDQ model quantizes rounded as it does: "
                          "activations per tensor (their scales learnt from the starting ones, LSQ, unless "
                          "scale_lr is 0), weights (conv/Gemm per output channel, "
                          "element-wise constants per tensor) int8 symmetric at scales recomputed from the current "
                          "weights, conv/Gemm biases int32 at input x weight scale (onnxruntime's optimiser); "
                          "straight-through gradients"}
    say(f"INT8: QAT on the ONNX graph ({counts['activations']} activations and {counts['weights']} weights rounded) "
        f"{settings.epochs} epoch(s) in {seconds:.0f} s: KL from FP32 on {len(check_images)} validation images "
        f"{before:.4f} -> {after:.4f}" + (f"; activation scales x{float(factors.min()):.2f} to "
                                          f"x{float(factors.max()):.2f} of the starting ones" if len(factors) else ""))
    return model.to_onnx(fp32), (model.learnt_ranges(ranges) if learn else ranges), record

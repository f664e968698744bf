"""PyTorch -> ONNX with the legacy TorchScript exporter, which can write the opsets TensorRT 8.2 parses (<= 13)."""

from __future__ import annotations

import io
import warnings
from typing import Any, Dict, List, Tuple

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from redistill.errors import UserError
from train.models import example_inputs, input_names, output_names

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 11


def export_onnx(model: nn.Module, image_size: int, opset: int = 13, dynamic_batch: bool = False) -> onnx.ModelProto:
    """Export an eval ``model``; constant-folded, no external data.

    Inputs and outputs are the model's own (``train.models.example_inputs``/``input_names``/``output_names``):
    one float32 NCHW ``input`` -> ``logits`` for a classifier; ``x`` (float32 NCHW), ``t`` (float32 [B]) and,
    when class-conditional, ``y`` (int32 [B]) -> ``eps`` for a denoiser. Batch 1 unless ``dynamic_batch``.
    """
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset} is too old: choose {MIN_OPSET}-13 (13 is the default)")
    example = tuple(example_inputs(model, image_size, batch=1))
    names, outputs = input_names(model), output_names(model)
    for name, x in zip(names, example):
        if x.dtype == torch.int64:  # TensorRT 8.2 takes no int64 input; the model casts inside the graph
            raise UserError(f"input {name!r} is int64, which TensorRT 8.2 cannot take; make the model's example_inputs "
                            "give int32 and cast inside forward")
    axes = {n: {0: "batch"} for n in names + outputs} if dynamic_batch else None
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose
        torch.onnx.export(model.eval(), example, buf, dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=names, output_names=outputs, dynamic_axes=axes,
                          export_params=True, keep_initializers_as_inputs=False)
    proto = onnx.load_from_string(buf.getvalue())
    constants_to_initializers(proto)
    return proto


_NP_DTYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32",
             onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
             onnx.TensorProto.BOOL: "bool"}


def graph_io(proto: onnx.ModelProto, outputs: bool = False) -> List[Dict[str, Any]]:
    """``[{"name", "shape", "dtype"}]`` of the graph's inputs (or outputs) as the graph declares them.

    A symbolic dimension is its name (e.g. ``"batch"``); the dtype is the numpy name (``float32``, ``int32``).
    """
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for v in (proto.graph.output if outputs else proto.graph.input):
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        out.append({"name": v.name, "shape": shape,
                    "dtype": _NP_DTYPE.get(tt.elem_type, onnx.TensorProto.DataType.Name(tt.elem_type).lower())})
    return out


def constants_to_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Turn top-level Constant nodes into initializers: TensorRT 8.2 wants Clip's min/max as initializers."""
    g = proto.graph
    keep = []
    for node in g.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and set(attrs) == {"value"}:
            t = onnx.helper.get_attribute_value(attrs["value"])
            arr = numpy_helper.to_array(t)
            g.initializer.append(numpy_helper.from_array(arr, name=node.output[0]))
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    return proto


def lower_ir_version(proto: onnx.ModelProto, max_ir: int) -> Tuple[int, int]:
    """Lower ``ir_version`` to ``max_ir`` when the graph uses nothing newer; returns (before, after).

    IR 8+ adds functions, sparse/optional types and float8; a plain CNN graph at opset <= 13 is valid IR 7,
    which is what TensorRT 8.2's parser (ONNX 1.8) was built against.
    """
    before = proto.ir_version
    if before > max_ir and not proto.functions and not proto.graph.sparse_initializer:
        proto.ir_version = max_ir
    return before, proto.ir_version


def check_model(proto: onnx.ModelProto) -> None:
    """``onnx.checker`` (with shape inference) on the in-memory model, and no external data anywhere."""
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise UserError(f"initializer {t.name} is stored as external data; the bundle needs one self-contained model.onnx")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise UserError(f"the exported ONNX graph fails onnx.checker: {str(e).splitlines()[0]}") from None

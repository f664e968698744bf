"""Pre-flight check of an ONNX graph against a target runtime: opset, IR version, every operator, Q/DQ zero points."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterator

import onnx
from onnx import numpy_helper

from export.targets import TARGETS, Target
from redistill.errors import UserError

DEFAULT_DOMAINS = ("", "ai.onnx")


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g)
            for g in a.graphs:
                yield from _nodes(g)


def default_opset(proto: onnx.ModelProto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in DEFAULT_DOMAINS), default=0)


def zero_point_problems(proto: onnx.ModelProto) -> list:
    """Names of Q/DQ nodes whose scale/zero point is not a constant initializer or whose zero point is not 0 int8."""
    inits = {t.name: t for t in proto.graph.initializer}
    bad = []
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if n.input[1] not in inits or len(n.input) < 3 or n.input[2] not in inits:
            bad.append(f"{n.name or n.output[0]} (scale and zero point must be initializers)")
            continue
        zp = inits[n.input[2]]
        if zp.data_type != onnx.TensorProto.INT8 or numpy_helper.to_array(zp).any():
            bad.append(f"{n.name or n.output[0]} (zero point must be int8 0)")
    return bad


def _unrestricted(target: Target) -> str:
    """The targets of ``target``'s precision that take any operator ONNX Runtime runs, as a fix to suggest."""
    names = [t.name for t in TARGETS.values() if t.allowed_ops is None and t.precision == target.precision]
    return " or ".join(f"--target {n}" for n in names) or "a target without an operator list"


def preflight(proto: onnx.ModelProto, target: Target) -> Dict[str, Any]:
    """Raise a UserError naming the first thing ``target`` would reject; return a summary for the manifest."""
    opset = default_opset(proto)
    if opset > target.max_opset:
        raise UserError(f"opset {opset} is above {target.max_opset}, the highest {target.runtime} parses; "
                        f"export with --opset {target.max_opset} or lower")
    if proto.ir_version > target.max_ir_version:
        raise UserError(f"ONNX IR version {proto.ir_version} is above {target.max_ir_version} for {target.runtime}; "
                        "re-export with the legacy exporter at opset <= 13")
    other = sorted({o.domain for o in proto.opset_import if o.domain not in DEFAULT_DOMAINS})
    inits = {t.name for t in proto.graph.initializer}
    counts: Counter = Counter()
    for node in _nodes(proto.graph):
        counts[node.op_type] += 1
        where = f"node {node.name or node.output[0]!r} ({node.op_type})"
        if target.allowed_ops is not None:
            if node.domain not in DEFAULT_DOMAINS:
                raise UserError(f"{where} is in the custom domain {node.domain!r}, which {target.runtime} does not parse; "
                                "remove it before export")
            if node.op_type not in target.allowed_ops:
                raise UserError(f"{where} is not supported by {target.runtime} (source: {target.ops_source}); "
                                f"replace the layer that produces it or use {_unrestricted(target)}")
            if node.op_type == "Clip" and any(i and i not in inits for i in node.input[1:]):
                raise UserError(f"{where}: min/max must be initializers for {target.runtime}")
    if other and target.allowed_ops is not None:
        raise UserError(f"the graph imports opset domain(s) {other}, which {target.runtime} does not parse")
    bad = zero_point_problems(proto)
    if bad and target.allowed_ops is not None:
        raise UserError(f"Q/DQ node {bad[0]}: {target.runtime} needs symmetric quantization with zero point 0")
    return {
        "target": target.name, "runtime": target.runtime, "backend": target.backend, "opset": opset,
        "ir_version": proto.ir_version, "max_opset": target.max_opset, "ops_source": target.ops_source, "op_counts": dict(sorted(counts.items())),
        "passed": True,
    }

"""Per-node INT8 sensitivity: how much quantization noise each quantized node adds, measured with onnxruntime's
QDQ debugging tools (``onnxruntime.quantization.qdq_loss_debug``) on real images.

Both graphs are augmented to output every intermediate tensor (``modify_model_output_intermediate_tensors``),
run on the same images (``collect_activations``), and each quantized tensor is matched with its float original
(``create_activation_matching``). The error measure is an SQNR as ``compute_activation_error`` defines it
(signal power over error power, in dB), computed here from power sums over chunks of images so that memory
stays flat for any number of them.

The candidates for float are units: a quantized node with the pass-through nodes (ReLU, Clip, MaxPool, reshapes)
that only it reads, since such a node kept in float alone is re-quantized on the same scale and changes nothing.
A unit's sensitivity is the noise it adds: the error-to-signal ratio of its output in the quantized graph against
the float graph, minus the worst such ratio among its inputs before their own Q/DQ. That counts the unit's input
quantization, its weight quantization and what it makes of the noise it is given, which is what keeping it in
float removes; a unit fed clean inputs (the first conv) is judged by its own noise alone.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import onnx

from export.quantize import FeedReader, graph_batch, quantized_nodes, quiet_ort

#: images per collect_activations call: every intermediate tensor of both graphs is held for this many at a time
CHUNK = 32
#: operators whose output, re-quantized on the scale of their input, carries the input's quantization unchanged
#: (ReLU, ReLU6, max pooling, reshapes): kept in float alone they change nothing, so each joins its consumer
PASS_THROUGH = frozenset({"Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                          "Identity", "DepthToSpace", "SpaceToDepth"})


@dataclass
class NodeSensitivity:
    """One unit that can be kept in float, a quantized node with the pass-through nodes feeding only it, and the
    quantization noise measured around it."""

    name: str  # the unit's node that computes (the last one)
    op_type: str
    nodes: List[str]  # every node of the unit, in graph order (kept in float together)
    output_sqnr_db: float  # float vs quantized graph at the unit's output (all the noise up to here)
    input_sqnr_db: float  # the unit's worst input, before that input's own Q/DQ (inf: a clean input)
    added_noise: float  # error/signal power at the output minus the worst input's: what the unit adds

    @property
    def added_db(self) -> float:
        """The added noise as an SQNR in dB (lower = more sensitive)."""
        return _db(self.added_noise)

    def record(self) -> Dict[str, Any]:
        """JSON-safe: rounded, and None for an infinite SQNR (no error)."""
        r = asdict(self)
        r["added_sqnr_db"] = self.added_db
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else round(v, 6) if isinstance(v, float) else v)
                for k, v in r.items()}


def _db(ratio: float) -> float:
    """An error/signal power ratio as an SQNR in dB (inf for no error)."""
    return math.inf if ratio <= 0 else -10.0 * math.log10(ratio)


class _Power:
    """Signal and error power per tensor, summed over chunks."""

    def __init__(self):
        self.signal: Dict[str, float] = {}
        self.error: Dict[str, float] = {}

    def add(self, name: str, ref: np.ndarray, got: np.ndarray) -> None:
        ref, got = ref.astype(np.float64), got.astype(np.float64)
        self.signal[name] = self.signal.get(name, 0.0) + float(ref @ ref)
        d = ref - got
        self.error[name] = self.error.get(name, 0.0) + float(d @ d)

    def ratio(self, name: str) -> float:
        """Error over signal power (0 for a tensor never seen or without signal: treated as clean)."""
        s = self.signal.get(name, 0.0)
        return self.error.get(name, 0.0) / s if s > 0 else 0.0


def units(fp32: onnx.ModelProto, q: onnx.ModelProto) -> Dict[str, List[str]]:
    """``{computing node: its unit}``: each quantized node of ``q``, with the pass-through nodes whose output only it
    reads; a pass-through node with several readers, or none quantized, belongs to no unit (float alone, it would
    change nothing)."""
    quant = set(quantized_nodes(q))
    readers: Dict[str, List[str]] = {}
    for n in fp32.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    outputs = {o.name for o in fp32.graph.output}
    owner: Dict[str, Optional[str]] = {}
    for n in reversed(fp32.graph.node):  # exporters write nodes in topological order: readers come first here
        if n.name not in quant:
            continue
        if n.op_type not in PASS_THROUGH:
            owner[n.name] = n.name
            continue
        r = readers.get(n.output[0], [])
        owner[n.name] = owner.get(r[0]) if len(r) == 1 and n.output[0] not in outputs else None
    groups: Dict[str, List[str]] = {}
    for n in fp32.graph.node:
        if owner.get(n.name):
            groups.setdefault(owner[n.name], []).append(n.name)
    return groups


def node_sensitivity(fp32: onnx.ModelProto, q: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                     chunk: int = CHUNK) -> List[NodeSensitivity]:
    """Every unit of quantized nodes of ``q`` (the QDQ form of ``fp32``, same node names), most sensitive first."""
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    power = _Power()
    n = len(next(iter(feeds.values())))
    batch = graph_batch(fp32)
    with tempfile.TemporaryDirectory(prefix="redistill-qdq-debug-") as tmp, quiet_ort():
        paths = {}
        for tag, proto in (("float", fp32), ("qdq", q)):
            src, aug = Path(tmp) / f"{tag}.onnx", Path(tmp) / f"{tag}.aug.onnx"
            onnx.save(proto, src)
            modify_model_output_intermediate_tensors(str(src), str(aug))
            paths[tag] = str(aug)
        for start in range(0, n, chunk):
            part = {k: v[start:start + chunk] for k, v in feeds.items()}
            fa = collect_activations(paths["float"], FeedReader(part, batch))
            qa = collect_activations(paths["qdq"], FeedReader(part, batch))
            match = create_activation_matching(qa, fa)
            for name, ref in fa.items():
                pre = match[name]["pre_qdq"] if name in match else qa.get(name)  # the producer's raw output
                if pre is not None:
                    power.add(name, np.concatenate([a.ravel() for a in ref]), np.concatenate([a.ravel() for a in pre]))
    by_name = {node.name: node for node in fp32.graph.node}
    inits = {t.name for t in fp32.graph.initializer}
    out: List[NodeSensitivity] = []
    for sink, members in units(fp32, q).items():
        made = {o for m in members for o in by_name[m].output}
        ins = {i for m in members for i in by_name[m].input if i and i not in inits and i not in made}
        r_in = max((power.ratio(i) for i in ins), default=0.0)
        r_out = power.ratio(by_name[sink].output[0])
        out.append(NodeSensitivity(sink, by_name[sink].op_type, members, _db(r_out), _db(r_in), r_out - r_in))
    return sorted(out, key=lambda s: -s.added_noise)

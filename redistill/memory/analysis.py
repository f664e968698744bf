"""Theoretical peak activation memory of an ONNX graph (liveness), with the paper's layer-wise estimate beside it.

Liveness: walk the nodes in the graph's order; a tensor is alive from the node
that produces it (graph inputs from the start) to its last consumer (graph
outputs to the end). Memory at a node = bytes of every live activation,
including that node's inputs and outputs; the peak is the maximum over nodes.
Weights and constants are reported separately and never count towards a peak.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from redistill.errors import UserError, did_you_mean
from redistill.registry import Registry

#: one-line meaning of every figure, copied into JSON reports and bundle manifests
DEFINITION = (
    "Activation bytes for one forward pass, weights excluded. peak_bytes (liveness): nodes run in the "
    "ONNX graph's order; a tensor is alive from the node that produces it (graph inputs from the start) "
    "to its last consumer (graph outputs to the end); at each node the live tensors, its own inputs and "
    "outputs included, are summed; the peak is the maximum over nodes. inplace_peak_bytes: the same, "
    "but element-wise activations and Add/Sub/Mul/Div reuse an input buffer whose last use they are (same "
    "shape and type as the output), and x * HardSigmoid(x) or x * Sigmoid(x) (Hardswish, SiLU) runs as one "
    "in-place op. "
    "layerwise_peak_bytes (the paper's estimate): each Conv/Gemm/MatMul costs its input + output plus "
    "the tensors held across it (residuals, RED block inputs); maximum over those layers. "
    "weights_bytes: initializers and Constant outputs."
)

DTYPES = ("fp32", "fp16", "int8")
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}

# ONNX TensorProto element type -> (name, bytes per element)
_ELEM = {
    1: ("float32", 4), 2: ("uint8", 1), 3: ("int8", 1), 4: ("uint16", 2), 5: ("int16", 2),
    6: ("int32", 4), 7: ("int64", 8), 9: ("bool", 1), 10: ("float16", 2), 11: ("float64", 8),
    12: ("uint32", 4), 13: ("uint64", 8), 14: ("complex64", 8), 15: ("complex128", 16),
    16: ("bfloat16", 2), 17: ("float8e4m3fn", 1), 18: ("float8e4m3fnuz", 1), 19: ("float8e5m2", 1),
    20: ("float8e5m2fnuz", 1),
}
_FLOAT_TYPES = {1, 10, 11, 16, 17, 18, 19, 20}

#: ops whose cost the layer-wise (paper) estimate looks at
LAYER_OPS = frozenset({"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "Gemm", "MatMul",
                       "MatMulInteger", "QLinearMatMul"})


# --- in-place rules: op type -> indices of the inputs whose buffer the (first) output may reuse ----

INPLACE_RULES: Registry[Callable[[Any], Sequence[int]]] = Registry("in-place rule")


def _first_input(node) -> Sequence[int]:
    return (0,)


def _all_inputs(node) -> Sequence[int]:
    return tuple(range(len(node.input)))


for _op in ("Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
            "Selu", "Celu", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Gelu"):
    INPLACE_RULES.register(_op)(_first_input)
# binary element-wise ops: either input, e.g. the Mul of x and HardSigmoid(x) that Hardswish exports as at
# opset 13 writes over HardSigmoid's output; a broadcast input (another shape) is never taken (see _inplace_live)
for _op in ("Add", "Sub", "Mul", "Div"):
    INPLACE_RULES.register(_op)(_all_inputs)

#: x * f(x) gates an engine runs as one in-place op: Hardswish and SiLU export at opset 13 as HardSigmoid or
#: Sigmoid then Mul; when f(x) feeds only that Mul its values never need a buffer of their own
FUSED_GATES = frozenset({"HardSigmoid", "Sigmoid"})


def fmt_bytes(n: Optional[float]) -> str:
    """Human-readable size in binary units (B, KiB, MiB, GiB)."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# --- the report ---------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    name: str
    shape: List[int]
    elem_type: str
    bytes: int
    producer: int  # node index, -1 for a graph input
    last_use: int  # node index, len(nodes) for a graph output


@dataclass
class NodeRow:
    """Live memory at one compute node (nodes that only make constants are left out)."""

    index: int  # position in the ONNX graph's node list
    name: str
    op: str
    live_bytes: int
    alive: List[str]
    is_layer: bool = False  # counted by the layer-wise estimate
    inplace_live_bytes: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        d = {"index": self.index, "name": self.name, "op": self.op, "live_bytes": self.live_bytes,
             "alive": self.alive, "is_layer": self.is_layer}
        if self.inplace_live_bytes is not None:
            d["inplace_live_bytes"] = self.inplace_live_bytes
        return d


@dataclass
class MemoryReport:
    """Everything one analysis found; sizes in bytes."""

    model: str
    batch: int
    dtype: str  # "as-typed" or the --dtype re-costing
    peak_bytes: int
    peak_node: Optional[str]
    layerwise_peak_bytes: Optional[int]
    layerwise_peak_node: Optional[str]
    weights_bytes: int
    input_bytes: int
    output_bytes: int
    activation_types: List[str]
    nodes: List[NodeRow]
    tensors: Dict[str, TensorInfo] = field(repr=False, default_factory=dict)
    inplace_peak_bytes: Optional[int] = None
    inplace_peak_node: Optional[str] = None

    @property
    def peak_row(self) -> Optional[NodeRow]:
        return next((r for r in self.nodes if r.name == self.peak_node), None)

    def peak_explanation(self) -> str:
        """Which tensors make up the peak, largest first: 'node (op): a [1x32x64x64] 512 KiB + ...'."""
        row = self.peak_row
        if row is None:
            return "no nodes"
        parts = sorted(row.alive, key=lambda t: -self.tensors[t].bytes)
        desc = " + ".join(
            f"{t} [{'x'.join(map(str, self.tensors[t].shape))}] {fmt_bytes(self.tensors[t].bytes)}" for t in parts
        )
        return f"{row.name} ({row.op}): {desc}"

    def summary(self) -> Dict[str, Any]:
        return {
            "model": self.model, "batch": self.batch, "dtype": self.dtype,
            "peak_bytes": self.peak_bytes, "peak_node": self.peak_node,
            "inplace_peak_bytes": self.inplace_peak_bytes, "inplace_peak_node": self.inplace_peak_node,
            "layerwise_peak_bytes": self.layerwise_peak_bytes, "layerwise_peak_node": self.layerwise_peak_node,
            "weights_bytes": self.weights_bytes, "input_bytes": self.input_bytes, "output_bytes": self.output_bytes,
            "activation_types": self.activation_types,
        }

    def to_dict(self) -> Dict[str, Any]:
        d = self.summary()
        d["definition"] = DEFINITION
        d["tensors"] = {t.name: {"shape": t.shape, "type": t.elem_type, "bytes": t.bytes} for t in self.tensors.values()}
        d["nodes"] = [r.to_dict() for r in self.nodes]
        return d


# --- loading and shapes ---------------------------------------------------------------------------


def _load(model_or_path):
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return copy.deepcopy(model_or_path), getattr(model_or_path.graph, "name", "") or "model"
    path = Path(model_or_path)
    if not path.is_file():
        raise UserError(f"ONNX file {str(path)!r} not found: check the path")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises several unrelated types for garbage
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read {str(path)!r} as an ONNX model ({first}); re-export it") from None
    if not model.graph.node and not model.graph.input:
        raise UserError(f"{str(path)!r} holds no ONNX graph (empty or not an ONNX file); re-export it")
    return model, path.name


def _set_batch(model, batch: int) -> None:
    """Set dim 0 of every graph input to ``batch``; drop stale intermediate shapes if that changed anything."""
    inits = {i.name for i in model.graph.initializer}
    changed = False
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        tt = inp.type.tensor_type
        if not tt.HasField("shape") or len(tt.shape.dim) == 0:
            continue
        d0 = tt.shape.dim[0]
        if d0.HasField("dim_value") and d0.dim_value == batch:
            continue
        d0.Clear()
        d0.dim_value = batch
        changed = True
    if changed:
        del model.graph.value_info[:]
        for out in model.graph.output:
            if out.type.HasField("tensor_type"):
                out.type.tensor_type.ClearField("shape")


def _static_names(model) -> Set[str]:
    g = model.graph
    out = set()
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out.add(v.name)
    return out


def _infer(model):
    """ONNX shape inference; where it leaves shapes unknown (GroupNorm's Shape->Reshape chains from the
    legacy exporter), ONNX Runtime's symbolic shape inference, which follows those chains."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=True, data_prop=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise UserError(f"ONNX shape inference failed: {first}; re-export the model with a fixed input size") from None
    known = _static_names(inferred)
    if all(o in known for n in inferred.graph.node for o in n.output if o):
        return inferred
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            symbolic = SymbolicShapeInference.infer_shapes(model, auto_merge=False)
    except Exception:  # noqa: BLE001 - ORT's inference is a best effort; the caller names the unknown tensor
        return inferred
    return symbolic if symbolic is not None and len(_static_names(symbolic)) > len(known) else inferred


def _subgraph_names(node) -> Set[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read: they stay alive until this node."""
    names: Set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                for sub in n.attribute:
                    if sub.HasField("g") or len(sub.graphs):
                        names |= _subgraph_names(n)
    return names


# --- the analysis ---------------------------------------------------------------------------------


def analyze_onnx(model_or_path, batch: int = 1, dtype: Optional[str] = None, inplace: bool = False,
                 name: Optional[str] = None) -> MemoryReport:
    """Liveness peak, layer-wise estimate and weights of an ONNX graph (a path or a ModelProto)."""
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    if dtype is not None and dtype not in _DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}." + did_you_mean(str(dtype), DTYPES))
    model, default_name = _load(model_or_path)
    _set_batch(model, batch)
    model = _infer(model)
    g = model.graph
    nodes = list(g.node)
    n_nodes = len(nodes)

    def elem_size(elem: int, tensor: str) -> int:
        if elem not in _ELEM:
            from onnx import TensorProto

            tname = TensorProto.DataType.Name(elem) if elem in TensorProto.DataType.values() else str(elem)
            raise UserError(
                f"tensor {tensor!r} has element type {tname}, which has no fixed byte size; "
                "cast it to a numeric type before export"
            )
        if dtype is not None and elem in _FLOAT_TYPES:
            return _DTYPE_BYTES[dtype]
        return _ELEM[elem][1]

    # constants: initializers, Constant outputs, and anything computed from constants alone
    weights_bytes = 0
    constants: Set[str] = set()
    for init in g.initializer:
        constants.add(init.name)
        numel = 1
        for d in init.dims:
            numel *= d
        weights_bytes += numel * elem_size(init.data_type, init.name)
    types: Dict[str, Any] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type
    for n in nodes:
        if n.op_type == "Constant":
            for o in n.output:
                constants.add(o)
                weights_bytes += _tensor_bytes(o, types, elem_size, constant=True)
        elif n.input and all((not i) or i in constants for i in n.input):
            constants.update(o for o in n.output if o)

    # activations and their live ranges
    tensors: Dict[str, TensorInfo] = {}

    def add_tensor(tname: str, producer: int) -> None:
        shape, elem = _shape_of(tname, types)
        nbytes = 1
        for d in shape:
            nbytes *= d
        nbytes *= elem_size(elem, tname)
        ename = _ELEM[elem][0]
        if dtype is not None and elem in _FLOAT_TYPES:
            ename = {"fp32": "float32", "fp16": "float16", "int8": "int8"}[dtype]
        tensors[tname] = TensorInfo(tname, shape, ename, nbytes, producer, producer)

    graph_inputs = [i.name for i in g.input if i.name not in constants]
    for tname in graph_inputs:
        add_tensor(tname, -1)
    for idx, n in enumerate(nodes):
        used = [i for i in n.input if i] + sorted(i for i in _subgraph_names(n) if i in tensors)
        for i in used:
            if i in constants:
                continue
            if i not in tensors:
                raise UserError(
                    f"node {n.name or n.op_type!r} reads tensor {i!r} before any node produces it: the graph is not "
                    "topologically sorted or is missing an input; re-export it"
                )
            tensors[i].last_use = max(tensors[i].last_use, idx)
        for o in n.output:
            if o and o not in constants:
                add_tensor(o, idx)
    graph_outputs = {o.name for o in g.output}
    for o in graph_outputs:
        if o in tensors:
            tensors[o].last_use = n_nodes

    names = _node_names(nodes)
    rows: List[NodeRow] = []
    # a weight/constant node is left out: what is alive across it is also alive at the next compute node
    compute = [any(o and o not in constants for o in n.output) for n in nodes]
    for idx, alive, live_bytes in _live_sets(n_nodes, tensors, compute):
        rows.append(NodeRow(idx, names[idx], nodes[idx].op_type, live_bytes, alive,
                            is_layer=nodes[idx].op_type in LAYER_OPS))

    if inplace:
        live = _inplace_live(nodes, tensors, set(graph_inputs))
        for row in rows:
            row.inplace_live_bytes = live[row.index]

    def peak(key, rows_):
        best = max(rows_, key=key, default=None)  # first maximum in execution order
        return (key(best), best.name) if best is not None else (None, None)

    peak_bytes, peak_node = peak(lambda r: r.live_bytes, rows)
    lw_bytes, lw_node = peak(lambda r: r.live_bytes, [r for r in rows if r.is_layer])
    ip_bytes, ip_node = peak(lambda r: r.inplace_live_bytes, rows) if inplace else (None, None)
    if peak_bytes is None:  # a graph with no nodes: the inputs are all there is
        peak_bytes = sum(tensors[t].bytes for t in graph_inputs)
        ip_bytes = peak_bytes if inplace else None
    return MemoryReport(
        model=name or default_name,
        batch=batch,
        dtype=dtype or "as-typed",
        peak_bytes=peak_bytes,
        peak_node=peak_node,
        layerwise_peak_bytes=lw_bytes,
        layerwise_peak_node=lw_node,
        weights_bytes=weights_bytes,
        input_bytes=sum(tensors[t].bytes for t in graph_inputs),
        output_bytes=sum(tensors[t].bytes for t in graph_outputs if t in tensors),
        activation_types=sorted({t.elem_type for t in tensors.values()}),
        nodes=rows,
        tensors=tensors,
        inplace_peak_bytes=ip_bytes,
        inplace_peak_node=ip_node,
    )


def _shape_of(tname: str, types: Dict[str, Any]):
    tp = types.get(tname)
    if tp is None or not tp.HasField("tensor_type"):
        kind = "a non-tensor type" if tp is not None else "no type or shape after shape inference"
        raise UserError(f"tensor {tname!r} has {kind}; re-export the model with static shapes (fixed input size)")
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        raise UserError(f"tensor {tname!r} has an unknown rank after shape inference; re-export with a fixed input size")
    shape = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value"):
            what = f"dynamic dimension {d.dim_param!r}" if d.dim_param else "a dimension of unknown size"
            raise UserError(
                f"tensor {tname!r} has {what} with no value; re-export the model with a fixed input size "
                "(only the batch dimension of graph inputs is set by --batch)"
            )
        shape.append(int(d.dim_value))
    return shape, tt.elem_type


def _tensor_bytes(tname, types, elem_size, constant=False) -> int:
    try:
        shape, elem = _shape_of(tname, types)
    except UserError:
        if constant:
            return 0  # a Constant without inferred shape: unknown size, not an activation either way
        raise
    n = 1
    for d in shape:
        n *= d
    return n * elem_size(elem, tname)


def _node_names(nodes) -> List[str]:
    """Node names, with 'Op_index' for unnamed nodes and '#k' suffixes for duplicates."""
    out, seen = [], {}
    for idx, n in enumerate(nodes):
        name = n.name or f"{n.op_type}_{idx}"
        if name in seen:
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


def _live_sets(n_nodes: int, tensors: Dict[str, TensorInfo], compute: Sequence[bool]):
    """(node index, tensors alive, their bytes) at every compute node, in one sweep over start and end events.

    A tensor enters the live set at its producer (graph inputs before node 0) and leaves after its last use;
    the live set keeps (producer, name) order, so each row lists its tensors as a rescan would.
    """
    starts: Dict[int, List[TensorInfo]] = {}
    ends: Dict[int, List[str]] = {}
    for t in sorted(tensors.values(), key=lambda t: (t.producer, t.name)):
        if t.last_use < 0:
            continue  # a graph input no node reads
        starts.setdefault(max(t.producer, 0), []).append(t)
        ends.setdefault(t.last_use, []).append(t.name)
    live: Dict[str, int] = {}
    total = 0
    for idx in range(n_nodes):
        for t in starts.get(idx, ()):
            live[t.name] = t.bytes
            total += t.bytes
        if compute[idx]:
            yield idx, list(live), total
        for name in ends.get(idx, ()):
            total -= live.pop(name)


def _interval_sums(n_nodes: int, intervals) -> List[int]:
    """Per node index, the summed size of the (start, end, size) intervals covering it (ends inclusive)."""
    diff = [0] * (n_nodes + 1)
    for start, end, size in intervals:
        start, end = max(start, 0), min(end, n_nodes - 1)
        if start <= end:
            diff[start] += size
            diff[end + 1] -= size
    out, running = [], 0
    for d in diff[:n_nodes]:
        running += d
        out.append(running)
    return out


def _fused_gates(nodes, tensors: Dict[str, TensorInfo]) -> Set[str]:
    """Outputs f(x) of FUSED_GATES nodes read only by a Mul of x and f(x) of one shape: Hardswish, SiLU."""
    readers: Dict[str, List[int]] = {}
    for idx, n in enumerate(nodes):
        for i in set(n.input):
            readers.setdefault(i, []).append(idx)
    fused = set()
    for n in nodes:
        if n.op_type not in FUSED_GATES or not n.input or not n.output:
            continue
        x, h = n.input[0], n.output[0]
        if x not in tensors or h not in tensors or tensors[x].shape != tensors[h].shape:
            continue
        use = readers.get(h, [])
        if len(use) == 1 and tensors[h].last_use == use[0] and nodes[use[0]].op_type == "Mul" \
                and sorted(nodes[use[0]].input) == sorted([x, h]):
            fused.add(h)
    return fused


def _inplace_live(nodes, tensors: Dict[str, TensorInfo], graph_inputs: Set[str]) -> List[int]:
    """Per-node live bytes when in-place rules let an output take over a dying input's buffer."""
    fused = _fused_gates(nodes, tensors)
    buffer_of = {name: name for name in tensors}  # tensor -> buffer (named after its first tensor)
    buf_size = {name: 0 if name in fused else t.bytes for name, t in tensors.items()}
    buf_start = {name: t.producer for name, t in tensors.items()}
    buf_end = {name: t.last_use for name, t in tensors.items()}
    for idx, n in enumerate(nodes):
        if n.op_type not in INPLACE_RULES or not n.output or n.output[0] not in tensors:
            continue
        out = tensors[n.output[0]]
        for k in INPLACE_RULES.get(n.op_type)(n):
            if k >= len(n.input) or n.input[k] not in tensors:
                continue
            src = tensors[n.input[k]]
            if (src.name in graph_inputs or src.name in fused or src.last_use != idx or src.bytes != out.bytes
                    or src.shape != out.shape or src.elem_type != out.elem_type or list(n.input).count(src.name) > 1):
                continue
            buf = buffer_of[src.name]
            buffer_of[out.name] = buf
            buf_end[buf] = max(buf_end[buf], out.last_use)
            del buf_size[out.name], buf_start[out.name], buf_end[out.name]
            break
    return _interval_sums(len(nodes), ((buf_start[b], buf_end[b], size) for b, size in buf_size.items()))


def manifest_entry(onnx_path, batch: int = 1, dtype: Optional[str] = None) -> Dict[str, Any]:
    """Small JSON-ready summary of an exported graph's theoretical memory, for a bundle manifest."""
    r = analyze_onnx(onnx_path, batch=batch, dtype=dtype, inplace=True)
    return {
        "peak_bytes": r.peak_bytes,
        "peak_node": r.peak_node,
        "inplace_peak_bytes": r.inplace_peak_bytes,
        "layerwise_peak_bytes": r.layerwise_peak_bytes,
        "layerwise_peak_node": r.layerwise_peak_node,
        "weights_bytes": r.weights_bytes,
        "batch": r.batch,
        "dtype": r.dtype,
        "activation_types": r.activation_types,
        "definition": DEFINITION,
    }

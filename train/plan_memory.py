"""Peak memory, MACs and parameters of many stride schedules of one family, without exporting each one.

Schedules of a family differ in their Conv/pool strides and, where a stride decides a residual or a downsample
branch, in structure. One weightless ONNX graph is exported per structure; each schedule patches its strides
into a copy and splices its RED blocks in as ONNX nodes (where the real export puts them: before and after the
site layer, a BatchNorm left unfolded behind a RED block on a conv's output), and the copy goes through
``redistill.memory.analyze_onnx``, as ``redistill memory`` does. What the splice cannot place is exported whole.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from redistill.errors import UserError
from redistill.memory import MemoryReport, analyze_onnx
from train.design import export_for_analysis
from train.models import FAMILIES, build_model, parse_arch
from train.red import REDBlock, insert_red_blocks, plan_sites
from train.skeleton import no_weight_init, skeleton

_STRIDED_OPS = ("Conv", "MaxPool", "AveragePool")
_KEEP_VALUES = 64  # initializers up to this many elements keep their values (shapes, clip bounds); weights lose them


@dataclass
class Figures:
    """One network at one image size: its memory report, multiply-accumulates per image, trainable parameters."""

    report: MemoryReport
    macs: int
    params: int


@dataclass
class _Template:
    graph: onnx.ModelProto  # as exported, weights without values
    strided: Dict[int, str]  # node index -> module path, for every Conv/pool node


def module_scope(path: str) -> str:
    """The legacy exporter's node-name scope of a module: ``features.2.conv.1.0`` ->
    ``/features/features.2/conv/conv.1/conv.1.0`` (an index joins the name before it)."""
    segments, last = [], ""
    for part in path.split("."):
        last = f"{last}.{part}" if part.isdigit() and last else part
        segments.append(last)
    return "/" + "/".join(segments)


def structure_key(model: nn.Module) -> tuple:
    """Every module's type and settings except its stride: schedules with equal keys export graphs that differ
    only in the strides of their Conv/pool nodes."""
    key = []
    for name, m in model.named_modules():
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                             if not k.startswith("_") and k not in ("stride", "training", "arch_name")
                             and isinstance(v, (bool, int, float, str, tuple))))
        key.append((name, type(m).__name__, attrs))
    return tuple(key)


@lru_cache(maxsize=None)
def red_block_params(channels: int) -> int:
    """Trainable parameters of one RED block of ``channels`` channels."""
    with torch.device("meta"), no_weight_init():
        return sum(p.numel() for p in REDBlock(channels).parameters())


def count_macs(graph: onnx.ModelProto, report: MemoryReport) -> int:
    """Multiply-accumulates per image of the Conv, ConvTranspose, Gemm and MatMul nodes, from the analysed shapes."""
    dims = {i.name: list(i.dims) for i in graph.graph.initializer}

    def shape(name):
        return report.tensors[name].shape if name in report.tensors else dims.get(name)

    def numel(s):
        n = 1
        for d in s:
            n *= d
        return n

    macs = 0
    for node in graph.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        a, w, out = shape(node.input[0]), shape(node.input[1]), shape(node.output[0])
        if a is None or w is None or out is None:
            continue
        if node.op_type == "Conv":
            macs += numel(out) * numel(w[1:])
        elif node.op_type == "ConvTranspose":
            macs += numel(a) * numel(w[1:])
        elif node.op_type == "Gemm":
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            macs += numel(out) * (a[0] if trans_a else a[-1])
        else:
            macs += numel(out) * a[-1]
    return macs // max(report.batch, 1)


def _weightless(graph: onnx.ModelProto) -> onnx.ModelProto:
    for init in graph.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        if n > _KEEP_VALUES:
            for f in ("raw_data", "float_data", "double_data", "int32_data", "int64_data"):
                init.ClearField(f)
    return graph


def _tensor(name: str, dims: Sequence[int], values: Optional[Sequence[float]] = None) -> TensorProto:
    """A float initializer; without ``values`` it has a shape and no data (enough for shapes and weight bytes)."""
    if values is not None:
        return helper.make_tensor(name, TensorProto.FLOAT, list(dims), list(values))
    t = TensorProto(name=name, data_type=TensorProto.FLOAT)
    t.dims.extend(dims)
    return t


def _red_nodes(prefix: str, x: str, y: str, c: int):
    """The nodes and weights of one RED block, in the exporter's order: gate conv, sigmoid, product, encode conv,
    clip (ReLU6), sum; BatchNorms folded into the convs."""
    n = lambda op: f"{prefix}/{op}"  # noqa: E731 - names only
    inits = [_tensor(n("gate.w"), [c, c, 1, 1]), _tensor(n("gate.b"), [c]), _tensor(n("encode.w"), [c, c, 3, 3]),
             _tensor(n("encode.b"), [c]), _tensor(n("min"), [], [0.0]), _tensor(n("max"), [], [6.0])]
    conv = dict(dilations=[1, 1], group=1, strides=[1, 1])
    nodes = [
        helper.make_node("Conv", [x, n("gate.w"), n("gate.b")], [n("gate")], name=n("gate/Conv"),
                         kernel_shape=[1, 1], pads=[0, 0, 0, 0], **conv),
        helper.make_node("Sigmoid", [n("gate")], [n("sigmoid")], name=n("Sigmoid")),
        helper.make_node("Mul", [x, n("sigmoid")], [n("mul")], name=n("Mul")),
        helper.make_node("Conv", [x, n("encode.w"), n("encode.b")], [n("encode")], name=n("encode/Conv"),
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], **conv),
        helper.make_node("Clip", [n("encode"), n("min"), n("max")], [n("clip")], name=n("encode/Clip")),
        helper.make_node("Add", [n("mul"), n("clip")], [y], name=n("Add")),
    ]
    return nodes, inits


class ScheduleAnalyzer:
    """Figures of schedules of classifier families at one image size, batch and dtype.

    ``exact=True`` exports every network whole (the reference the fast path is tested against).
    """

    def __init__(self, image_size: int, batch: int = 1, dtype: Optional[str] = None, num_classes: int = 10,
                 exact: bool = False):
        self.image_size, self.batch, self.dtype, self.num_classes, self.exact = image_size, batch, dtype, num_classes, exact
        self._templates: Dict[tuple, Optional[_Template]] = {}
        self.exports = 0  # whole-graph exports so far (templates and fallbacks)

    def analyze(self, arch: str, sites: Sequence[dict]) -> Tuple[Figures, Figures]:
        """(the plain network ``arch``, the same with RED blocks at ``sites``), each analysed with in-place figures."""
        if FAMILIES.get(parse_arch(arch).family).task != "classify":
            raise UserError(f"{arch}: the schedule analysis sizes classifiers; use `redistill memory --arch` for it")
        meta = skeleton(arch, self.num_classes, self.image_size)
        template = None if self.exact else self._template(arch, meta)
        if template is not None:
            plain_graph = self._patched(template, meta)
            plain = self._figures(plain_graph, arch, _params(meta))
            if not sites:
                return plain, plain
            spliced = self._with_red(plain_graph, plain.report, meta, sites)
            if spliced is not None:
                red_graph, channels = spliced
                return plain, self._figures(red_graph, f"{arch}+RED",
                                            plain.params + sum(red_block_params(c) for c in channels))
        return self._exported(arch, sites)

    # --- the fast path ---------------------------------------------------------------------------

    def _template(self, arch: str, meta: nn.Module) -> Optional[_Template]:
        key = structure_key(meta)
        if key not in self._templates:
            graph = _weightless(self._export(build_model(arch, self.num_classes, self.image_size)))
            scopes = {module_scope(name): name for name, m in meta.named_modules() if name}
            strided: Dict[int, str] = {}
            for i, node in enumerate(graph.graph.node):
                if node.op_type in _STRIDED_OPS:
                    path = scopes.get(node.name.rpartition("/")[0])
                    if path is None or not hasattr(meta.get_submodule(path), "stride"):
                        strided = None  # a strided node no module accounts for: export schedules of this structure whole
                        break
                    strided[i] = path
            self._templates[key] = _Template(graph, strided) if strided is not None else None
        return self._templates[key]

    def _patched(self, template: _Template, meta: nn.Module) -> onnx.ModelProto:
        graph = onnx.ModelProto()
        graph.CopyFrom(template.graph)
        for i, path in template.strided.items():
            s = meta.get_submodule(path).stride
            s = [s, s] if isinstance(s, int) else list(s)
            node = graph.graph.node[i]
            attr = next((a for a in node.attribute if a.name == "strides"), None)
            if attr is None:
                node.attribute.append(helper.make_attribute("strides", s))
            else:
                del attr.ints[:]
                attr.ints.extend(s)
        return graph

    def _with_red(self, plain: onnx.ModelProto, report: MemoryReport, meta: nn.Module,
                  sites: Sequence[dict]) -> Optional[Tuple[onnx.ModelProto, List[int]]]:
        """``plain`` with a RED block spliced in at each site, and the blocks' channels; None where a site's layer
        is not one contiguous run of nodes with one activation in and one out."""
        graph = onnx.ModelProto()
        graph.CopyFrom(plain)
        nodes = list(graph.graph.node)
        inits = list(graph.graph.initializer)
        outputs = {o.name for o in graph.graph.output}
        channels = []
        for site in sites:
            scope = module_scope(site["student"])
            span = [i for i, n in enumerate(nodes) if n.name.startswith(scope + "/")]
            if not span or span != list(range(span[0], span[-1] + 1)):
                return None
            inside = nodes[span[0]:span[-1] + 1]
            made = {o for n in inside for o in n.output}
            ins = {i for n in inside for i in n.input if i in report.tensors and i not in made}
            later = {i for n in nodes[span[-1] + 1:] for i in n.input} | outputs
            outs = [o for n in inside for o in n.output if o in later]
            tensor = next(iter(ins)) if site["where"] == "in" and len(ins) == 1 else (
                outs[0] if site["where"] == "out" and len(outs) == 1 else None)
            if tensor is None or len(report.tensors[tensor].shape) != 4:
                return None
            c = report.tensors[tensor].shape[1]
            channels.append(c)
            prefix = f"{scope}.red_{site['where']}"
            if site["where"] == "in":
                red, weights = _red_nodes(prefix, tensor, prefix + "/out", c)
                for n in inside:
                    n.input[:] = [prefix + "/out" if i == tensor else i for i in n.input]
                nodes[span[0]:span[0]] = red
            else:
                pre = prefix + "/pre"
                producer = next(n for n in inside if tensor in n.output)
                producer.output[:] = [pre if o == tensor else o for o in producer.output]
                for n in inside:
                    n.input[:] = [pre if i == tensor else i for i in n.input]
                layer = meta.get_submodule(site["student"])
                # a conv whose BatchNorm was folded into it (bias in ONNX, none in torch) keeps that BatchNorm
                # unfolded behind the RED block, as the exporter leaves it
                unfold = isinstance(layer, nn.Conv2d) and layer.bias is None and len(producer.input) == 3
                red, weights = _red_nodes(prefix, pre, prefix + "/red" if unfold else tensor, c)
                if unfold:
                    bn = [prefix + f"/bn.{p}" for p in ("scale", "b", "mean", "var")]
                    weights += [_tensor(b, [c]) for b in bn]
                    red.append(helper.make_node("BatchNormalization", [prefix + "/red"] + bn, [tensor],
                                                name=prefix + "/BatchNormalization"))
                nodes[span[-1] + 1:span[-1] + 1] = red
            inits += weights
        del graph.graph.node[:]
        graph.graph.node.extend(nodes)
        del graph.graph.initializer[:]
        graph.graph.initializer.extend(inits)
        return graph, channels

    # --- whole exports ----------------------------------------------------------------------------

    def _export(self, model: nn.Module) -> onnx.ModelProto:
        self.exports += 1
        with tempfile.TemporaryDirectory(prefix="redistill-plan-") as tmp:
            path = export_for_analysis(model, self.image_size, Path(tmp) / "model.onnx")
            return onnx.load(str(path))

    def _exported(self, arch: str, sites: Sequence[dict]) -> Tuple[Figures, Figures]:
        model = build_model(arch, self.num_classes, self.image_size)
        plain = self._figures(_weightless(self._export(model)), arch, _params(model))
        if not sites:
            return plain, plain
        insert_red_blocks(model, plan_sites(model, None, sites, self.image_size, 1.0))
        return plain, self._figures(_weightless(self._export(model)), f"{arch}+RED", _params(model))

    def _figures(self, graph: onnx.ModelProto, name: str, params: int) -> Figures:
        report = analyze_onnx(graph, batch=self.batch, dtype=self.dtype, inplace=True, name=name)
        return Figures(report, count_macs(graph, report), params)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

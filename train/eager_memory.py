"""Measured peak memory of one eager forward pass: PyTorch's allocator, traced op by op.

The profiler's ``[memory]`` events (``torch.profiler.profile(profile_memory=True)``) list every
allocation and free the caching/CPU allocator makes, with its pointer and byte size. Summed in time
order from the start of the pass they give the byte-exact allocation peak; paired by pointer they say
which op made each block and which op freed it, so the bytes alive at the peak split into activations
(what the ONNX liveness analysis also counts), the input, and runtime scratch (a block freed by the op
that made it: weight reorders, im2col columns, workspaces). On CUDA the allocator's own
``max_memory_allocated`` is recorded beside the trace as a cross-check.
"""

from __future__ import annotations

import bisect
import copy
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from redistill.errors import UserError
from redistill.memory import MemoryReport, fmt_bytes
from train.fold import fold_batchnorm
from train.models import example_inputs

KINDS = ("activation", "input", "scratch")

#: what the measured figures include, copied into every record and JSON report
EAGER_DEFINITION = (
    "Bytes the PyTorch allocator hands out during one eager forward pass (torch.no_grad, eval mode, BatchNorm "
    "folded into the conv before it as in the exported graph, after one warm-up pass), from the profiler's "
    "[memory] events summed in time order: byte-exact for that allocator "
    "(sizes as allocated; on CUDA the caching allocator's rounded block sizes). Weights, buffers and anything "
    "allocated before the pass are excluded; the input is allocated inside the pass and reported apart. "
    "Memory allocated outside the PyTorch allocator (a library's own malloc, thread stacks, code) is not seen. "
    "A module's input stays alive until the module returns (its callers hold it), which the graph analysis "
    "does not model. "
    "Each block alive at the peak is an activation (it outlives the op that made it: what the ONNX liveness "
    "analysis counts), the input, or scratch (freed by the op that made it, or right after it with no other op "
    "in between: weight reorders and packing, im2col columns, workspaces, blocked-format copies)."
)


@dataclass
class Block:
    """One allocation alive at the peak: its size, its kind and the op that made it."""

    bytes: int
    kind: str  # activation | input | scratch
    module: str  # module path running when it was allocated ('' for the model itself)
    op: str  # the top-level aten op that allocated it
    inner_op: str  # the innermost op that called the allocator (e.g. aten::mkldnn_convolution)
    step: int  # index of that op in the timeline (-1: the input, made before the first op)

    @property
    def where(self) -> str:
        if self.kind == "input":
            return "(input)"
        return f"{self.module or '(model)'} {self.op}" + (f" > {self.inner_op}" if self.inner_op != self.op else "")


@dataclass
class Step:
    """One top-level op of the pass: the most bytes alive while it ran, and after it, by kind."""

    index: int
    module: str
    op: str
    peak_bytes: int  # all tracked bytes, maximum while the op ran
    end_bytes: int  # all tracked bytes once it returned and Python dropped what it no longer holds
    activation_bytes: int  # activations alive at that point (input and scratch excluded)
    activation_peak_bytes: int  # activations, maximum while the op ran


@dataclass
class EagerMemory:
    """The traced allocation peak of one eager forward pass, split by kind at the peak; sizes in bytes."""

    model: str
    device: str
    batch: int
    image_size: int
    threads: int
    fold_bn: bool
    peak_bytes: int  # the allocation peak: activations + input + scratch alive at once
    peak_step: int
    peak_op: str  # 'module aten::op' running at the peak
    activation_bytes: int  # at the peak, by kind
    input_bytes: int
    scratch_bytes: int
    activation_peak_bytes: int  # the most activation bytes alive at any point (input and scratch excluded)
    activation_peak_op: str
    max_scratch_bytes: int  # the largest scratch block of the pass, and its op
    max_scratch_op: str
    at_peak: List[Block]  # every block alive at the peak, largest first
    at_activation_peak: List[Block]  # the activations alive at the activation peak, largest first
    timeline: List[Step]
    allocator_peak_bytes: Optional[int] = None  # CUDA: max_memory_allocated during the pass, minus what was there
    reserved_peak_bytes: Optional[int] = None  # CUDA: the caching allocator's peak reserved bytes, minus what was there
    events: int = 0  # allocation and free events traced
    untracked_frees: int = 0  # frees of blocks allocated before the pass (ignored)
    definition: str = EAGER_DEFINITION
    resolution: str = "1 byte (exact allocator sizes)"

    def by_op(self, kind: str) -> List[Tuple[str, int]]:
        """(op, bytes) of one kind alive at the peak, summed per op, largest first."""
        sums: Dict[str, int] = {}
        for b in self.at_peak:
            if b.kind == kind:
                sums[b.where] = sums.get(b.where, 0) + b.bytes
        return sorted(sums.items(), key=lambda kv: -kv[1])

    def explain(self, top: int = 3) -> str:
        """The peak in one line: each kind's bytes and the ops that made the largest of them."""
        parts = []
        for kind, total in (("activations", self.activation_bytes), ("input", self.input_bytes),
                            ("scratch", self.scratch_bytes)):
            ops = self.by_op(kind.rstrip("s")) if kind != "input" else []
            named = ", ".join(f"{w} {fmt_bytes(b)}" for w, b in ops[:top]) + (", ..." if len(ops) > top else "")
            parts.append(f"{kind} {fmt_bytes(total)}" + (f" ({named})" if named else ""))
        return f"{fmt_bytes(self.peak_bytes)} at {self.peak_op}: " + "; ".join(parts)

    def explain_activations(self, top: int = 4) -> str:
        """The activation peak in one line: the ops whose outputs were alive then, largest first."""
        sums: Dict[str, int] = {}
        for b in self.at_activation_peak:
            sums[b.where] = sums.get(b.where, 0) + b.bytes
        ops = sorted(sums.items(), key=lambda kv: -kv[1])
        named = ", ".join(f"{w} {fmt_bytes(b)}" for w, b in ops[:top]) + (", ..." if len(ops) > top else "")
        return f"{fmt_bytes(self.activation_peak_bytes)} at {self.activation_peak_op}: {named}"

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["at_peak"] = [{**asdict(b), "where": b.where} for b in self.at_peak]
        d["at_activation_peak"] = [{**asdict(b), "where": b.where} for b in self.at_activation_peak]
        return d


# --- the trace -------------------------------------------------------------------------------

_SCOPE = "redistill::"  # record_function scopes this module opens (module paths, the input, the pass)
_PASS, _INPUT = _SCOPE + "pass", _SCOPE + "input"


class _ModuleScopes:
    """Forward hooks that open a profiler scope named after each module's path while it runs.

    Plain ``nn.Sequential`` containers get none: they run no op of their own (their children carry the
    paths), and a hook on one would make a network that runs it block by block (``train.models``' ResNets)
    call it whole, holding its input to the end."""

    def __init__(self, model: nn.Module):
        self.handles = []
        self.stack: List[Any] = []
        for name, mod in model.named_modules():
            if type(mod) is nn.Sequential:
                continue
            self.handles.append(mod.register_forward_pre_hook(self._enter(name)))
            self.handles.append(mod.register_forward_hook(self._exit))

    def _enter(self, name):
        def hook(mod, inp):
            rf = torch.autograd.profiler.record_function(_SCOPE + "module:" + name)
            rf.__enter__()
            self.stack.append(rf)
        return hook

    def _exit(self, mod, inp, out):
        self.stack.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


@dataclass
class _Alloc:
    seq: int
    ptr: int
    bytes: int  # > 0 allocation, < 0 free
    inner: str
    is_input: bool
    step: int = -1  # top-level op index (allocation: next op when made between ops; free: previous op)


@dataclass
class _Top:
    start: int
    end: int
    name: str
    module: str


def _flatten(tree, device: str):
    """(top-level ops, allocation events in time order) of the pass, from the profiler's event tree."""
    tops: List[_Top] = []
    allocs: List[Tuple[int, int, _Alloc]] = []

    def visit(ev, module: str, in_input: bool, top: Optional[str], inner: str):
        extra = ev.typed[1]
        if type(extra).__name__ == "_ExtraFields_Allocation":
            if str(extra.device).split(":")[0] == device and extra.alloc_size != 0:
                a = _Alloc(len(allocs), int(extra.ptr), int(extra.alloc_size), inner or "(no op)", in_input)
                allocs.append((ev.start_time_ns, a.seq, a))
            return
        name = ev.name
        if name.startswith(_SCOPE):
            if name.startswith(_SCOPE + "module:"):
                module = name[len(_SCOPE + "module:"):]
            in_input = in_input or name == _INPUT
        elif top is None:
            top = name
            if not in_input:
                tops.append(_Top(ev.start_time_ns, ev.end_time_ns, name, module))
            inner = name
        else:
            inner = name
        for c in ev.children:
            visit(c, module, in_input, top, inner)

    roots = list(tree)
    for r in roots:
        visit(r, "", False, None, "")
    allocs.sort(key=lambda t: (t[0], t[1]))
    tops.sort(key=lambda t: t.start)
    starts = [t.start for t in tops]
    ends = [t.end for t in tops]
    out = []
    for ts, _, a in allocs:
        k = bisect.bisect_right(starts, ts) - 1  # the last op started at or before ts
        inside = k >= 0 and ts <= ends[k]
        if a.bytes > 0:
            a.step = k if inside else k + 1  # made between ops: it belongs to the op about to run
        else:
            a.step = k  # freed between ops: right after op k
        out.append(a)
    return tops, out


def measure_eager(model: nn.Module, image_size: int, batch: int = 1, device: str = "cpu", fold_bn: bool = True,
                  name: Optional[str] = None) -> EagerMemory:
    """Trace one eager forward pass of a copy of ``model`` and return its allocation peak, split by kind.

    ``fold_bn`` folds each BatchNorm into the conv before it, as the ONNX export (and every deployed engine)
    does, so that the activations compare with ``redistill memory``'s liveness figures.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    # kineto logs an error line on machines without a GPU driver; it says nothing about this trace
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here; measure on the CPU (--device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported: use cpu or cuda")
    label = name or getattr(model, "arch_name", type(model).__name__)
    # as exported: each BatchNorm folded into its conv, else a per-channel affine (train.fold, checked)
    net = (fold_batchnorm(model, image_size) if fold_bn else copy.deepcopy(model)).eval().to(dev)
    for p in net.parameters():
        p.requires_grad_(False)

    def make_inputs():
        return tuple(x.to(dev) for x in example_inputs(net, image_size, batch=batch))

    with torch.no_grad():
        net(*make_inputs())  # warm-up: one-time caches and lazy buffers are made before the trace
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = {"allocated": torch.cuda.memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    scopes = _ModuleScopes(net)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            with profile(activities=activities, profile_memory=True, record_shapes=True) as prof:
                with record_function(_PASS):
                    with record_function(_INPUT):
                        inputs = make_inputs()
                    out = net(*inputs)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        del out, inputs  # after the trace: the output and input stay alive to its end, as a caller holds them
    finally:
        scopes.remove()
    allocator: Dict[str, int] = {}
    if dev.type == "cuda":
        stats = torch.cuda.memory_stats(dev)
        allocator = {"allocated": int(torch.cuda.max_memory_allocated(dev) - base["allocated"]),
                     "reserved": int(stats.get("reserved_bytes.all.peak", 0) - base["reserved"])}
    tops, allocs = _flatten(prof.profiler.kineto_results.experimental_event_tree(), dev.type)
    record = _account(label, tops, allocs, dev.type, batch, image_size, fold_bn, allocator)
    if dev.type == "cuda":
        record.resolution = "1 byte of the caching allocator's blocks (each request rounded up to 512 B)"
    return record


def _account(label, tops, allocs, device, batch, image_size, fold_bn, allocator) -> EagerMemory:
    """Replay the allocation events: running total, peak, each block's kind, the per-op timeline."""
    # pair every allocation with its free first, so that each block's kind is known when it is made
    made_at: Dict[int, _Alloc] = {}
    freed_step: Dict[int, int] = {}
    for a in allocs:
        if a.bytes > 0:
            made_at[a.ptr] = a
        elif a.ptr in made_at:
            freed_step[made_at.pop(a.ptr).seq] = a.step
    kind = {a.seq: "input" if a.is_input else "scratch" if freed_step.get(a.seq) == a.step else "activation"
            for a in allocs if a.bytes > 0}

    n = len(tops)
    live: Dict[int, _Alloc] = {}
    total = act = 0
    peak = act_peak = 0
    peak_step = act_peak_step = -1
    snapshot: List[_Alloc] = []
    act_snapshot: List[_Alloc] = []
    untracked = 0
    step_peak, step_end, step_act, step_act_peak = [None] * n, [None] * n, [None] * n, [None] * n
    for a in allocs:
        if a.bytes > 0:
            live[a.ptr] = a
            total += a.bytes
            act += a.bytes if kind[a.seq] == "activation" else 0
        elif a.ptr in live:
            made = live.pop(a.ptr)
            total -= made.bytes
            act -= made.bytes if kind[made.seq] == "activation" else 0
        else:
            untracked += 1  # a block made before the pass (a weight's lazy copy, a cache): not ours
            continue
        if total > peak:  # the first maximum in time order
            peak, peak_step, snapshot = total, a.step, list(live.values())
        if act > act_peak:
            act_peak, act_peak_step = act, a.step
            act_snapshot = [m for m in live.values() if kind[m.seq] == "activation"]
        s = min(max(a.step, 0), n - 1)
        if n:
            step_peak[s] = total if step_peak[s] is None else max(step_peak[s], total)
            step_act_peak[s] = act if step_act_peak[s] is None else max(step_act_peak[s], act)
            step_end[s], step_act[s] = total, act
    timeline, prev = [], (0, 0)
    for k, t in enumerate(tops):
        if step_end[k] is None:  # an op that allocated and freed nothing: the figures carry over
            step_peak[k], step_act_peak[k], (step_end[k], step_act[k]) = prev[0], prev[1], prev
        prev = (step_end[k], step_act[k])
        timeline.append(Step(k, t.module, t.name, step_peak[k], step_end[k], step_act[k], step_act_peak[k]))

    def where(step: int) -> str:
        return f"{tops[step].module or '(model)'} {tops[step].name}" if 0 <= step < n else "(input)"

    def block(a: _Alloc) -> Block:
        if a.is_input or not 0 <= a.step < n:
            return Block(a.bytes, kind[a.seq], "", "(input)", "(input)", -1)
        return Block(a.bytes, kind[a.seq], tops[a.step].module, tops[a.step].name, a.inner, a.step)

    at_peak = sorted((block(a) for a in snapshot), key=lambda b: (-b.bytes, b.step))
    at_act_peak = sorted((block(a) for a in act_snapshot), key=lambda b: (-b.bytes, b.step))
    split = {k: sum(b.bytes for b in at_peak if b.kind == k) for k in KINDS}
    big = max((a for a in allocs if a.bytes > 0 and kind[a.seq] == "scratch"), key=lambda a: a.bytes, default=None)
    return EagerMemory(
        model=label, device=device, batch=batch, image_size=image_size, threads=torch.get_num_threads(),
        fold_bn=fold_bn, peak_bytes=peak, peak_step=peak_step, peak_op=where(peak_step),
        activation_bytes=split["activation"], input_bytes=split["input"], scratch_bytes=split["scratch"],
        activation_peak_bytes=act_peak, activation_peak_op=where(act_peak_step),
        max_scratch_bytes=big.bytes if big else 0, max_scratch_op=block(big).where if big else "-",
        at_peak=at_peak, at_activation_peak=at_act_peak, timeline=timeline,
        allocator_peak_bytes=allocator.get("allocated"),
        reserved_peak_bytes=allocator.get("reserved"), events=len(allocs), untracked_frees=untracked,
    )


# --- the timeline on the liveness plot's axis ----------------------------------------------------------

#: eager ops that are one ONNX layer node each (Conv, ConvTranspose, Gemm, MatMul): anchors of the alignment
_LAYER_ATEN = frozenset({"aten::conv2d", "aten::conv1d", "aten::conv_transpose2d", "aten::linear", "aten::matmul"})


def node_positions(record: EagerMemory, report: MemoryReport) -> List[float]:
    """Each timeline step's position on the report's per-node axis (0 .. len(report.nodes) - 1).

    The k-th conv/linear op of the pass sits on the k-th Conv/Gemm/MatMul row of the report, the ops between
    two of them spread evenly in between; when the counts differ, the whole pass is spread evenly.
    """
    n, m = len(record.timeline), len(report.nodes)
    if n == 0 or m == 0:
        return [0.0] * n
    eager = [s.index for s in record.timeline if s.op in _LAYER_ATEN]
    onnx = [k for k, row in enumerate(report.nodes) if row.is_layer]
    pairs = list(zip(eager, onnx)) if len(eager) == len(onnx) else []
    anchors = [(0, 0)] + [p for p in pairs if p[0] > 0]
    if pairs and pairs[0][0] == 0:
        anchors[0] = pairs[0]
    if anchors[-1][0] < n - 1:
        anchors.append((n - 1, m - 1))
    out: List[float] = []
    for (a0, b0), (a1, b1) in zip(anchors, anchors[1:]):
        out += [b0 + (b1 - b0) * (i - a0) / (a1 - a0) for i in range(a0, a1)]
    return out + [float(anchors[-1][1])]

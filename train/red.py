"""RED blocks (Residual Encoded Distillation) as real submodules of the student, and where they go.

    y = x * sigmoid(BN(conv1x1(x))) + relu6(BN(conv3x3(x)))

A RED block stays in the deployed student, so it is an ``nn.Module`` inside the
model (an exporter sees it), not a hook. ``REDSite`` wraps one student layer
with a block on its input, its output, or both. ``auto_sites`` places them as
the paper does in classifiers (``red.sites: auto``); ``PLACEMENTS`` names every such placement, the U-Net
ones included (``red.sites: paper``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from redistill.errors import UserError, did_you_mean
from redistill.registry import Registry
from train.models import FAMILIES, ArchName, example_inputs, parse_arch, task_of
from train.skeleton import family_skeleton
from train.unet import output_sites, paper_sites


class REDBlock(nn.Module):
    """``y = x * sigmoid(BN(conv1x1 x)) + relu6(BN(conv3x3 x))``, C channels in and out."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = Conv2dNormActivation(channels, channels, kernel_size=1, activation_layer=None)
        self.encode = Conv2dNormActivation(channels, channels, kernel_size=3, activation_layer=nn.ReLU6)
        self.record = False  # when True, the trainer reads self.last for the RED loss
        self.last: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            y = x * torch.sigmoid(self.gate(x)) + self.encode(x)  # autograd and exporters see the formula as is
        else:
            # eager inference: the callers' frames hold x to the end, so the gate's buffer takes the product and the
            # sum; bit-identical (the same kernels, operands swapped) and never more than x + 2 maps alive
            y = torch.sigmoid_(self.gate(x)).mul_(x).add_(self.encode(x))
        if self.record:
            self.last = y
        return y


class REDSite(nn.Module):
    """A student layer with RED blocks on its input and/or output."""

    def __init__(self, layer: nn.Module, red_in: Optional[REDBlock], red_out: Optional[REDBlock]):
        super().__init__()
        self.red_in = red_in
        self.layer = layer
        self.red_out = red_out

    def forward(self, x, *args):
        # a U-Net block also takes the time embedding; RED blocks see only the feature map
        if self.red_in is not None:
            x = self.red_in(x)
        x = self.layer(x, *args)
        if self.red_out is not None:
            x = self.red_out(x)
        return x


# --- distances --------------------------------------------------------------------------------

DISTANCES: Registry = Registry("RED distance")


def channel_mean(t: torch.Tensor) -> torch.Tensor:
    """Average over channels and flatten: B x C x H x W -> B x (H*W), in float32 (under fp16 autocast the
    cosine of half-precision maps can be 0/0)."""
    return t.float().mean(dim=1).flatten(1)


@DISTANCES.register("cosine")
def cosine_distance(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``1 - cos(mean_c y, mean_c t)``, averaged over the batch."""
    return (1 - F.cosine_similarity(channel_mean(y), channel_mean(t), dim=1)).mean()


@DISTANCES.register("mse")
def mse_distance(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the channel-mean maps."""
    return F.mse_loss(channel_mean(y), channel_mean(t))


# --- placing RED blocks -----------------------------------------------------------------------

WHERE = ("in", "out")


@dataclass
class SitePlan:
    """One RED block: where it sits in the student and which teacher tensor it matches."""

    student: str
    where: str
    teacher: str
    teacher_where: str
    alpha: float
    channels: int = 0
    hw: Tuple[int, int] = (0, 0)

    @property
    def key(self) -> str:
        return f"{self.student}:{self.where}"


def probe_shapes(model: nn.Module, layers: Sequence[str], image_size: int) -> Dict[str, Tuple[tuple, tuple]]:
    """Run one dummy input through ``model`` and return {layer: (input shape, output shape)}."""
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules or name == "":
            raise UserError(
                f"layer {name!r} is not in {getattr(model, 'arch_name', type(model).__name__)}."
                + did_you_mean(name, [n for n in modules if n])
            )
    shapes: Dict[str, Tuple[tuple, tuple]] = {}
    handles = []
    for name in set(layers):
        def hook(mod, inp, out, name=name):
            shapes[name] = (tuple(inp[0].shape), tuple(out.shape))

        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next((q.device for q in model.parameters()), torch.device("cpu"))
            model(*(x.to(device) for x in example_inputs(model, image_size)))  # where the model is (a teacher on a GPU)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return shapes


def plan_sites(
    student: nn.Module,
    teacher: Optional[nn.Module],
    sites: Sequence[dict],
    image_size: int,
    default_alpha: float,
) -> List[SitePlan]:
    """Resolve the configured sites to channel counts, checking every student/teacher H x W pair."""
    plans = []
    for s in sites:
        where = s.get("where", "out")
        twhere = s.get("teacher_where") or where
        for w in (where, twhere):
            if w not in WHERE:
                raise UserError(f"RED site {s.get('student')!r}: where={w!r} must be 'in' or 'out'")
        alpha = s.get("alpha")
        plans.append(SitePlan(s["student"], where, s.get("teacher", ""), twhere,
                              default_alpha if alpha is None else float(alpha)))
    if not plans:
        return plans
    keys = [p.key for p in plans]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise UserError(f"RED site {sorted(dup)[0]} is configured twice; keep one")
    s_shapes = probe_shapes(student, [p.student for p in plans], image_size)
    t_shapes = probe_shapes(teacher, [p.teacher for p in plans], image_size) if teacher is not None else {}
    for p in plans:
        shape = s_shapes[p.student][0 if p.where == "in" else 1]
        if len(shape) != 4:
            raise UserError(f"RED site {p.key}: needs a 4-D feature map, the layer gives shape {list(shape)}")
        p.channels, p.hw = shape[1], tuple(shape[2:])
        if teacher is not None:
            tshape = t_shapes[p.teacher][0 if p.teacher_where == "in" else 1]
            if len(tshape) != 4 or tuple(tshape[2:]) != p.hw:
                raise UserError(
                    f"RED site mismatch at {image_size} px: student {p.student} ({p.where}) is "
                    f"{p.hw[0]}x{p.hw[1]} (shape {list(shape)}) but teacher {p.teacher} ({p.teacher_where}) "
                    f"is shape {list(tshape)}; pick a teacher layer of equal H x W"
                )
    return plans


def insert_red_blocks(student: nn.Module, plans: Sequence[SitePlan]) -> Dict[str, REDBlock]:
    """Replace each planned student layer with a ``REDSite``; returns {site key: block}."""
    blocks: Dict[str, REDBlock] = {}
    by_layer: Dict[str, List[SitePlan]] = {}
    for p in plans:
        by_layer.setdefault(p.student, []).append(p)
    for layer_name, ps in by_layer.items():
        parent_name, _, child = layer_name.rpartition(".")
        parent = student.get_submodule(parent_name) if parent_name else student
        layer = getattr(parent, child) if not child.isdigit() else parent[int(child)]
        made = {p.where: REDBlock(p.channels) for p in ps}
        site = REDSite(layer, made.get("in"), made.get("out"))
        if child.isdigit():
            parent[int(child)] = site
        else:
            setattr(parent, child, site)
        for p in ps:
            blocks[p.key] = made[p.where]
    return blocks



# --- automatic sites (the paper's rule) ---------------------------------------------------------

_STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _stride(module: nn.Module) -> int:
    s = module.stride
    return s if isinstance(s, int) else s[0]


@lru_cache(maxsize=None)
def stride_layers(family: str) -> Tuple[str, ...]:
    """The module that applies each stride digit of ``family``, stem first.

    Found by building the family (``train.skeleton``, no weights) with one digit at 2 and the rest at 1: the
    layer is the deepest common ancestor of the convs and pools that take that stride, i.e. a MobileNet's
    stride-2 depthwise conv, a ResNet block (its conv and its downsample), the max-pool, the stem conv.
    """
    fam = FAMILIES.get(family)
    if fam.variable_depth or fam.task != "classify":
        raise UserError(f"red.sites: auto places RED blocks in classifiers; list the sites of a {family} "
                        "network by hand (red.sites: [{student, where, teacher}, ...]) or name a placement of its "
                        f"task (red.sites: {', '.join(placements_for(fam.task))})")

    def strided(digits):
        model = family_skeleton(family, digits[0], tuple(digits[1:]))
        return {n for n, m in model.named_modules() if isinstance(m, _STRIDED) and _stride(m) > 1}

    n = len(fam.stages) + 1
    base = strided([1] * n)
    layers = []
    for k in range(n):
        carriers = [c.split(".") for c in sorted(strided([2 if i == k else 1 for i in range(n)]) - base)]
        common = []
        for parts in zip(*carriers):
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        if not common:
            raise UserError(f"{family}: no single layer takes the stride of digit {k}; list red.sites by hand")
        layers.append(".".join(common))
    return tuple(layers)


def feature_sizes(arch: ArchName, image_size: int) -> List[Tuple[int, int]]:
    """(input, output) side length at each stride digit, stem first: a stride-s layer maps H to ceil(H / s)
    (its kernel padded by k // 2, as in every family here)."""
    sizes, h = [], image_size
    for s in (arch.stem,) + arch.strides:
        sizes.append((h, -(-h // s)))
        h = sizes[-1][1]
    return sizes


def auto_sites(student_arch: str, teacher_arch: str, image_size: int) -> List[dict]:
    """RED sites placed by the paper's rule, as ``red.sites`` entries ({student, where, teacher, teacher_where}).

    A student layer gets RED blocks when it downsamples and its output is smaller than the teacher's output at
    the same layer (an aggressive-pooling layer): on its output (the stem) or its input and output (any later
    layer). Each block is matched to the teacher's downsampling layer whose tensor on the same side has the same
    H x W (else the other side; a side with no teacher tensor of its size gets no block). ``plan_sites`` checks
    the shapes when the networks are built.
    """
    s, t = parse_arch(student_arch), parse_arch(teacher_arch)
    if s.family != t.family:
        raise UserError(f"red.sites: auto pairs layers of one family, but the student is a {s.family} and the teacher "
                        f"a {t.family}: list red.sites by hand")
    layers = stride_layers(s.family)
    s_digits, t_digits = (s.stem,) + s.strides, (t.stem,) + t.strides
    s_sizes, t_sizes = feature_sizes(s, image_size), feature_sizes(t, image_size)
    # the teacher's downsampling tensors: (size, side) -> its first layer with that size on that side
    teacher_at: Dict[Tuple[int, str], int] = {}
    for j, ((h_in, h_out), d) in enumerate(zip(t_sizes, t_digits)):
        if d > 1:
            if j > 0:
                teacher_at.setdefault((h_in, "in"), j)
            teacher_at.setdefault((h_out, "out"), j)
    sites = []
    for k, ((h_in, h_out), d) in enumerate(zip(s_sizes, s_digits)):
        if d == 1 or h_out >= t_sizes[k][1]:
            continue
        for where, h in ((("out", h_out),) if k == 0 else (("in", h_in), ("out", h_out))):
            other = "in" if where == "out" else "out"
            twhere = where if (h, where) in teacher_at else other if (h, other) in teacher_at else None
            if twhere is not None:
                sites.append({"student": layers[k], "where": where, "teacher": layers[teacher_at[h, twhere]],
                              "teacher_where": None if twhere == where else twhere})
    if not sites:
        raise UserError(f"{student_arch} downsamples no earlier than {teacher_arch} at {image_size} px (or no teacher "
                        "tensor matches its sizes): no aggressive-pooling layer to put RED blocks on; move a stride "
                        "earlier or list red.sites by hand")
    return sites


# --- named placements (``red.sites: NAME``) ----------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """A named way to place a pair's RED sites: ``red.sites: NAME`` in a config."""

    task: str  # the pairs it places sites in: classify or denoise (train.models task_of)
    what: str  # one line: where the blocks go
    place: Callable[[str, str, int, int], List[dict]]  # (student arch, teacher arch, image size, unet.num_res_blocks)


PLACEMENTS: Registry[Placement] = Registry("RED site placement")


def placements_for(task: str) -> List[str]:
    """The placement names for pairs of ``task`` (for messages that name the right ones)."""
    return [n for n in PLACEMENTS.names() if PLACEMENTS.get(n).task == task]


def place_sites(name: str, student_arch: str, teacher_arch: str, image_size: int, num_res_blocks: int = 2) -> List[dict]:
    """``red.sites: NAME`` resolved to ``red.sites`` entries for a pair; a placement of the other task is refused."""
    placement = PLACEMENTS.get(name)
    task = task_of(student_arch)
    if placement.task != task:
        raise UserError(f"red.sites: {name} is a placement for the {placement.task} task and {student_arch} does the "
                        f"{task} task: use red.sites: {' or '.join(placements_for(task))}, or list the sites")
    return placement.place(student_arch, teacher_arch, image_size, num_res_blocks)


def _unet_digits(arch: str) -> Tuple[int, ...]:
    name = parse_arch(arch)
    return (name.stem,) + tuple(name.strides)


PLACEMENTS.register("auto")(Placement(
    "classify", "the paper's rule: the layers whose stride was raised, matched to teacher layers of equal H x W",
    lambda s, t, size, _: auto_sites(s, t, size)))
PLACEMENTS.register("paper")(Placement(
    "denoise", "the paper's DDPM sites: head out, the early down/up convs' in and out, tail in (train/unet.py)",
    lambda s, t, size, n: paper_sites(_unet_digits(s), _unet_digits(t), size, n)))
PLACEMENTS.register("outputs")(Placement(
    "denoise", "five output-side sites: head, last down/up blocks of the two largest levels (train/unet.py)",
    lambda s, t, size, n: output_sites(_unet_digits(s), _unet_digits(t), size, n)))

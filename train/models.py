"""Architectures by name, with the paper's ``ARCH-A-R`` naming.

``A`` is the stride of the first layer (the stem) and each digit of ``R`` the
stride of one later stage, e.g. ``mobilenetv2-4-1221111`` is MobileNetV2 whose
stem downsamples by 4. Every family is built from torchvision's own model and
blocks; only the strides change.
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from redistill.errors import UserError
from redistill.registry import Registry
from train.unet import UNet


@dataclass(frozen=True)
class Family:
    """How to build one architecture family from a stem stride and per-stage strides."""

    name: str
    stages: Tuple[str, ...]  # what each digit of R controls, for error messages
    default: str  # the torchvision (ImageNet) schedule, used for a bare family name
    build: Callable[..., nn.Module]
    task: str = "classify"  # classify (num_classes >= 2) | denoise (num_classes = conditioning labels, 0 = none)
    variable_depth: bool = False  # the builder checks the digit count (it depends on its options)


FAMILIES: Registry[Family] = Registry("architecture")


def register_family(name: str, stages: Sequence[str], default: str, task: str = "classify",
                    variable_depth: bool = False):
    """Decorator: register ``build(stem, strides, num_classes, **kw)`` as family ``name``."""

    def deco(build):
        FAMILIES.register(name)(Family(name, tuple(stages), default, build, task, variable_depth))
        return build

    return deco


@dataclass(frozen=True)
class ArchName:
    family: str
    stem: int
    strides: Tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.family}-{self.stem}-{''.join(map(str, self.strides))}"

    @property
    def total_stride(self) -> int:
        total = self.stem
        for s in self.strides:
            total *= s
        return total


_NAME = re.compile(r"^(?P<family>[a-z0-9_]+?)(?:-(?P<stem>\d+)-(?P<strides>\d+))?$")


def parse_arch(name: str) -> ArchName:
    """Parse ``family[-A-R]``; a bare family name means its standard torchvision schedule."""
    m = _NAME.match(name.strip())
    family = m.group("family") if m else name.split("-")[0]
    if family not in FAMILIES:
        fam_part, _, suffix = name.strip().partition("-")
        close = difflib.get_close_matches(fam_part, FAMILIES.names(), n=2, cutoff=0.5)
        if close:
            hint = " Did you mean " + " or ".join(repr(f"{c}-{suffix}" if suffix else c) for c in close) + "?"
        else:
            hint = " Known: " + ", ".join(FAMILIES.get(f).default for f in FAMILIES.names()) + "."
        raise UserError(f"unknown architecture {name!r}." + hint)
    fam = FAMILIES.get(family)
    if not m:
        raise UserError(
            f"malformed architecture name {name!r}: expected {family}-A-R with A the stem stride and "
            f"one digit per stage ({', '.join(fam.stages)}), e.g. {fam.default}"
        )
    if m.group("stem") is None:
        return parse_arch(fam.default)
    stem, strides = int(m.group("stem")), tuple(int(c) for c in m.group("strides"))
    if len(strides) != len(fam.stages) and not fam.variable_depth:
        raise UserError(
            f"{name!r}: {family} takes {len(fam.stages)} stage strides after the stem "
            f"({', '.join(fam.stages)}), got {len(strides)}; e.g. {fam.default}"
        )
    if stem < 1 or 0 in strides:
        raise UserError(f"{name!r}: strides must be at least 1")
    return ArchName(family, stem, strides)


#: the largest input side any network is built for (training stops at 224 px)
MAX_IMAGE_SIZE = 4096


def build_model(name: str, num_classes: int = 10, image_size: int = 32, **kwargs) -> nn.Module:
    """Build architecture ``name`` for ``num_classes`` and a square input of ``image_size`` px.

    Any size from 32 to ``MAX_IMAGE_SIZE`` builds, so that analysis and measurement take the sizes users
    deploy at (512 px, ...); training keeps its own 32-224 px range (``train.config``).
    """
    arch = parse_arch(name)
    if not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"image_size {image_size} is out of range: use 32 to {MAX_IMAGE_SIZE} px "
                        "(32 to 224 px for training)")
    if arch.total_stride > image_size:
        raise UserError(
            f"{arch}: total stride {arch.total_stride} exceeds image_size {image_size}; "
            "lower a stride or raise image_size"
        )
    fam = FAMILIES.get(arch.family)
    if fam.task == "classify" and num_classes < 2:
        raise UserError(f"num_classes must be at least 2, got {num_classes}")
    if fam.task == "denoise" and num_classes < 0:
        raise UserError(f"num_classes must be 0 (unconditional) or the number of labels, got {num_classes}")
    model = fam.build(arch.stem, arch.strides, num_classes, **kwargs)
    model.arch_name = str(arch)
    return model


def _set_stride(conv: nn.Conv2d, stride: int) -> None:
    conv.stride = (stride, stride)


def _observed(m: nn.Module) -> bool:
    """Whether calling ``m`` itself matters: a hook on it or on every module, or a trace that records module scopes."""
    return bool(torch.jit.is_tracing() or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


# --- MobileNetV2: one digit per inverted-residual stage (7 stages) -------------------------------


@register_family("mobilenetv2", [f"stage{i}" for i in range(1, 8)], "mobilenetv2-2-1222121")
def _mobilenetv2(stem, strides, num_classes, width_mult: float = 1.0, dropout: float = 0.2):
    from torchvision.models import MobileNetV2

    # (expansion t, channels c, repeats n) of torchvision's MobileNetV2, strides replaced
    tcn = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    setting = [[t, c, n, s] for (t, c, n), s in zip(tcn, strides)]
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting, dropout=dropout)
    _set_stride(model.features[0][0], stem)
    return model


# --- MobileNetV3-small: one digit per inverted-residual block (11 blocks) ------------------------


@register_family("mobilenetv3_small", [f"block{i}" for i in range(1, 12)], "mobilenetv3_small-2-22121111211")
def _mobilenetv3_small(stem, strides, num_classes, width_mult: float = 1.0, dropout: float = 0.2,
                       bn_momentum: float = 0.1):
    """torchvision's MobileNetV3-small. Its BatchNorm momentum defaults to 0.01 (for long ImageNet runs),
    which leaves the running statistics unusable after a few hundred steps; PyTorch's usual 0.1 is the default here."""
    from functools import partial

    from torchvision.models.mobilenetv3 import InvertedResidual, MobileNetV3, _mobilenet_v3_conf

    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width_mult)
    for cnf, s in zip(setting, strides):
        cnf.stride = s
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=bn_momentum)
    block = partial(InvertedResidual, se_layer=partial(_linear_se(), scale_activation=nn.Hardsigmoid))
    model = MobileNetV3(setting, last_channel, num_classes=num_classes, dropout=dropout, norm_layer=norm, block=block)
    _set_stride(model.features[0][0], stem)
    return model


@lru_cache(maxsize=None)
def _linear_se():
    import torch
    import torch.nn.functional as F
    from torchvision.ops.misc import SqueezeExcitation

    class LinearSqueezeExcitation(SqueezeExcitation):
        """torchvision's squeeze-excitation with its two 1x1 convs on the pooled B x C x 1 x 1 map run as linear
        layers: the same weights and maths, but in training on 2 CPU cores the convs cost 11.9 ms a step
        (MobileNetV3-small x4) where a linear costs about 3. Exporters and tracers see the convs, so checkpoints
        and ONNX graphs are unchanged; ``linear`` (``runtime.se_linear``, ``set_se_linear``) turns it off."""

        linear = True

        def _scale(self, input):
            if not self.linear or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
                return super()._scale(input)
            s = self.activation(F.linear(input.mean((2, 3)), self.fc1.weight.flatten(1), self.fc1.bias))
            return self.scale_activation(F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias))[:, :, None, None]

    return LinearSqueezeExcitation


def set_se_linear(model: nn.Module, on: bool) -> int:
    """Switch every MobileNetV3 squeeze-excitation of ``model`` to linear layers (``on``) or its 1x1 convs;
    returns how many there are."""
    blocks = [m for m in model.modules() if type(m).__name__ == "LinearSqueezeExcitation"]
    for m in blocks:
        m.linear = on
    return len(blocks)


# --- ResNet / ResNeXt: digits are maxpool, layer1, layer2, layer3, layer4 -----------------------


def _resnet(block, layers, stem, strides, num_classes, **kw):
    from torchvision.models.resnet import ResNet

    class StridedResNet(ResNet):
        """torchvision's ResNet with the four layer strides taken from the name."""

        def __init__(self):
            self._layer_strides = list(strides[1:])
            super().__init__(block, layers, num_classes=num_classes, **kw)

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            return super()._make_layer(block, planes, blocks, stride=self._layer_strides.pop(0), dilate=dilate)

        def _forward_impl(self, x):
            """torchvision's forward, with each stage run block by block in eager mode: calling a stage holds its
            input until the stage returns, which keeps the maxpool output alive through all of ``layer1``."""
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                if _observed(stage):
                    x = stage(x)
                else:
                    for block in stage:
                        x = block(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    model = StridedResNet()
    _set_stride(model.conv1, stem)
    model.maxpool = nn.MaxPool2d(kernel_size=3, stride=strides[0], padding=1)
    return model


_RESNET_STAGES = ["maxpool", "layer1", "layer2", "layer3", "layer4"]


@register_family("resnet18", _RESNET_STAGES, "resnet18-2-21222")
def _resnet18(stem, strides, num_classes):
    from torchvision.models.resnet import BasicBlock

    return _resnet(BasicBlock, [2, 2, 2, 2], stem, strides, num_classes)


@register_family("resnet34", _RESNET_STAGES, "resnet34-2-21222")
def _resnet34(stem, strides, num_classes):
    from torchvision.models.resnet import BasicBlock

    return _resnet(BasicBlock, [3, 4, 6, 3], stem, strides, num_classes)


@register_family("resnet50", _RESNET_STAGES, "resnet50-2-21222")
def _resnet50(stem, strides, num_classes):
    from torchvision.models.resnet import Bottleneck

    return _resnet(Bottleneck, [3, 4, 6, 3], stem, strides, num_classes)


def _grouped_basic_block():
    from torchvision.models.resnet import BasicBlock, conv3x3

    class GroupedBasicBlock(BasicBlock):
        """torchvision's BasicBlock with its second 3x3 conv grouped: the ReDistill code's ResNeXt18 block."""

        def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None):
            super().__init__(inplanes, planes, stride, downsample, 1, 64, dilation, norm_layer)
            self.conv2 = conv3x3(planes, planes, groups=groups)

    return GroupedBasicBlock


@register_family("resnext18", _RESNET_STAGES, "resnext18-2-21222")
def _resnext18(stem, strides, num_classes, groups: int = 32):
    """ResNeXt18 as in the paper's code: ResNet18's layout (64-512 channels) with the second conv of each block grouped."""
    return _resnet(_grouped_basic_block(), [2, 2, 2, 2], stem, strides, num_classes, groups=groups)


# --- DDPM U-Net denoiser: digits are the strides opening levels 1, 2, 3 ----------------------------


@register_family("unet", ["level1", "level2", "level3"], "unet-1-222", task="denoise", variable_depth=True)
def _unet(stem, strides, num_classes, **kw):
    """The DDPM U-Net (``train.unet``): head stride A, then one digit per level after the first."""
    return UNet((stem,) + tuple(strides), num_classes=num_classes, **kw)


def task_of(arch: str) -> str:
    """``classify`` or ``denoise``: what a network of this architecture is trained for."""
    return FAMILIES.get(parse_arch(arch).family).task


def example_inputs(model: nn.Module, image_size: int, batch: int = 1) -> tuple:
    """Dummy inputs of one forward pass: the model's own ``example_inputs`` if it has them, else one image."""
    import torch

    make = getattr(model, "example_inputs", None)
    if make is not None:
        return tuple(make(image_size, batch))
    return (torch.zeros(batch, 3, image_size, image_size),)


def input_names(model: nn.Module) -> list:
    """Names of the exported graph's inputs (``input`` for classifiers)."""
    return list(getattr(model, "input_names", ["input"]))


def output_names(model: nn.Module) -> list:
    """Names of the exported graph's outputs (``logits`` for classifiers, ``eps`` for denoisers)."""
    return list(getattr(model, "output_names", ["logits"]))


def model_kwargs(arch: str, width_mult: float) -> dict:
    """Builder options a family takes beyond its name: ``width_mult`` for the families whose builder has one."""
    build = FAMILIES.get(parse_arch(arch).family).build
    return {"width_mult": width_mult} if "width_mult" in inspect.signature(build).parameters else {}

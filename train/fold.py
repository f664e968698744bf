"""Fold every BatchNorm into the convolution that feeds it, so the exported graph has no BatchNormalization node.

Pairs are found by data flow, not by module names: one eval forward pass records
which Conv2d produced the exact tensor each BatchNorm2d consumed. That covers
torchvision's Conv2dNormActivation, ResNet conv/bn pairs and RED blocks alike,
without special-casing any architecture. Models with several inputs (a denoiser's
``x, t``) are probed with ``probe_inputs``. A BatchNorm fed by something else (a
RED block placed on a conv's output sits between that conv and its BatchNorm)
becomes a per-channel ``x * scale + shift``, which exports as Mul + Add.
"""

from __future__ import annotations

import copy
from typing import Collection, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from redistill.errors import UserError
from train.models import example_inputs, input_names

#: folding is exact algebra; this only absorbs float32 reassociation
FOLD_ATOL = 1e-4


#: inputs of a denoiser that are diffusion time steps: probed with values across the schedule, not noise
TIME_INPUTS = ("t",)


def probe_inputs(model: nn.Module, image_size: int, batch: int = 2, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Random inputs shaped like ``train.models.example_inputs``: images N(0, 1), time steps uniform in [0, 999],
    integer inputs (labels) left as the example gives them. Used to find and check the BatchNorm fold."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, x in zip(input_names(model), example_inputs(model, image_size, batch=batch)):
        if not x.is_floating_point():
            out.append(x)
        elif name in TIME_INPUTS:
            out.append(torch.rand(x.shape, generator=g, dtype=x.dtype) * 999.0)
        else:
            out.append(torch.randn(x.shape, generator=g, dtype=x.dtype))
    return tuple(out)


def _find_pairs(model: nn.Module, example: Tuple[torch.Tensor, ...]) -> List[Tuple[str, str]]:
    """(conv name, bn name) for every BatchNorm2d whose input is exactly one Conv2d's output."""
    produced_by: Dict[int, str] = {}
    consumed: Dict[str, Optional[str]] = {}
    conv_uses: Dict[str, int] = {}
    keep: List[torch.Tensor] = []  # holds every conv output alive so that no id() is reused during the pass
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            def conv_hook(m, inp, out, name=name):
                keep.append(out)
                produced_by[id(out)] = name
                conv_uses[name] = conv_uses.get(name, 0) + 1
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            def bn_hook(m, inp, name=name):
                consumed[name] = produced_by.get(id(inp[0]))  # looked up now, while the conv output is alive
            handles.append(mod.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    pairs = []
    for bn, conv in consumed.items():
        if conv is not None and conv_uses.get(conv) == 1:
            pairs.append((conv, bn))
    return pairs


class ChannelAffine(nn.Module):
    """An eval-mode BatchNorm2d as a constant per-channel scale and shift."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
        shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _set(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)  # also right for nn.Sequential, whose children are named "0", "1", ...


def strip_training_parts(model: nn.Module) -> nn.Module:
    """Remove hooks and RED recording state: nothing that only training needs reaches the exporter."""
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
        if hasattr(m, "record"):
            m.record = False
            m.last = None
    return model


def fold_batchnorm(model: nn.Module, image_size: int, keep: Collection[str] = ()) -> nn.Module:
    """A deep copy of ``model`` in eval mode with no BatchNorm left: folded into its conv, else a ChannelAffine.

    ``folded.fold_stats`` counts both kinds. Raises UserError when the folded network's output differs
    from the original's by more than ``FOLD_ATOL`` (the fold is checked, not trusted). ``keep``: module names
    whose input and output tensors must stay as they are (a training tap reads them): a conv or BatchNorm
    named there is not folded into the other (the BatchNorm becomes a ChannelAffine).
    """
    original = model.eval()
    folded = strip_training_parts(copy.deepcopy(model)).eval()
    example = probe_inputs(model, image_size, batch=2)
    pairs = [(c, b) for c, b in _find_pairs(folded, example) if c not in keep and b not in keep]
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        _set(folded, conv_name, fuse_conv_bn_eval(modules[conv_name], modules[bn_name]))
        _set(folded, bn_name, nn.Identity())
    for name, m in list(folded.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not isinstance(m, nn.BatchNorm2d) or m.running_var is None:
                raise UserError(f"cannot fold {type(m).__name__} {name}: only BatchNorm2d with running statistics is "
                                "supported; add a rule in train/fold.py")
            _set(folded, name, ChannelAffine(m))
    folded.fold_stats = {"into_conv": len(pairs), "as_affine": sum(isinstance(m, ChannelAffine) for m in folded.modules())}
    with torch.no_grad():
        diff = float((original(*example) - folded(*example)).abs().max())
    if not diff <= FOLD_ATOL:
        raise UserError(f"folding BatchNorm changed the output by {diff:.3g} (> {FOLD_ATOL}); "
                        "a conv output is probably reused elsewhere: report the architecture")
    return folded

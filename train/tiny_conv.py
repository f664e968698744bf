"""Convolutions on maps of a pixel or two computed over their valid taps only (``runtime.tiny_map_conv``).

An aggressive-pooling student ends on 2 x 2 or 1 x 1 maps, where a 3 x 3 convolution with zero padding
reads padding for more than half of its taps; oneDNN multiplies those zeros all the same (a 512-channel
3 x 3 conv on 2 x 2 maps, batch 64, forward and backward: 23-32 ms on 2 CPU cores, 12-13 ms over the taps).
Here each kernel tap that meets the map is one matrix product of the shifted input with that tap's weights:
the same sums in another order (within 1e-5), the same parameters, and exporters, tracers and autocast see
the ordinary convolution.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

#: (kh, kw, output rows i0:i1, output columns j0:j1, dh, dw): the input rows read are i0+dh:i1+dh
Tap = Tuple[int, int, int, int, int, int, int, int]


@lru_cache(maxsize=None)
def taps(h: int, w: int, kh: int, kw: int, ph: int, pw: int) -> Tuple[Tap, ...]:
    """The kernel taps of a stride-1 'same' convolution that read the h x w map anywhere, with where; the
    centre tap (which reads every pixel) first."""
    out: List[Tap] = []
    for a in range(kh):
        dh = a - ph
        i0, i1 = max(0, -dh), min(h, h - dh)
        for b in range(kw):
            dw = b - pw
            j0, j1 = max(0, -dw), min(w, w - dw)
            if i0 < i1 and j0 < j1:
                out.append((a, b, i0, i1, j0, j1, dh, dw))
    return tuple(sorted(out, key=lambda t: (t[6], t[7]) != (0, 0)))


class _TinyMapConv(torch.autograd.Function):
    """y = conv2d(x, weight, bias, stride 1, 'same' zero padding), one matrix product per tap that meets the map."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        n, c, h, w = x.shape
        o = weight.shape[0]
        centre, *rest = taps(h, w, weight.shape[2], weight.shape[3], *padding)  # the centre tap covers the map
        weight = weight.contiguous(memory_format=torch.channels_last)  # each tap's O x C slice BLAS-ready
        xl = x.permute(0, 2, 3, 1)  # N H W C: a view of a channels_last batch
        out = torch.empty((n, o, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        y = out.permute(0, 2, 3, 1)  # written as N H W O
        w_c = weight[:, :, centre[0], centre[1]].t()
        if bias is None:
            torch.mm(xl.reshape(-1, c), w_c, out=y.view(-1, o))
        else:
            torch.addmm(bias, xl.reshape(-1, c), w_c, out=y.view(-1, o))
        for a, b, i0, i1, j0, j1, dh, dw in rest:
            xs = xl[:, i0 + dh:i1 + dh, j0 + dw:j1 + dw].reshape(-1, c)
            y[:, i0:i1, j0:j1] += (xs @ weight[:, :, a, b].t()).view(n, i1 - i0, j1 - j0, o)
        ctx.save_for_backward(x, weight)
        ctx.taps, ctx.has_bias = (centre, *rest), bias is not None
        # not a view (in-place ops after it stay legal), in the input's memory format
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        n, c, h, w = x.shape
        o = weight.shape[0]
        xl, gyl = x.permute(0, 2, 3, 1), gy.permute(0, 2, 3, 1)
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        every = len(ctx.taps) == weight.shape[2] * weight.shape[3]  # each tap writes its own weights
        gw = (torch.empty_like if every else torch.zeros_like)(weight) if want_w else None  # channels_last
        gx = x.new_empty(n, h, w, c) if want_x else None
        for k, (a, b, i0, i1, j0, j1, dh, dw) in enumerate(ctx.taps):
            g = gyl[:, i0:i1, j0:j1].reshape(-1, o)
            if gx is not None and k == 0:  # the centre: every pixel, dh = dw = 0
                torch.mm(g, weight[:, :, a, b], out=gx.view(-1, c))
            elif gx is not None:
                gx[:, i0 + dh:i1 + dh, j0 + dw:j1 + dw] += (g @ weight[:, :, a, b]).view(n, i1 - i0, j1 - j0, c)
            if gw is not None:  # BLAS writes the tap's rows of the channels_last gradient in place
                torch.mm(g.t(), xl[:, i0 + dh:i1 + dh, j0 + dw:j1 + dw].reshape(-1, c), out=gw[:, :, a, b])
        gb = gy.sum((0, 2, 3)) if ctx.has_bias and want_b else None
        return None if gx is None else gx.permute(0, 3, 1, 2), gw, gb, None


class TinyMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes maps no larger than its padding reach (2 x 2 for 3 x 3) over valid taps only.

    Only ``set_tiny_map_conv`` makes one (it swaps the class of an eligible ``nn.Conv2d``, so parameters,
    hooks and state-dict keys stay as they are); tracers, exporters (``torch.onnx``, ``torch.export``) and
    autocast get the ordinary convolution, as does a conv changed after the switch. Not scriptable, not for
    ``torch.func`` transforms or double backward: switch it off first (``set_tiny_map_conv(model, False)``).
    """

    def _conv_forward(self, input, weight, bias):
        if (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
                or torch.is_autocast_enabled(input.device.type) or input.dim() != 4 or not eligible(self)):
            return super()._conv_forward(input, weight, bias)
        ph, pw = self.padding
        if input.shape[2] <= ph + 1 and input.shape[3] <= pw + 1:
            return _TinyMapConv.apply(input, weight, bias, (ph, pw))
        return super()._conv_forward(input, weight, bias)


def eligible(m: nn.Module) -> bool:
    """A plain stride-1, ungrouped, undilated conv with zero 'same' padding and a kernel larger than 1 x 1."""
    if type(m) not in (nn.Conv2d, TinyMapConv2d) or m.groups != 1 or m.padding_mode != "zeros":
        return False
    if isinstance(m.padding, str) or tuple(m.stride) != (1, 1) or tuple(m.dilation) != (1, 1):
        return False
    (kh, kw), (ph, pw) = m.kernel_size, m.padding
    return kh * kw > 1 and kh == 2 * ph + 1 and kw == 2 * pw + 1


def set_tiny_map_conv(model: nn.Module, on: bool) -> int:
    """Switch every eligible conv of ``model`` to ``TinyMapConv2d`` (``on``), or every switched one back; returns
    how many were set."""
    convs = [m for m in model.modules() if (eligible(m) if on else type(m) is TinyMapConv2d)]
    for m in convs:
        m.__class__ = TinyMapConv2d if on else nn.Conv2d
    return len(convs)

"""The DDPM U-Net denoiser (Ho et al. 2020) with the ReDistill stride schedule.

Name ``unet-A-R``: ``A`` is the stride of the head conv and each digit of ``R``
the stride of the downsampling conv that opens one later level, so the teacher
``unet-1-222`` works at 32, 16, 8, 4 px on a 32 px image and the x2 student
``unet-2-221`` at 16, 8, 4, 4 px (the paper's [1,2,2,2] -> [2,2,2,1]). Teacher
and student have the same modules; only strides change. A stride-1 level keeps
its (3x3, stride 1) down/up convs, and a head stride A > 1 is undone at the
tail by a conv to ``3 * A * A`` channels and a pixel shuffle, so no full-size
map with ``ch`` channels is ever made.

The network predicts the noise epsilon of ``x_t`` at time step ``t`` (a float
tensor of shape [B], so an exported graph has no int64 input). With
``num_classes > 0`` it is class-conditional; label ``num_classes`` is the
"no label" token that classifier-free guidance trains and samples with.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from redistill.errors import UserError


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, ch), ch)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the (float) time step followed by a two-layer MLP."""

    def __init__(self, ch: int, tdim: int):
        super().__init__()
        half = ch // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, tdim), nn.SiLU(), nn.Linear(tdim, tdim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float()[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, optional self-attention after."""

    def __init__(self, cin: int, cout: int, tdim: int, dropout: float, attn: bool, groups: int):
        super().__init__()
        self.block1 = nn.Sequential(_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.temb = nn.Sequential(nn.SiLU(), nn.Linear(tdim, cout))
        self.block2 = nn.Sequential(_norm(cout, groups), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = AttnBlock(cout, groups) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb(temb)[:, :, None, None]
        h = self.block2(h) + self.shortcut(x)
        return self.attn(h)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (DDPM's attention block)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = torch.softmax(torch.bmm(q.transpose(1, 2), k) * (c ** -0.5), dim=-1)  # B x HW x HW
        out = torch.bmm(v, a.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj(out)


class Down(nn.Module):
    """3x3 conv with the level's stride (1 keeps the conv, so every schedule has the same modules)."""

    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=stride, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Up(nn.Module):
    """Nearest-neighbour upsampling by the level's stride, then a 3x3 conv."""

    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(x)


class UNet(nn.Module):
    """DDPM epsilon-prediction U-Net; ``strides[0]`` is the head's, ``strides[i]`` opens level i."""

    def __init__(self, strides: Sequence[int], ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2),
                 attn: Sequence[int] = (1,), num_res_blocks: int = 2, dropout: float = 0.1,
                 num_classes: int = 0, in_ch: int = 3, norm_groups: int = 32):
        super().__init__()
        levels = len(ch_mult)
        if len(strides) != levels:
            raise UserError(f"U-Net: {len(strides)} strides (head + {len(strides) - 1} digits) for {levels} "
                            f"levels of unet.ch_mult={list(ch_mult)}; give one digit per level after the first")
        bad = [a for a in attn if not 0 <= a < levels]
        if bad:
            raise UserError(f"unet.attn={list(attn)}: attention levels are 0..{levels - 1}")
        if num_res_blocks < 1 or ch < 8:
            raise UserError("unet.num_res_blocks must be at least 1 and unet.ch at least 8")
        self.strides, self.num_classes, self.in_ch = tuple(strides), num_classes, in_ch
        tdim = 4 * ch
        self.time = TimeEmbedding(ch, tdim)
        self.label = nn.Embedding(num_classes + 1, tdim) if num_classes > 0 else None
        self.head = nn.Conv2d(in_ch, ch, 3, stride=strides[0], padding=1)

        chans: List[int] = [ch]  # channels of every skip tensor, in push order
        cur = ch
        self.down = nn.ModuleList()
        for i, m in enumerate(ch_mult):
            level = nn.ModuleList()
            if i > 0:
                level.append(Down(cur, strides[i]))
                chans.append(cur)
            for _ in range(num_res_blocks):
                level.append(ResBlock(cur, ch * m, tdim, dropout, i in attn, norm_groups))
                cur = ch * m
                chans.append(cur)
            self.down.append(level)
        self.mid = nn.ModuleList([ResBlock(cur, cur, tdim, dropout, True, norm_groups),
                                  ResBlock(cur, cur, tdim, dropout, False, norm_groups)])
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            level = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.append(ResBlock(cur + chans.pop(), ch * ch_mult[i], tdim, dropout, i in attn, norm_groups))
                cur = ch * ch_mult[i]
            if i > 0:
                level.append(Up(cur, strides[i]))
            self.up.insert(0, level)  # self.up[i] is level i, as self.down[i]
        self.tail = nn.Sequential(_norm(cur, norm_groups), nn.SiLU(),
                                  nn.Conv2d(cur, in_ch * strides[0] ** 2, 3, padding=1))
        self.shuffle = nn.PixelShuffle(strides[0]) if strides[0] > 1 else nn.Identity()
        self.num_res_blocks = num_res_blocks

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        temb = self.time(t)
        if self.label is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            temb = temb + self.label(y)  # int32 (exported graphs) or int64 indices
        h = self.head(x)
        hs = [h]
        for level in self.down:
            for block in level:
                h = block(h, temb)
                hs.append(h)
        for block in self.mid:
            h = block(h, temb)
        for level in reversed(self.up):
            for j, block in enumerate(level):
                if j <= self.num_res_blocks:
                    h = block(torch.cat([h, hs.pop()], dim=1), temb)
                else:
                    h = block(h, temb)
        return self.shuffle(self.tail(h))

    def example_inputs(self, image_size: int, batch: int = 1) -> Tuple[torch.Tensor, ...]:
        """Inputs of one denoising step: noisy image, time step (float), and the label when conditional."""
        x = torch.zeros(batch, self.in_ch, image_size, image_size)
        t = torch.full((batch,), 500.0)
        if self.label is None:
            return x, t
        return x, t, torch.zeros(batch, dtype=torch.int32)

    @property
    def input_names(self) -> List[str]:
        return ["x", "t"] + (["y"] if self.label is not None else [])

    @property
    def output_names(self) -> List[str]:
        return ["eps"]

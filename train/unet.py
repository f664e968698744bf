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


# --- where RED blocks go in a U-Net pair (named placements, registered in train/red.py PLACEMENTS) -------------


def level_sizes(strides: Sequence[int], image_size: int) -> List[int]:
    """Side length of each level's maps: the head maps H to ceil(H / A), each level's down conv by its digit."""
    sizes, h = [], image_size
    for s in strides:
        h = -(-h // s)
        sizes.append(h)
    return sizes


def _samplers(strides: Sequence[int], image_size: int, num_res_blocks: int):
    """The layers that change H x W, in forward order: (module, stride, H in, H out) for the down path (head,
    each level's down conv) and the up path (each level's up conv, the tail, which the head's stride mirrors)."""
    sz, n = level_sizes(strides, image_size), len(strides)
    down = [("head", strides[0], image_size, sz[0])] + [(f"down.{i}.0", strides[i], sz[i - 1], sz[i]) for i in range(1, n)]
    up = [(f"up.{i}.{num_res_blocks + 1}", strides[i], sz[i], sz[i - 1]) for i in reversed(range(1, n))]
    return down, up + [("tail", strides[0], sz[0], image_size)]


def paper_sites(student: Sequence[int], teacher: Sequence[int], image_size: int, num_res_blocks: int) -> List[dict]:
    """``red.sites: paper``: the RED sites of the paper's DDPM student, as ``red.sites`` entries.

    The paper's code (pipeline_diffusion/config/reedx2_dist_config.yaml, wired by reed/models.py ReED_Diffuser)
    puts RED blocks on the head's output, on the input and output of the student's DownSample and UpSample
    convs that downsample before the teacher's (stride > 1, low-resolution side smaller than the teacher's at the
    same layer: downblocks.2 and .5, upblocks.7 and .11 of its flat lists, here down.1.0, down.2.0, up.2.3 and
    up.1.3), and on the tail's input: 10 blocks for [2,2,2,1] against [1,2,2,2]. Each is matched to the
    teacher's sampling conv (stride > 1) whose tensor on the same side has the same H x W, the first in forward
    order (else the other side): head out -> teacher downblocks.2 out, a DownSample's in/out -> the teacher's
    next DownSample's in/out, an UpSample's in/out -> the teacher's previous UpSample's, tail in -> teacher
    upblocks.11 in. Skips as in the paper's UNet.forward (pipeline_diffusion/model.py), whose ``hs`` list takes
    each down layer's return value: the RED outputs on the head and DownSample outputs are what the skips carry,
    a DownSample's input-side RED feeds that conv only (reed/hooks.py: a forward pre-hook replaces the layer's
    input, a forward hook its output). ``REDSite`` (red_in -> layer -> red_out, in place of the layer) does exactly
    that. ``student``/``teacher``: head stride then one digit per level.
    """
    if len(student) != len(teacher):
        raise UserError(f"red.sites: paper pairs U-Nets with the same levels, not {len(student)} and {len(teacher)}")
    s_down, s_up = _samplers(student, image_size, num_res_blocks)
    t_down, t_up = _samplers(teacher, image_size, num_res_blocks)
    sites = []
    for low, s_path, t_path in (("out", s_down, t_down), ("in", s_up, t_up)):
        at = {}  # (H, side) -> the teacher's first sampling conv with a tensor of that H on that side
        for name, stride, h_in, h_out in t_path:
            if stride > 1:
                if name != "head":
                    at.setdefault((h_in, "in"), name)
                if name != "tail":
                    at.setdefault((h_out, "out"), name)
        for (name, stride, h_in, h_out), (_, _, t_in, t_out) in zip(s_path, t_path):
            h_low, t_low = (h_out, t_out) if low == "out" else (h_in, t_in)
            if stride == 1 or h_low >= t_low:
                continue
            sides = {"head": (("out", h_out),), "tail": (("in", h_in),)}.get(name, (("in", h_in), ("out", h_out)))
            for where, h in sides:
                other = "in" if where == "out" else "out"
                twhere = where if (h, where) in at else other if (h, other) in at else None
                if twhere is not None:
                    sites.append({"student": name, "where": where, "teacher": at[h, twhere],
                                  "teacher_where": None if twhere == where else twhere})
    if not sites:
        raise UserError("red.sites: paper found no student layer that downsamples before the teacher's: the student's "
                        "strides must move a stride into the head or an earlier level")
    return sites


def output_sites(student: Sequence[int], teacher: Sequence[int], image_size: int, num_res_blocks: int) -> List[dict]:
    """``red.sites: outputs``: five output-side sites, this project's first DDPM placement (not the paper's).

    The head's output and the last down and up residual blocks of the student's two largest levels, each matched
    to the teacher's tensor of equal H x W (the head to the teacher's downsampling conv, a block to the last block
    of the teacher's level of that size). The RED output on ``down.0.{n-1}`` is what its skip carries, where the
    paper's placement puts that block on the next down conv's input, off the skip (see ``paper_sites``).
    """
    s_sz, t_sz = level_sizes(student, image_size), level_sizes(teacher, image_size)

    def teacher_level(h: int, first: int = 0) -> int:
        for k in range(first, len(t_sz)):
            if t_sz[k] == h:
                return k
        raise UserError(f"red.sites: outputs needs a teacher level of {h} px (the teacher's are {t_sz} at "
                        f"{image_size} px); list red.sites by hand")

    def last_down(level: int) -> str:
        return f"down.{level}.{num_res_blocks - 1 if level == 0 else num_res_blocks}"

    if len(s_sz) < 2:
        raise UserError("red.sites: outputs needs a U-Net with at least two levels")
    sites = [{"student": "head", "where": "out", "teacher": f"down.{teacher_level(s_sz[0], 1)}.0"}]
    sites += [{"student": last_down(lv), "where": "out", "teacher": last_down(teacher_level(s_sz[lv]))} for lv in (0, 1)]
    sites += [{"student": f"up.{lv}.{num_res_blocks}", "where": "out",
               "teacher": f"up.{teacher_level(s_sz[lv])}.{num_res_blocks}"} for lv in (1, 0)]
    return sites

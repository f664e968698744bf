"""Training batches augmented whole on the training device: the images stay decoded in one uint8 tensor,
each batch goes to the device as uint8 and is cropped, flipped and resized there in one go, then normalised.

Each batched augmentation draws its parameters as the per-image torchvision transform does (same
distribution), from a seeded CPU generator, so a run is the same on every device and a resumed epoch repeats.
A GPU is then not starved by JPEG decoding and per-image Python; on a CPU it saves the per-image transforms.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

#: ``fn(uint8 batch B x C x H x W on the device, image_size, generator) -> uint8 batch B x C x S x S``
BatchedAugment = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Every image to ``size`` x ``size`` (antialiased bilinear, as ``v2.Resize``; a no-op at that size)."""
    return TF.resize(x, [size, size], antialias=True)


def flips(n: int, gen: torch.Generator) -> torch.Tensor:
    """Which of ``n`` images are flipped horizontally (each with probability 1/2)."""
    return torch.rand(n, generator=gen) < 0.5


def flip_batch(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside [0, n) mirrored back in without repeating the edge (``padding_mode="reflect"``)."""
    idx = idx.abs()
    return torch.where(idx >= n, 2 * (n - 1) - idx, idx)


def crop_params(n: int, size: int, pad: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top and left corners of ``v2.RandomCrop(size, padding=pad)``: uniform over the 2 * pad + 1 offsets."""
    return torch.randint(0, 2 * pad + 1, (n,), generator=gen), torch.randint(0, 2 * pad + 1, (n,), generator=gen)


def pad_crop_flip(x: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Reflect-pad by ``pad``, crop back to the input size at (``top``, ``left``) and flip, in one gather."""
    b, c, h, w = x.shape
    dev = x.device
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = _reflect(top.to(dev).view(-1, 1) + ar_h - pad, h)
    cols_idx = torch.where(flip.to(dev).view(-1, 1), (w - 1 - ar_w).expand(b, w), ar_w.expand(b, w))
    cols = _reflect(left.to(dev).view(-1, 1) + cols_idx - pad, w)
    bi = torch.arange(b, device=dev).view(-1, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, -1, 1, 1)
    return x[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def rrc_params(n: int, height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float],
               gen: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """(top, left, h, w) of ``v2.RandomResizedCrop``: up to 10 tries of area and log-uniform aspect ratio,
    the first that fits kept, else the central crop of the clamped ratio."""
    tries = 10
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=gen))
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, tries, generator=gen))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(1)
    found = ok.any(1)
    h = h.gather(1, first.view(-1, 1)).squeeze(1)
    w = w.gather(1, first.view(-1, 1)).squeeze(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    u = torch.rand(n, 2, generator=gen)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).long().clamp(max=height - h), (height - h) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).long().clamp(max=width - w), (width - w) // 2)
    return top, left, h, w


def resized_crop_flip(x: torch.Tensor, top, left, h, w, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box and resize it to ``size`` (bilinear), flipped where ``flip``; uint8 out.

    Boxes no larger than ``size`` (upsampling, where antialiasing does nothing) are sampled together with
    ``grid_sample`` at the positions ``interpolate`` uses inside the box; a larger box is resized on its own
    with antialiasing, as ``v2.RandomResizedCrop`` does.
    """
    b, c, height, width = x.shape
    dev = x.device
    top, left, h, w, flip = (t.to(dev) for t in (top, left, h, w, flip))
    k = torch.arange(size, device=dev, dtype=torch.float32) + 0.5

    def src(start, extent, length):  # absolute source coordinate of each output pixel, then grid units
        pos = (k.view(1, -1) * (extent.view(-1, 1) / size) - 0.5).clamp(min=0)
        pos = torch.minimum(pos, (extent - 1).view(-1, 1).float()) + start.view(-1, 1)
        return (2 * pos + 1) / length - 1

    gy, gx = src(top, h, height), src(left, w, width)
    gx = torch.where(flip.view(-1, 1), gx.flip(-1), gx)
    grid = torch.stack([gx.view(b, 1, size).expand(b, size, size), gy.view(b, size, 1).expand(b, size, size)], -1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    big = ((h > size) | (w > size)).nonzero().flatten().tolist()
    for i in big:
        r = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size], antialias=True)
        out[i] = r.flip(-1) if bool(flip[i]) else r
    return out


class DeviceBatches:
    """An epoch of training batches from a uint8 image tensor: gathered on the host in the given order, moved to
    ``device`` as uint8, augmented there in batch by ``augment`` (an ``AUGMENTS`` entry's batched form), then
    scaled to [0, 1] and normalised, in ``memory_format``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: BatchedAugment, image_size: int,
                 mean: Sequence[float], std: Sequence[float], batch_size: int, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.images, self.labels, self.augment = images, labels, augment
        self.size, self.batch_size, self.device, self.memory_format = image_size, batch_size, device, memory_format
        self.mean, self.std = list(mean), list(std)
        self.pin = device.type == "cuda"

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: torch.Tensor, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """The augmented, normalised batch of the images at ``idx`` (augmentation drawn from ``gen``)."""
        x, y = self.images[idx], self.labels[idx]
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        x = self.augment(x, self.size, gen)
        x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
        return x.contiguous(memory_format=self.memory_format), y

    def epoch(self, order: Sequence[int], gen: torch.Generator) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` over ``order`` (the sampler's indices; the last batch may be short)."""
        order = torch.as_tensor(order, dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start:start + self.batch_size], gen)


def epoch_order(n: int, gen: torch.Generator, sampler: Optional[object] = None) -> torch.Tensor:
    """The epoch's index order: a DistributedSampler's share, else a permutation drawn from ``gen``."""
    if sampler is not None:
        return torch.as_tensor(list(iter(sampler)), dtype=torch.long)
    return torch.randperm(n, generator=gen)

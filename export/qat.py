"""Quantization-aware fine-tuning (QAT), for an INT8 export that post-training quantization leaves short of its goal:
its settings, its loss and its training loop.

The loss is the KL divergence from the FP32 network's own outputs on the same images: what is learnt is to keep
FP32's top-1 under rounding, not the labels again. What is rounded, and how, is ``export.qat_graph``'s: the FP32
ONNX graph run in torch, fake-quantized exactly where onnxruntime's QDQ model of it quantizes. The export scores
the fine-tuned graph beside the post-training one on validation images and keeps whichever keeps FP32's top-1 on
more of them; its manifest says which (the checkpoint and the FP32 figures are never changed).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class QATSettings:
    """How the fine-tuning runs; recorded in the manifest."""

    epochs: int
    lr: float = 1e-4  # SGD with momentum 0.9, cosine to zero; 1e-3 made the INT8 graph worse in a trial (docs/export.md)
    momentum: float = 0.9
    batch: int = 64
    seed: int = 0
    flip: bool = True  # random horizontal flips of the training images (the only augmentation)
    scale_lr: float = 1e-3  # Adam on each activation scale's log, learnt with the weights (LSQ); 0: frozen scales


def kl_from(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per image, averaged: zero when the rounded network gives FP32's distribution."""
    return F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference_logits, 1), log_target=True,
                    reduction="batchmean")


@torch.no_grad()
def mean_kl(model: nn.Module, reference: nn.Module, images: np.ndarray, batch: int = 64) -> float:
    total = 0.0
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch])
        total += float(kl_from(reference(x), model(x))) * len(x)
    return total / max(len(images), 1)


#: the fine-tuning says its projected time after this many batches
ESTIMATE_AFTER = 20


def train_kl(model: nn.Module, reference: nn.Module, params: List[torch.Tensor], train: Dataset,
             settings: QATSettings, say: Callable[[str], None], scale_params: Sequence[torch.Tensor] = ()
             ) -> Tuple[List[float], int, float]:
    """The fine-tuning loop: KL from ``reference``'s outputs on the same (seeded, flipped) batches; ``params`` by SGD
    with momentum, ``scale_params`` (log activation scales) by Adam at ``settings.scale_lr``; both cosine to zero.
    Returns (mean KL per epoch, images trained, seconds)."""
    g = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(train, batch_size=settings.batch, shuffle=True, drop_last=len(train) > settings.batch,
                        generator=g)
    total = settings.epochs * len(loader)

    def cosine(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))

    opts = [torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)]
    if scale_params and settings.scale_lr > 0:
        opts.append(torch.optim.Adam(list(scale_params), lr=settings.scale_lr))
    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, cosine) for opt in opts]
    curve, t0, images = [], time.perf_counter(), 0
    for epoch in range(settings.epochs):
        run, n = 0.0, 0
        for x, _ in loader:
            if settings.flip:
                flip = torch.rand(len(x), generator=g) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            with torch.no_grad():
                target = reference(x)
            loss = kl_from(target, model(x))
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, sched in zip(opts, scheds):
                opt.step()
                sched.step()
            run, n = run + float(loss.detach()) * len(x), n + len(x)
            if epoch == 0 and n == ESTIMATE_AFTER * settings.batch:
                per = (time.perf_counter() - t0) / ESTIMATE_AFTER
                say(f"  QAT: {per:.2f} s per batch of {settings.batch}: about {per * total / 60:.0f} min for "
                    f"{settings.epochs} epoch(s) of {len(loader)} batches")
        images += n
        curve.append(float(f"{run / max(n, 1):.4g}"))
        say(f"  QAT epoch {epoch + 1}/{settings.epochs}: KL from FP32 {curve[-1]:.4f} on {n} training images")
    return curve, images, time.perf_counter() - t0

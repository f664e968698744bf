"""Quantization-aware fine-tuning (QAT), for an INT8 export that post-training quantization leaves short of its goal.

The folded network (BatchNorm already in its convs, exactly what is exported) is fine-tuned for a few epochs on the
run's training part with every conv's and linear layer's weight and input rounded as the INT8 graph rounds them
(``export.quantize``: int8, symmetric; weights per output channel from their own range, inputs and outputs per
tensor at the range a min-max pass over the calibration images found, then frozen), gradients passing the rounding straight
through. Only convs and linear layers are rounded: onnxruntime also rounds the tensors between element-wise ops
(a hard-swish's Mul, squeeze-excitation's gate, residual Adds), which this leaves exact, so the fine-tuned network
learns the rounding of its weights and of the convs' inputs and outputs, not every error of the INT8 graph. The
loss is the KL divergence from the FP32 network's own outputs on the same images: what is learnt is
to keep FP32's top-1 under rounding, not the labels again. The fine-tuned float weights are then exported and go
through the same calibration and float-node search; the export keeps whichever INT8 graph keeps FP32's top-1 on
more validation images, and its manifest says which (the checkpoint and the FP32 figures are never changed).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from train.models import set_se_linear

#: int8 symmetric, as export.quantize asks onnxruntime for (ActivationSymmetric, WeightSymmetric): its symmetric
#: int8 range (quant_utils.ONNX_INT_TYPE_SYMMETRIC_RANGE)
QMIN, QMAX = -127, 127


@dataclass(frozen=True)
class QATSettings:
    """How the fine-tuning runs; recorded in the manifest."""

    epochs: int
    lr: float = 1e-4  # SGD with momentum 0.9, cosine to zero; 1e-3 made the INT8 graph worse in a trial (docs/export.md)
    momentum: float = 0.9
    batch: int = 64
    seed: int = 0
    flip: bool = True  # random horizontal flips of the training images (the only augmentation)


def symmetric_scale(absmax: torch.Tensor) -> torch.Tensor:
    """onnxruntime's symmetric int8 scale for a range [-absmax, absmax]: 2 * absmax / (QMAX - QMIN)."""
    return (2 * absmax / (QMAX - QMIN)).clamp_min(1e-12)


class FakeQuant(nn.Module):
    """A Conv2d or Linear whose input and output (per tensor, frozen scales) and weight (per output channel) are
    fake-quantized, as onnxruntime's QDQ graph quantizes a conv's input, weight and output tensor.

    ``observing``: runs in float and widens the input range instead (the min-max pass over calibration images).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer, self.observing = layer, False
        self.register_buffer("absmax", torch.zeros(2))  # input, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            y = self.layer(x)
            seen = torch.stack([x.detach().abs().amax(), y.detach().abs().amax()])
            self.absmax = torch.maximum(self.absmax, seen)
            return y
        scale = symmetric_scale(self.absmax)
        zero = torch.zeros((), dtype=torch.int32, device=x.device)
        x = torch.fake_quantize_per_tensor_affine(x, scale[0], zero, QMIN, QMAX)
        w = self.layer.weight
        w_scale = symmetric_scale(w.detach().abs().flatten(1).amax(1))
        w = torch.fake_quantize_per_channel_affine(w, w_scale, torch.zeros_like(w_scale, dtype=torch.int32), 0,
                                                   QMIN, QMAX)
        if isinstance(self.layer, nn.Conv2d):
            y = self.layer._conv_forward(x, w, self.layer.bias)
        else:
            y = F.linear(x, w, self.layer.bias)
        return torch.fake_quantize_per_tensor_affine(y, scale[1], zero, QMIN, QMAX)


def wrap(model: nn.Module) -> List[FakeQuant]:
    """Replace every Conv2d and Linear of ``model`` (in place) by a ``FakeQuant`` around it; squeeze-excitation
    runs its 1x1 convs (as exported), not their linear shortcut."""
    set_se_linear(model, False)
    wrapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)) and not isinstance(parent, FakeQuant):
                fq = FakeQuant(child)
                setattr(parent, name, fq)
                wrapped.append(fq)
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """Put every wrapped layer back (its trained weights with it); the network is then the exportable one again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FakeQuant):
                setattr(parent, name, child.layer)
    return model


@torch.no_grad()
def observe(layers: List[FakeQuant], model: nn.Module, images: np.ndarray, batch: int = 64) -> None:
    """The min-max pass: every wrapped layer's input and output ranges over ``images`` (N x C x H x W, normalised)."""
    for fq in layers:
        fq.observing = True
        fq.absmax.zero_()
    for i in range(0, len(images), batch):
        model(torch.from_numpy(images[i:i + batch]))
    for fq in layers:
        fq.observing = False


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
             settings: QATSettings, say: Callable[[str], None]) -> Tuple[List[float], int, float]:
    """The loop both emulations fine-tune with: KL from ``reference``'s outputs on the same (seeded, flipped)
    batches, SGD with momentum, cosine to zero. Returns (mean KL per epoch, images trained, seconds)."""
    g = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(train, batch_size=settings.batch, shuffle=True, drop_last=len(train) > settings.batch,
                        generator=g)
    total = settings.epochs * len(loader)
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
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


def finetune(folded: nn.Module, train: Dataset, calib_images: np.ndarray, check_images: np.ndarray,
             settings: QATSettings, say: Callable[[str], None] = lambda _: None) -> Tuple[nn.Module, Dict[str, Any]]:
    """A fine-tuned copy of ``folded`` (float weights, the same modules) and the record of the run.

    ``train``: the run's training images (eval transform); ``calib_images``: what the input ranges are observed on;
    ``check_images``: images the KL from FP32 is reported on before and after (the caller's validation images).
    """
    if settings.epochs < 1:
        raise ValueError("QAT needs at least one epoch")
    reference = folded.eval().requires_grad_(False)
    model = copy.deepcopy(folded).eval().requires_grad_(True)  # eval: dropout off; nothing left to normalise
    layers = wrap(model)
    observe(layers, model, calib_images)
    before = mean_kl(model, reference, check_images)
    params = [p for p in model.parameters() if p.requires_grad]
    curve, images, seconds = train_kl(model, reference, params, train, settings, say)
    after = mean_kl(model, reference, check_images)
    unwrap(model)
    model.requires_grad_(False)
    record = {"settings": asdict(settings), "layers": len(layers), "train_images": len(train),
              "images_trained": images, "seconds": round(seconds, 1), "train_kl_per_epoch": curve,
              "check_images": int(len(check_images)), "kl_before": float(f"{before:.4g}"), "kl_after": float(f"{after:.4g}"),
              "loss": "KL(FP32 network || fake-quantized network), batch mean",
              "rounding": "conv/linear weights int8 symmetric per output channel, their inputs and outputs int8 "
                          "symmetric per tensor at min-max ranges over the calibration images (frozen); "
                          "straight-through gradients"}
    say(f"INT8: QAT {settings.epochs} epoch(s) in {seconds:.0f} s: KL from FP32 on {len(check_images)} validation "
        f"images {before:.4f} -> {after:.4f}")
    return model, record

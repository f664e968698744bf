"""Distillation losses and the methods built from them.

Adding a loss is one decorated function taking a ``LossInputs``; a method is
the tuple of losses it averages: total = w_ce * CE + w_dist * mean(losses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from redistill.registry import Registry
from train.red import DISTANCES, SitePlan

DISTILL_LOSSES: Registry = Registry("distillation loss")
METHODS: Registry = Registry("method")

for _name, _losses in {
    "teacher": (),
    "student": (),
    "kd": ("kd",),
    "red": ("red",),
    "red_kd": ("red", "kd"),
}.items():
    METHODS.register(_name)(_losses)


@dataclass
class LossInputs:
    """Everything a distillation loss may read for one batch."""

    student_logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    student_feats: Dict[str, torch.Tensor] = field(default_factory=dict)  # RED block outputs by site key
    teacher_feats: Dict[str, torch.Tensor] = field(default_factory=dict)  # matched teacher tensors by site key
    plans: Sequence[SitePlan] = ()
    distance: str = "cosine"
    temperature: float = 4.0


@DISTILL_LOSSES.register("kd")
def kd_loss(b: LossInputs) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``."""
    T = b.temperature
    return F.kl_div(
        F.log_softmax(b.student_logits / T, dim=1), F.log_softmax(b.teacher_logits / T, dim=1),
        reduction="batchmean", log_target=True,
    ) * (T * T)


@DISTILL_LOSSES.register("red")
def red_loss(b: LossInputs) -> torch.Tensor:
    """Mean over RED blocks of ``alpha * distance(mean_c y, mean_c t)``."""
    dist = DISTANCES.get(b.distance)
    terms = [p.alpha * dist(b.student_feats[p.key], b.teacher_feats[p.key].detach()) for p in b.plans]
    return torch.stack(terms).mean()


def total_loss(method: str, ce: torch.Tensor, b: LossInputs, w_ce: float, w_dist: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``w_ce * CE + w_dist * mean(distillation losses)``; plain CE for methods without a teacher."""
    names = METHODS.get(method)
    parts = {"ce": float(ce.detach())}
    if not names:
        return ce, parts
    dl = [DISTILL_LOSSES.get(n)(b) for n in names]
    for n, v in zip(names, dl):
        parts[n] = float(v.detach())
    return w_ce * ce + w_dist * torch.stack(dl).mean(), parts

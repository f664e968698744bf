"""Distillation losses and the methods built from them.

Adding a loss is one decorated function taking a ``LossInputs`` (``@register_loss``); a method is
one ``register_method`` record: the losses it averages (total = w_ce * CE + w_dist * mean(losses)),
its label and plot marker. Config validation, the trainer, compare and the benchmarks read these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from redistill.registry import Registry
from train.red import DISTANCES, SitePlan



@dataclass(frozen=True)
class DistillLoss:
    """One distillation loss: how it is computed and what of the teacher it reads."""

    name: str
    fn: Callable[["LossInputs"], torch.Tensor]
    uses_sites: bool = False  # reads RED-site features (student blocks matched to teacher layers)
    uses_logits: bool = False  # reads the teacher's logits


@dataclass(frozen=True)
class Method:
    """A training method: the distillation losses it averages (none: the task loss alone) and how it is shown."""

    name: str
    losses: Tuple[str, ...]
    label: str  # in tables and plot legends
    marker: str  # matplotlib marker in plots
    order: int  # position in tables and plots (teacher first)
    teacher_only: bool = False  # trains the teacher and stops

    @property
    def needs_teacher(self) -> bool:
        """A frozen teacher runs beside the student (any distillation loss)."""
        return bool(self.losses)

    @property
    def needs_sites(self) -> bool:
        """RED blocks / teacher-feature sites must be configured (``red.sites``)."""
        return any(DISTILL_LOSSES.get(n).uses_sites for n in self.losses)

    @property
    def needs_logits(self) -> bool:
        return any(DISTILL_LOSSES.get(n).uses_logits for n in self.losses)


DISTILL_LOSSES: Registry[DistillLoss] = Registry("distillation loss")
METHODS: Registry[Method] = Registry("method")


def register_loss(name: str, uses_sites: bool = False, uses_logits: bool = False):
    """Decorator: register ``fn(LossInputs) -> scalar`` as distillation loss ``name``."""

    def deco(fn):
        DISTILL_LOSSES.register(name)(DistillLoss(name, fn, uses_sites, uses_logits))
        return fn

    return deco


def register_method(name: str, losses: Sequence[str], label: str, marker: str, teacher_only: bool = False) -> Method:
    """Register a method (one record); its order in tables is the order of registration."""
    method = Method(name, tuple(losses), label, marker, len(METHODS.names()), teacher_only)
    METHODS.register(name)(method)
    return method


def methods_in_order() -> List[Method]:
    """Every method, in registration order (teacher first), for tables and plots."""
    return sorted((METHODS.get(n) for n in METHODS), key=lambda m: m.order)


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


@register_loss("kd", uses_logits=True)
def kd_loss(b: LossInputs) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``."""
    T = b.temperature
    return F.kl_div(
        F.log_softmax(b.student_logits / T, dim=1), F.log_softmax(b.teacher_logits / T, dim=1),
        reduction="batchmean", log_target=True,
    ) * (T * T)


@register_loss("red", uses_sites=True)
def red_loss(b: LossInputs) -> torch.Tensor:
    """Mean over RED blocks of ``alpha * distance(mean_c y, mean_c t)``."""
    dist = DISTANCES.get(b.distance)
    terms = [p.alpha * dist(b.student_feats[p.key], b.teacher_feats[p.key].detach()) for p in b.plans]
    return torch.stack(terms).mean()


def total_loss(method: str, ce: torch.Tensor, b: LossInputs, w_ce: float, w_dist: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``w_ce * CE + w_dist * mean(distillation losses)``; plain CE for methods without a teacher."""
    names = METHODS.get(method).losses
    parts = {"ce": float(ce.detach())}
    if not names:
        return ce, parts
    dl = [DISTILL_LOSSES.get(n).fn(b) for n in names]
    for n, v in zip(names, dl):
        parts[n] = float(v.detach())
    return w_ce * ce + w_dist * torch.stack(dl).mean(), parts


register_method("teacher", (), "teacher", "s", teacher_only=True)
register_method("student", (), "student alone", "o")
register_method("kd", ("kd",), "KD", "^")
register_method("red", ("red",), "RED", "*")
register_method("red_kd", ("red", "kd"), "RED+KD", "D")

"""Distillation losses and the methods built from them.

Adding a loss is one decorated function taking a ``LossInputs`` (``@register_loss``); a method is
one ``register_method`` record: the losses it combines, how (``combine``), its label and plot marker.
Config validation, the trainer, compare and the benchmarks read these records.

    total = w_ce * CE + w_dist * D
    D = mean over the method's losses of (weight * loss)              combine="mean" (this project's form)
    D = mean over every site term and every other loss                 combine="terms" (the paper's ReED form)

Where each loss and weight comes from in the paper's code is in its docstring and in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from redistill.errors import UserError
from redistill.registry import Registry
from train.red import DISTANCES, SitePlan

#: how a method's losses make the distillation term D
COMBINE = ("mean", "terms")


@dataclass(frozen=True)
class DistillLoss:
    """One distillation loss: how it is computed and what of the teacher it reads."""

    name: str
    fn: Callable[["LossInputs"], torch.Tensor]
    uses_sites: bool = False  # reads RED-block outputs at the sites (the student gets RED blocks)
    uses_logits: bool = False  # reads the teacher's logits
    uses_taps: bool = False  # reads plain student and teacher tensors at the sites through hooks (no RED blocks)
    weight_key: Optional[str] = None  # the loss.* config key that weights it (None: weight 1)
    #: the per-site terms of which ``fn`` is the ``reduce`` (mean or sum), for ``combine="terms"`` (None: one term)
    terms: Optional[Callable[["LossInputs"], List[torch.Tensor]]] = None
    reduce: str = "mean"

    def reduced(self, terms: List[torch.Tensor]) -> torch.Tensor:
        """``fn``'s value from its terms."""
        t = torch.stack(terms)
        return t.sum() if self.reduce == "sum" else t.mean()


@dataclass(frozen=True)
class Method:
    """A training method: the distillation losses it combines (none: the task loss alone) and how it is shown."""

    name: str
    losses: Tuple[str, ...]
    label: str  # in tables and plot legends
    marker: str  # matplotlib marker in plots
    order: int  # position in tables and plots (teacher first)
    teacher_only: bool = False  # trains the teacher and stops
    combine: str = "mean"  # COMBINE: how the losses make D (module docstring)
    temperature_key: str = "kd_temperature"  # the loss.* config key of its KD temperature

    @property
    def needs_teacher(self) -> bool:
        """A frozen teacher runs beside the student (any distillation loss)."""
        return bool(self.losses)

    @property
    def needs_sites(self) -> bool:
        """The student carries RED blocks at the configured sites (``red.sites``)."""
        return any(DISTILL_LOSSES.get(n).uses_sites for n in self.losses)

    @property
    def needs_taps(self) -> bool:
        """Student and teacher tensors are read at the configured sites, the student unchanged (FitNet, AT)."""
        return any(DISTILL_LOSSES.get(n).uses_taps for n in self.losses)

    @property
    def reads_sites(self) -> bool:
        """``red.sites`` must be configured (RED blocks or feature taps)."""
        return self.needs_sites or self.needs_taps

    @property
    def needs_logits(self) -> bool:
        return any(DISTILL_LOSSES.get(n).uses_logits for n in self.losses)


DISTILL_LOSSES: Registry[DistillLoss] = Registry("distillation loss")
METHODS: Registry[Method] = Registry("method")


def register_loss(name: str, uses_sites: bool = False, uses_logits: bool = False, uses_taps: bool = False,
                  weight_key: Optional[str] = None, terms: Optional[Callable] = None, reduce: str = "mean"):
    """Decorator: register ``fn(LossInputs) -> scalar`` as distillation loss ``name`` (with ``terms``: fn is
    ``reduce`` over them)."""

    def deco(fn):
        DISTILL_LOSSES.register(name)(DistillLoss(name, fn, uses_sites, uses_logits, uses_taps, weight_key, terms,
                                                  reduce))
        return fn

    return deco


def register_method(name: str, losses: Sequence[str], label: str, marker: str, teacher_only: bool = False,
                    combine: str = "mean", temperature_key: str = "kd_temperature") -> Method:
    """Register a method (one record); its order in tables is the order of registration."""
    if combine not in COMBINE:
        raise ValueError(f"method {name}: combine={combine!r} is not one of {COMBINE}")
    records = [DISTILL_LOSSES.get(n) for n in losses]
    if any(r.uses_sites for r in records) and any(r.uses_taps for r in records):
        raise ValueError(f"method {name}: RED blocks and feature taps share the site keys; use one kind per method")
    method = Method(name, tuple(losses), label, marker, len(METHODS.names()), teacher_only, combine, temperature_key)
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
    student_feats: Dict[str, torch.Tensor] = field(default_factory=dict)  # RED block outputs or tapped tensors by site key
    teacher_feats: Dict[str, torch.Tensor] = field(default_factory=dict)  # matched teacher tensors by site key
    plans: Sequence[SitePlan] = ()
    distance: str = "cosine"
    temperature: float = 4.0
    weights: Dict[str, float] = field(default_factory=dict)  # loss name -> weight (its weight_key's value)
    regressors: Dict[str, nn.Module] = field(default_factory=dict)  # FitNet: site key -> student-to-teacher regressor
    at_p: float = 2.0  # attention transfer: the power of the attention map


@register_loss("kd", uses_logits=True)
def kd_loss(b: LossInputs) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean (pipeline_classification/stl10/distiller_zoo/KD.py,
    reed/modules.py KnowledgeDistillationModule)."""
    T = b.temperature
    return F.kl_div(
        F.log_softmax(b.student_logits / T, dim=1), F.log_softmax(b.teacher_logits / T, dim=1),
        reduction="batchmean", log_target=True,
    ) * (T * T)


def red_terms(b: LossInputs) -> List[torch.Tensor]:
    """``alpha * distance(mean_c y, mean_c t)`` of each RED block (reed/modules.py ResidualEncodedModule)."""
    dist = DISTANCES.get(b.distance)
    return [p.alpha * dist(b.student_feats[p.key], b.teacher_feats[p.key].detach()) for p in b.plans]


@register_loss("red", uses_sites=True, terms=red_terms)
def red_loss(b: LossInputs) -> torch.Tensor:
    """Mean over RED blocks of ``alpha * distance(mean_c y, mean_c t)``."""
    return DISTILL_LOSSES.get("red").reduced(red_terms(b))


def _pair(b: LossInputs, p: SitePlan, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    s, t = b.student_feats[p.key], b.teacher_feats[p.key].detach()
    if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
        raise UserError(f"{what} site {p.key}: student tensor {list(s.shape)} and teacher tensor {list(t.shape)} "
                        f"({p.teacher}) differ in batch or H x W; pick a teacher layer of equal H x W")
    return s, t


def fitnet_terms(b: LossInputs) -> List[torch.Tensor]:
    """Per site: ``MSE(regressor(student tensor), teacher tensor)`` (pipeline_classification/stl10/distiller_zoo/FitNet.py
    HintLoss; the regressor is the zoo's ConvReg, ``train.hints``). Without a regressor the student tensor is used as is."""
    out = []
    for p in b.plans:
        s, t = _pair(b, p, "FitNet")
        reg = b.regressors.get(p.key)
        s = reg(s) if reg is not None else s
        if s.shape != t.shape:
            raise UserError(f"FitNet site {p.key}: the student tensor regresses to {list(s.shape)} but teacher "
                            f"{p.teacher} gives {list(t.shape)}; FitNet needs a regressor to the teacher's channels")
        out.append(F.mse_loss(s, t))
    return out


@register_loss("fitnet", uses_taps=True, weight_key="fitnet_weight", terms=fitnet_terms)
def fitnet_loss(b: LossInputs) -> torch.Tensor:
    """FitNet hint loss, averaged over the sites (the paper's zoo hints one layer: with one site this is its loss)."""
    return DISTILL_LOSSES.get("fitnet").reduced(fitnet_terms(b))


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: ``normalize(mean_c |f|^p)`` per sample, flattened (B x H*W)."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1))


def at_terms(b: LossInputs) -> List[torch.Tensor]:
    """Per site: ``mean((at(s) - at(t))^2)`` (pipeline_classification/stl10/distiller_zoo/AT.py, p = 2)."""
    out = []
    for p in b.plans:
        s, t = _pair(b, p, "AT")
        out.append((attention_map(s, b.at_p) - attention_map(t, b.at_p)).pow(2).mean())
    return out


@register_loss("at", uses_taps=True, weight_key="at_weight", terms=at_terms, reduce="sum")
def at_loss(b: LossInputs) -> torch.Tensor:
    """Attention transfer, summed over the sites as the zoo sums over its feature groups (stl10/helper/loops.py)."""
    return DISTILL_LOSSES.get("at").reduced(at_terms(b))


def total_loss(method: str, ce: torch.Tensor, b: LossInputs, w_ce: float, w_dist: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """``w_ce * CE + w_dist * D`` (module docstring); plain CE for methods without a teacher.

    ``parts`` holds each loss unweighted (by name) beside ``ce``.
    """
    m = METHODS.get(method)
    parts = {"ce": float(ce.detach())}
    if not m.losses:
        return ce, parts
    terms = []
    for name in m.losses:
        rec = DISTILL_LOSSES.get(name)
        w = b.weights.get(name, 1.0)
        if m.combine == "terms" and rec.terms is not None:
            ts = rec.terms(b)
            parts[name] = float(rec.reduced(ts).detach())
            terms += [w * t for t in ts]
        else:
            v = rec.fn(b)
            parts[name] = float(v.detach())
            terms.append(w * v)
    return w_ce * ce + w_dist * torch.stack(terms).mean(), parts


register_method("teacher", (), "teacher", "s", teacher_only=True)
register_method("student", (), "student alone", "o")
register_method("kd", ("kd",), "KD", "^")
register_method("red", ("red",), "RED", "*")
register_method("red_kd", ("red", "kd"), "RED+KD", "D")
# the paper's RED+KD (base/configs/mobilenetv3_small-red+kd.yaml): KD is one more module beside the RED blocks,
# at T = 2 (reed/modules.py KnowledgeDistillationModule default), and ReED averages every module's loss
# (reed/models.py: torch.stack(dist_hook.loss()).mean()), so D = (sum of RED block terms + KD) / (blocks + 1)
register_method("red_kd_paper", ("red", "kd"), "RED+KD (paper weighting)", "P", combine="terms",
                temperature_key="red_kd_paper_temperature")
register_method("fitnet", ("fitnet",), "FitNet", "v")
register_method("fitnet_kd", ("fitnet", "kd"), "FitNet+KD", "<")
register_method("at", ("at",), "AT", "X")
register_method("at_kd", ("at", "kd"), "AT+KD", ">")

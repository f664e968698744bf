"""What differs between training a classifier and a denoiser, behind one interface the trainer loop calls.

A task computes one batch's loss (the student's task loss and, for distillation
methods, the teacher-matched losses), keeps any extra state (a denoiser's EMA
weights), validates a model (the score that picks the best epoch) and tests
the saved checkpoints. Each task also carries the record of its quality figure (``TaskMetric``: which
summary key, better direction, format, column and plot titles) that ``redistill compare`` reads.
Adding a task is one decorated class.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from redistill.registry import Registry
from train.diffusion import Diffusion
from train.hints import (REGRESSOR_KEY, FeatureTaps, average_gradients, load_regressors, make_regressors,
                         regressor_state, tap_plans, teacher_channels)
from train.losses import DISTILL_LOSSES, METHODS, LossInputs, total_loss
from train.red import SitePlan

TASKS: Registry = Registry("task")
#: the task of files written before the ``task`` key existed (they are all classifiers)
DEFAULT_TASK = "classify"


@dataclass(frozen=True)
class OnnxFigures:
    """Where a bundle's manifest keeps the task's figure measured with ONNX Runtime at export, and its names."""

    section: str  # manifest section: ``accuracy``
    fp32: str  # key of the FP32 graph's figure in it: ``fp32_top1``
    int8: str  # key of the INT8 graph's figure: ``int8_top1``
    name: str  # compare's fields onnx_fp32_NAME / onnx_int8_NAME and CSV columns onnx_fp32_NAME / int8_NAME
    title: str  # table headers "ONNX FP32 TITLE" / "INT8 TITLE"


@dataclass(frozen=True)
class TaskMetric:
    """A task's quality figure: what is read from the run summary and the bundle, which way is better,
    and how compare's tables and plots name it. ``key`` names it in compare.csv / compare.json."""

    key: str  # ``top1``: compare's field and CSV column (with _std, _min, _max; teacher_KEY, student_alone_KEY)
    summary_key: str  # the test figure in a stage's summary.json ``best`` / ``last``: ``test_top1``
    higher_is_better: bool
    fmt: str  # format spec of the figure in tables: ``.2f``
    title: str  # "top-1": runs table "(best)"/"(last)" columns, pairs table figure column
    column: str  # models table column: "top-1 (%)"
    short: str  # pairs table "teacher SHORT" / "student-alone SHORT" columns
    gap_unit: str  # pairs table "gap (UNIT)"
    noun: str  # in notes: "no distillation run found (NOUN from the bundle only)"
    plural: str  # "classifiers", in the plots' notes and list
    intro: str  # what the figure is, in compare.md's opening paragraph
    label_suffix: str  # appended to model labels ("denoiser": "RED (unet-2-221, 32 px, denoiser)"); "" for none
    onnx: OnnxFigures
    plot_file: str  # the figure of this metric against theoretical peak memory
    plot_title: str
    plot_ylabel: str
    plot_what: str  # "a test accuracy": the empty plot says "no model with both WHAT and a theoretical peak"
    models_heading: str = ""  # above this task's models table when another task's table precedes it
    runs_heading: str = ""  # likewise above its runs table
    generative: bool = False  # its checkpoints draw samples that `redistill quality` scores (CFD column)

    @property
    def sign(self) -> float:
        """+1 when higher is better, -1 when lower is: ``sign * (a - b) > 0`` means a is better than b."""
        return 1.0 if self.higher_is_better else -1.0

    def gap(self, teacher: Optional[float], alone: Optional[float]) -> Optional[float]:
        """How much better the teacher is than the student trained alone (in the figure's units)."""
        return self.sign * (teacher - alone) if teacher is not None and alone is not None else None

    def recovered(self, method: Optional[float], alone: Optional[float], gap: Optional[float]) -> Optional[float]:
        """The fraction of the gap a method closes: 0 no better than the student alone, 1 matches the teacher."""
        return self.sign * (method - alone) / gap if gap and method is not None and alone is not None else None

    @property
    def rule(self) -> str:
        """The gap-recovered rule in this figure's direction, spelled out when lower is better (the surprising one)."""
        if self.higher_is_better:
            return ""
        s = self.short
        return (f"{self.plural.capitalize()}: gap = student-alone {s} - teacher {s}; "
                f"recovered = (student-alone {s} - method {s}) / gap.")


class Task:
    """The base: no extra state; subclasses fill in the loss, validation and test."""

    #: name of the task loss in the logs and metrics (``ce`` for classifiers)
    loss_name = "loss"
    #: the quality figure of this task's models (set by every registered task)
    metric: TaskMetric

    def __init__(self, cfg, method: str, teacher, plans: List[SitePlan], blocks: Dict[str, nn.Module]):
        self.cfg, self.method, self.teacher, self.plans, self.blocks = cfg, method, teacher, plans, blocks
        self.taps: Optional[FeatureTaps] = None  # FitNet/AT: student and teacher tensors at the sites
        self.regressors: Optional[nn.ModuleList] = None  # FitNet: one per tapped site, training only

    def attach(self, model: nn.Module) -> None:
        """Called once with the (unwrapped) model before training."""
        self._attach_taps(model)

    def _attach_taps(self, model: nn.Module) -> None:
        """Methods that read plain tensors at the sites (``Method.needs_taps``): hook them, and for FitNet make
        its regressors on the model's device."""
        method = METHODS.get(self.method)
        if not method.needs_taps or self.teacher is None:
            return
        teacher = self.teacher.teacher
        plans = tap_plans(self.cfg, model, teacher)
        self.taps = FeatureTaps(model, teacher, plans)
        if "fitnet" in method.losses:
            param = next(model.parameters())
            self.regressors = make_regressors(plans, teacher_channels(teacher, plans, self.cfg.data.image_size))
            self.regressors.to(param.device).train()
            average_gradients(self.regressors)

    def trainable_modules(self) -> List[nn.Module]:
        """Modules besides the model that the optimizer trains (FitNet's regressors); never exported."""
        return [self.regressors] if self.regressors is not None else []

    def batch_loss(self, net, x, y, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float], Dict[str, int]]:
        raise NotImplementedError

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step."""

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The network that is validated, tested, sampled and exported."""
        return model

    def extra_state(self) -> Dict[str, Any]:
        return {REGRESSOR_KEY: regressor_state(self.taps.plans, self.regressors)} if self.regressors is not None else {}

    def load_extra(self, ck: Dict[str, Any]) -> None:
        """Restore what ``extra_state`` saved (resume)."""
        if self.regressors is not None:
            load_regressors(self.regressors, self.taps.plans, ck.get(REGRESSOR_KEY), "the checkpoint to resume")

    def validate(self, model: nn.Module, dataset: Dataset, device) -> Tuple[Dict[str, float], float]:
        """Validation figures for the metrics and the score that picks the best epoch (higher is better)."""
        raise NotImplementedError

    def test(self, model: nn.Module, dataset: Dataset, device) -> Dict[str, Any]:
        raise NotImplementedError

    def distill(self, task_loss, student_out, teacher_out, t_feats) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``w_ce * task loss + w_dist * D`` (``train.losses``; just the task loss without a teacher)."""
        cfg = self.cfg
        method = METHODS.get(self.method)
        s_feats, plans = {k: b.last for k, b in self.blocks.items()}, self.plans
        regressors: Dict[str, nn.Module] = {}
        if self.taps is not None:
            s_feats, t_feats, plans = self.taps.student, {**t_feats, **self.taps.teacher}, self.taps.plans
            if self.regressors is not None:
                regressors = {p.key: r for p, r in zip(plans, self.regressors)}
        weights = {n: getattr(cfg.loss, DISTILL_LOSSES.get(n).weight_key) for n in method.losses
                   if DISTILL_LOSSES.get(n).weight_key}
        inputs = LossInputs(student_out, teacher_out, s_feats, t_feats, plans, cfg.red.distance,
                            getattr(cfg.loss, method.temperature_key), weights, regressors, cfg.loss.at_p)
        loss, parts = total_loss(self.method, task_loss, inputs, cfg.loss.w_ce, cfg.loss.w_dist)
        parts[self.loss_name] = parts.pop("ce")
        return loss, parts

    def run_tapped(self, fn):
        """``fn()`` (the teacher and student forward passes) with the feature taps recording, if any."""
        if self.taps is None:
            return fn()
        self.taps.clear()
        self.taps.on = True
        try:
            return fn()
        finally:
            self.taps.on = False


def task_metrics() -> Dict[str, TaskMetric]:
    """Every registered task's quality figure, by task name; the default task (classifiers) first."""
    names = sorted(TASKS, key=lambda n: (n != DEFAULT_TASK, n))
    return {n: TASKS.get(n).metric for n in names}


def metric_of(task: Optional[str]) -> TaskMetric:
    """The quality figure of ``task``'s models; a task this code does not know is read as the default task."""
    return TASKS.get(task if task in TASKS else DEFAULT_TASK).metric


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> Dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on ``dataset``."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return {"top1": 100.0 * correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


@TASKS.register("classify")
class ClassifyTask(Task):
    """Cross-entropy (with CutMix/MixUp when configured); the best epoch has the best validation top-1."""

    loss_name = "ce"
    metric = TaskMetric(
        key="top1", summary_key="test_top1", higher_is_better=True, fmt=".2f", title="top-1", column="top-1 (%)",
        short="top-1", gap_unit="points", noun="accuracy", plural="classifiers",
        intro="accuracy in % test top-1 (mean ± sample std [min-max] over seeds)", label_suffix="",
        onnx=OnnxFigures("accuracy", "fp32_top1", "int8_top1", "top1", "top-1"),
        plot_file="accuracy_vs_peak_memory.png", plot_title="Accuracy vs theoretical peak activation memory (FP32, batch 1)",
        plot_ylabel="test top-1 (%), mean ± std over seeds", plot_what="a test accuracy")

    def __init__(self, cfg, method, teacher, plans, blocks, num_classes: int = 0):
        super().__init__(cfg, method, teacher, plans, blocks)
        self.mixer = _batch_mixer(cfg, num_classes)

    def batch_loss(self, net, x, y, generator):
        hard = y
        if self.mixer is not None:
            # as the paper's code (base/utils/datasets.py): the teacher and every loss see the mixed images, CE the
            # mixed labels
            x, y = self.mixer(x, y)

        def forward():
            t_logits, t_feats = self.teacher(x) if self.teacher is not None else (None, {})
            return t_logits, t_feats, net(x)

        t_logits, t_feats, logits = self.run_tapped(forward)
        ce = F.cross_entropy(logits, y, label_smoothing=self.cfg.loss.label_smoothing)
        loss, parts = self.distill(ce, logits, t_logits, t_feats)
        if self.taps is not None:
            self.taps.clear()
        return loss, parts, {"correct": int((logits.argmax(1) == hard).sum())}

    def validate(self, model, dataset, device):
        v = evaluate(model, dataset, self.cfg.data.eval_batch_size, device)
        return {"val_top1": round(v["top1"], 3), "val_loss": round(v["loss"], 5)}, v["top1"]

    def test(self, model, dataset, device):
        r = evaluate(model, dataset, self.cfg.data.eval_batch_size, device)
        return {"test_top1": round(r["top1"], 3), "test_loss": round(r["loss"], 5), "test_images": r["n"]}


def _batch_mixer(cfg, num_classes: int):
    from torchvision.transforms import v2

    ops = []
    if cfg.data.cutmix > 0:
        ops.append(v2.CutMix(alpha=cfg.data.cutmix, num_classes=num_classes))
    if cfg.data.mixup > 0:
        ops.append(v2.MixUp(alpha=cfg.data.mixup, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


@TASKS.register("denoise")
class DenoiseTask(Task):
    """The DDPM loss at uniform random time steps, the teacher run on the same ``(x_t, t)``; EMA weights.

    The best epoch has the lowest denoising loss of the EMA weights on the validation split, at noise and
    time steps fixed by ``diffusion.eval_seed`` so that epochs are compared on identical inputs.
    """

    loss_name = "diffusion"
    metric = TaskMetric(
        key="diffusion_loss", summary_key="test_diffusion_loss", higher_is_better=False, fmt=".4f",
        title="denoising loss", column="test denoising loss (lower is better)", short="loss", gap_unit="loss",
        noun="denoising MSE", plural="denoisers",
        intro="denoisers: test denoising loss, the mean squared error of the predicted noise (lower is better)",
        label_suffix="denoiser", onnx=OnnxFigures("denoising", "fp32_onnx_mse", "int8_onnx_mse", "mse", "MSE"),
        plot_file="denoising_loss_vs_peak_memory.png",
        plot_title="Denoising loss vs theoretical peak activation memory (one denoising step, FP32, batch 1)",
        plot_ylabel="test denoising loss (lower is better), mean ± std over seeds", plot_what="a test denoising loss",
        models_heading="Denoisers (one denoising step: inputs x and t):", runs_heading="Denoiser runs:", generative=True)

    def __init__(self, cfg, method, teacher, plans, blocks, num_classes: int = 0):
        super().__init__(cfg, method, teacher, plans, blocks)
        d = cfg.diffusion
        self.diffusion = Diffusion.make(d.schedule, d.timesteps, d.beta_start, d.beta_end)
        self.conditional = d.conditional
        self.ema: Optional[nn.Module] = None
        self.updates = 0

    def attach(self, model):
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)

    def batch_loss(self, net, x, y, generator):
        d = self.cfg.diffusion
        labels = y if self.conditional else None
        loss_d, xt, t, labels = self.diffusion.loss(net, x, labels, generator=generator, p_uncond=d.p_uncond)
        t_feats: Dict[str, torch.Tensor] = {}
        if self.teacher is not None and self.plans:
            inputs = (xt, t.float()) + ((labels,) if labels is not None else ())
            _, t_feats = self.teacher(*inputs)
        loss, parts = self.distill(loss_d, None, None, t_feats)
        return loss, parts, {}

    @torch.no_grad()
    def after_step(self, model):
        self.updates += 1
        decay = min(self.cfg.diffusion.ema_decay, (1 + self.updates) / (10 + self.updates))
        src = model.module if hasattr(model, "module") else model
        for e, p in zip(self.ema.state_dict().values(), src.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(p.detach(), alpha=1 - decay)
            else:
                e.copy_(p)

    def eval_model(self, model):
        return self.ema

    def extra_state(self):
        d = self.cfg.diffusion
        return {"ema": self.ema.state_dict(), "ema_updates": self.updates,
                "diffusion": {"schedule": d.schedule, "timesteps": d.timesteps, "beta_start": d.beta_start,
                              "beta_end": d.beta_end}}

    def load_extra(self, ck):
        self.ema.load_state_dict(ck["ema"])
        self.updates = int(ck.get("ema_updates", 0))

    def _fixed_loss(self, model, dataset, device) -> Dict[str, float]:
        return denoising_loss(model, self.diffusion, dataset, self.cfg.data.eval_batch_size, device,
                              self.cfg.diffusion.eval_seed, self.conditional)

    def validate(self, model, dataset, device):
        v = self._fixed_loss(model, dataset, device)
        return {"val_diffusion_loss": round(v["loss"], 6)}, -v["loss"]

    def test(self, model, dataset, device):
        r = self._fixed_loss(model, dataset, device)
        return {"test_diffusion_loss": round(r["loss"], 6), "test_images": r["n"]}


@torch.no_grad()
def denoising_loss(model: nn.Module, diffusion, dataset: Dataset, batch_size: int, device, seed: int,
                   conditional: bool = False) -> Dict[str, float]:
    """Mean epsilon MSE over ``dataset`` with time steps and noise drawn from ``seed`` (the same for every model)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        t = torch.randint(0, diffusion.T, (len(x),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        x, t, noise = x.to(device), t.to(device), noise.to(device)
        xt = diffusion.q_sample(x, t, noise)
        eps = model(xt, t.float(), y.to(device)) if conditional else model(xt, t.float())
        total += float(F.mse_loss(eps, noise, reduction="sum")) / noise[0].numel()
        n += len(x)
    return {"loss": total / max(n, 1), "n": n}

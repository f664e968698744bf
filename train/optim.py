"""Optimizers and learning-rate schedules by name (``optim.name``, ``optim.schedule``).

Adding one is one decorated function; config validation and the trainer read these registries.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List

import torch
from torch import nn

from redistill.registry import Registry

#: ``fn(param_groups, OptimConfig) -> optimizer``
OPTIMIZERS: Registry[Callable[[List[dict], Any], torch.optim.Optimizer]] = Registry("optimizer")
#: ``fn(OptimConfig, fraction of the run) -> learning rate`` (after warm-up)
LR_SCHEDULES: Registry[Callable[[Any, float], float]] = Registry("learning-rate schedule")


@OPTIMIZERS.register("sgd")
def _sgd(groups, o):
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


@OPTIMIZERS.register("adam")
def _adam(groups, o):
    return torch.optim.Adam(groups, lr=o.lr)


@LR_SCHEDULES.register("cosine")
def _cosine(o, frac: float) -> float:
    """Cosine decay from ``lr`` to 0 over the run."""
    return 0.5 * o.lr * (1 + math.cos(math.pi * min(frac, 1.0)))


@LR_SCHEDULES.register("step")
def _step(o, frac: float) -> float:
    """``lr * gamma`` at each milestone (fractions of the run)."""
    return o.lr * o.gamma ** sum(frac >= m for m in o.milestones)


def make_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``optim.name`` over the model's trainable parameters; weight decay on conv/linear weights only."""
    o = cfg.optim
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS.get(o.name)(groups, o)


def lr_at(cfg, progress: float, epochs: int) -> float:
    """Learning rate at ``progress`` epochs into training (stateless, so resume needs no scheduler state)."""
    o = cfg.optim
    if o.warmup_epochs > 0 and progress < o.warmup_epochs:
        return o.lr * (progress + 1e-3) / o.warmup_epochs
    return LR_SCHEDULES.get(o.schedule)(o, progress / epochs)

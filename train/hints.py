"""Feature taps for FitNet and attention transfer: the student and teacher tensors at the RED sites, by hooks.

The sites are the RED ones (``red.sites`` or ``auto``: student layer and side, teacher layer and side of equal
H x W, planned by ``train.red.plan_sites``), but the student gets no RED blocks: forward hooks read its
tensors where the blocks would sit. FitNet's regressors (one per site, student channels -> teacher channels)
are training-only modules held by the task: they train with the student, are saved in the checkpoint's
``fitnet_regressors`` entry for resume, and are never part of the exported student.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Dict, List, Optional

import torch
from torch import nn

from redistill.errors import UserError
from train.red import SitePlan, plan_sites, probe_shapes

#: the checkpoint entry that holds FitNet's regressors (beside the student's weights, never inside them)
REGRESSOR_KEY = "fitnet_regressors"


class ConvReg(nn.Module):
    """FitNet's regressor at a site of equal H x W: 1x1 conv (with bias) + BatchNorm + ReLU, student C -> teacher C.

    pipeline_classification/stl10/models/util.py ConvReg as train_distill.py builds it (``use_relu=True``); at
    equal H x W its branch ``s_H >= t_H`` gives the kernel ``1 + s_H - t_H = 1``.
    """

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(s_channels, t_channels, kernel_size=1)
        self.bn = nn.BatchNorm2d(t_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def tap_plans(cfg, student: nn.Module, teacher: nn.Module) -> List[SitePlan]:
    """The configured sites planned on ``student`` and ``teacher`` (equal H x W checked, one line on a mismatch)."""
    return plan_sites(student, teacher, [asdict(s) for s in cfg.red.sites], cfg.data.image_size,
                      cfg.red.alpha)


def teacher_channels(teacher: nn.Module, plans: List[SitePlan], image_size: int) -> Dict[str, int]:
    """The channel count of each site's teacher tensor."""
    shapes = probe_shapes(teacher, [p.teacher for p in plans], image_size)
    return {p.key: shapes[p.teacher][0 if p.teacher_where == "in" else 1][1] for p in plans}


class FeatureTaps:
    """Forward hooks that keep the student's and the teacher's tensor at each site while ``on``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, plans: List[SitePlan]):
        self.plans = plans
        self.student: Dict[str, torch.Tensor] = {}
        self.teacher: Dict[str, torch.Tensor] = {}
        self.on = False
        self.handles = []
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        for p in plans:
            self.handles.append(s_mods[p.student].register_forward_hook(self._hook("student", p.key, p.where)))
            self.handles.append(t_mods[p.teacher].register_forward_hook(self._hook("teacher", p.key, p.teacher_where)))

    def _hook(self, side: str, key: str, where: str):
        def hook(mod, inp, out):
            if self.on:
                getattr(self, side)[key] = inp[0] if where == "in" else out
        return hook

    def clear(self) -> None:
        self.student, self.teacher = {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def make_regressors(plans: List[SitePlan], t_channels: Dict[str, int]) -> nn.ModuleList:
    """One ``ConvReg`` per site, in plan order."""
    return nn.ModuleList(ConvReg(p.channels, t_channels[p.key]) for p in plans)


def regressor_state(plans: List[SitePlan], regs: nn.ModuleList) -> Dict[str, object]:
    """What the checkpoint keeps of the regressors: their sites and weights."""
    return {"sites": [p.key for p in plans], "state": regs.state_dict()}


def load_regressors(regs: nn.ModuleList, plans: List[SitePlan], saved: Optional[dict], source: str) -> None:
    """Restore regressors saved by ``regressor_state`` (resume); a checkpoint of other sites is one line."""
    if saved is None:
        raise UserError(f"{source} holds no FitNet regressors: it was not written by a FitNet run; "
                        "resume with the method it was trained with, or start a new run with name=NEW")
    keys = [p.key for p in plans]
    if list(saved["sites"]) != keys:
        raise UserError(f"{source} has FitNet regressors for sites {saved['sites']}, this run has {keys}: "
                        "resume with the saved config or start a new run with name=NEW")
    regs.load_state_dict(saved["state"])


def average_gradients(modules: nn.Module) -> None:
    """Under torchrun, average the gradients of modules outside DistributedDataParallel (hooks on each parameter)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    world = dist.get_world_size()

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    for prm in modules.parameters():
        prm.register_hook(hook)

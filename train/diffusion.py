"""The DDPM forward process: noise schedule, ``q(x_t | x_0)`` and the epsilon-prediction loss.

Images are in [-1, 1]. Schedules are a registry: adding one is one decorated
function returning the betas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from redistill.registry import Registry

SCHEDULES: Registry = Registry("noise schedule")


@SCHEDULES.register("linear")
def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's schedule: betas linear from ``beta_start`` to ``beta_end`` (1e-4..0.02 over T=1000)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


@SCHEDULES.register("cosine")
def cosine_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (``beta_start``/``beta_end`` unused), betas clipped at 0.999."""
    s = 0.008
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


@dataclass
class Diffusion:
    """A noise schedule of ``T`` steps and what training and sampling read from it (float64 on CPU)."""

    betas: torch.Tensor

    def __post_init__(self):
        self.T = len(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def make(cls, schedule: str = "linear", timesteps: int = 1000, beta_start: float = 1e-4,
             beta_end: float = 0.02) -> "Diffusion":
        return cls(SCHEDULES.get(schedule)(timesteps, beta_start, beta_end))

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t.long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def loss(self, model, x0: torch.Tensor, y: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, p_uncond: float = 0.0):
        """The DDPM ("simple") loss ``|eps - eps_theta(x_t, t)|^2`` at uniform random t.

        Returns ``(loss, x_t, t, y)`` so that a frozen teacher can be run on the very same inputs.
        With ``p_uncond > 0`` that fraction of labels becomes the "no label" token (classifier-free guidance).
        """
        b = x0.shape[0]
        t = torch.randint(0, self.T, (b,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        xt = self.q_sample(x0, t, noise)
        if y is not None and p_uncond > 0:
            drop = torch.rand(b, generator=generator).to(x0.device) < p_uncond
            y = torch.where(drop, torch.full_like(y, null_label(model)), y)
        eps = model(xt, t.float(), y) if y is not None else model(xt, t.float())
        return F.mse_loss(eps, noise), xt, t, y


def null_label(model) -> int:
    """The "no label" token of a conditional denoiser (classifier-free guidance): its ``num_classes``."""
    m = model.module if hasattr(model, "module") else model
    return int(getattr(m, "num_classes", 0))

"""Sampling from a DDPM denoiser: DDPM ancestral and DDIM samplers, classifier-free guidance, image grids.

Samplers are a registry (``SAMPLERS``): adding one is one decorated function
``fn(model, diffusion, x, y, noise, opts) -> x0`` that denoises a batch.

Every sample draws its noise from its own ``torch.Generator`` seeded from
``(seed, index of the sample)``, on the CPU, so a sample depends only on the seed
and its index: the same seed gives the same noise whatever the batch size or
device (the network's own arithmetic may still round differently across batch
sizes or devices), and the same seed with the same batch size on the same
machine is bit-identical.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from redistill.errors import UserError
from redistill.io import atomic_write
from redistill.registry import Registry
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.diffusion import Diffusion, null_label

SAMPLERS: Registry = Registry("sampler")

#: DDPM's two fixed reverse-process variances: ``fixedlarge`` (beta_t, DDPM's CIFAR-10 choice, with
#: the first step's set to the posterior variance) and ``fixedsmall`` (the posterior variance beta-tilde).
VARIANCES = ("fixedlarge", "fixedsmall")


@dataclass
class SampleOptions:
    """What a sampler reads besides the model and schedule."""

    steps: int = 50  # DDIM: number of evenly spaced time steps (DDPM always takes all T)
    eta: float = 0.0  # DDIM: 0 = deterministic, 1 = DDPM-like noise
    guidance: float = 0.0  # classifier-free guidance weight w: eps = (1 + w) eps_cond - w eps_uncond
    clip_denoised: bool = True  # clip each x0 prediction to [-1, 1]
    variance: str = "fixedlarge"  # DDPM: fixedlarge (beta) | fixedsmall (beta-tilde)
    progress: Optional[Callable[[int], None]] = None  # called with 1 after every network step


class NoiseSource:
    """Per-sample CPU generators: ``next(shape)`` draws one [B, *shape] tensor, row i from sample i's stream."""

    def __init__(self, seed: int, indices: Sequence[int]):
        self.gens = [torch.Generator().manual_seed(_sample_seed(seed, i)) for i in indices]

    def next(self, shape: Tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.gens])


def _sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed from (seed, index) (splitmix64), so neighbouring streams are unrelated."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def predict_eps(model: nn.Module, x: torch.Tensor, t: int, y: Optional[torch.Tensor], guidance: float) -> torch.Tensor:
    """The network's epsilon at integer step ``t``; with labels and ``guidance`` w != 0, the guided mix."""
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    if y is None:
        return model(x, tt)
    if guidance == 0:
        return model(x, tt, y)
    null = torch.full_like(y, null_label(model))
    e = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))
    cond, uncond = e.chunk(2)
    return (1 + guidance) * cond - guidance * uncond


def _x0_from_eps(x: torch.Tensor, eps: torch.Tensor, ab: float) -> torch.Tensor:
    return (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5


@SAMPLERS.register("ddpm")
def ddpm_sample(model: nn.Module, diffusion: Diffusion, x: torch.Tensor, y: Optional[torch.Tensor],
                noise: NoiseSource, opts: SampleOptions) -> torch.Tensor:
    """Ho et al.'s ancestral sampler over all T steps, x_{t-1} ~ N(posterior mean from x0_hat, fixed variance)."""
    if opts.variance not in VARIANCES:
        raise UserError(f"unknown DDPM variance {opts.variance!r}: use one of {', '.join(VARIANCES)}")
    betas, ab = diffusion.betas, diffusion.alphas_cumprod  # float64
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    var = post_var if opts.variance == "fixedsmall" else torch.cat([post_var[1:2], betas[1:]])
    coef_x0 = betas * ab_prev.sqrt() / (1 - ab)
    coef_xt = (1 - ab_prev) * diffusion.alphas.sqrt() / (1 - ab)
    for t in reversed(range(diffusion.T)):
        eps = predict_eps(model, x, t, y, opts.guidance)
        x0 = _x0_from_eps(x, eps, float(ab[t]))
        if opts.clip_denoised:
            x0 = x0.clamp(-1, 1)
        x = float(coef_x0[t]) * x0 + float(coef_xt[t]) * x
        if t > 0:
            x = x + float(var[t]) ** 0.5 * noise.next(tuple(x.shape[1:])).to(x.device, x.dtype)
        if opts.progress:
            opts.progress(1)
    return x


def ddim_timesteps(T: int, steps: int) -> List[int]:
    """``steps`` time steps evenly spaced over [0, T-1], both ends included, descending."""
    if not 1 <= steps <= T:
        raise UserError(f"--steps {steps} is out of range: DDIM takes 1 to {T} (the schedule's T) steps")
    ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().unique().tolist()
    return sorted(ts, reverse=True)


@SAMPLERS.register("ddim")
def ddim_sample(model: nn.Module, diffusion: Diffusion, x: torch.Tensor, y: Optional[torch.Tensor],
                noise: NoiseSource, opts: SampleOptions) -> torch.Tensor:
    """Song et al.'s DDIM over ``opts.steps`` evenly spaced steps; ``eta`` scales the added noise (0 = deterministic)."""
    ab = diffusion.alphas_cumprod
    ts = ddim_timesteps(diffusion.T, opts.steps)
    for i, t in enumerate(ts):
        a_t = float(ab[t])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = predict_eps(model, x, t, y, opts.guidance)
        x0 = _x0_from_eps(x, eps, a_t)
        if opts.clip_denoised:
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5  # the epsilon that agrees with the clipped x0
        sigma = opts.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * noise.next(tuple(x.shape[1:])).to(x.device, x.dtype)
        if opts.progress:
            opts.progress(1)
    return x


def resolve_labels(model: nn.Module, n: int, labels, guidance: float = 0.0) -> Optional[torch.Tensor]:
    """The [n] label tensor a sampler conditions on (None for an unconditional model), checking the input."""
    nc = null_label(model)
    if nc == 0:
        if labels is not None:
            raise UserError("this denoiser is unconditional (num_classes=0): drop --label")
        if guidance:
            raise UserError("classifier-free guidance needs a class-conditional denoiser; use --guidance 0")
        return None
    if labels is None:
        return torch.arange(n) % nc  # every class in turn, so a grid shows them all
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if y.numel() == 1:
        y = y.expand(n).clone()
    if y.numel() != n:
        raise UserError(f"{y.numel()} labels for {n} samples: give one label or one per sample")
    if bool(((y < 0) | (y > nc)).any()):
        raise UserError(f"labels must be 0..{nc - 1} (or {nc}, the 'no label' token), got {sorted(set(y.tolist()))}")
    return y


def sample(model: nn.Module, diffusion: Diffusion, n: int, sampler: str = "ddim", *, steps: int = 50,
           eta: float = 0.0, guidance: float = 0.0, labels: Union[None, int, Sequence[int], torch.Tensor] = None,
           clip_denoised: bool = True, variance: str = "fixedlarge", seed: int = 0, batch_size: int = 64,
           image_size: Optional[int] = None, device: Union[str, torch.device, None] = None,
           progress: Optional[bool] = None) -> torch.Tensor:
    """Draw ``n`` images in [-1, 1] (float32, CPU, [n, C, H, W]) with sampler ``ddim`` or ``ddpm``.

    ``labels``: one class for all, one per sample, or None (cycle over classes) for a conditional model.
    """
    fn = SAMPLERS.get(sampler)
    if n < 1 or batch_size < 1:
        raise UserError(f"need n >= 1 and batch size >= 1, got n={n}, batch={batch_size}")
    m = model.module if hasattr(model, "module") else model
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if image_size is None:
        image_size = int(getattr(m, "image_size", 32))
    in_ch = int(getattr(m, "in_ch", 3))
    y_all = resolve_labels(model, n, labels, guidance)
    opts = SampleOptions(steps=steps, eta=eta, guidance=guidance, clip_denoised=clip_denoised, variance=variance)
    per_batch = len(ddim_timesteps(diffusion.T, steps)) if sampler == "ddim" else diffusion.T if sampler == "ddpm" else steps
    bar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=per_batch * -(-n // batch_size), desc=f"{sampler} sampling", unit="step", file=sys.stderr)
        opts.progress = bar.update
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = list(range(start, min(n, start + batch_size)))
                src = NoiseSource(seed, idx)
                x = src.next((in_ch, image_size, image_size)).to(device)
                y = y_all[idx].to(device) if y_all is not None else None
                x0 = fn(model, diffusion, x, y, src, opts)
                out.append(x0.float().clamp(-1, 1).cpu())
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return torch.cat(out)


def load_denoiser(source: Union[str, Dict[str, Any]], device: Union[str, torch.device] = "cpu",
                  weights: str = "auto") -> Tuple[nn.Module, Diffusion, Dict[str, Any]]:
    """``(model, diffusion, checkpoint)`` from a denoiser checkpoint path or dict (EMA weights by default)."""
    ck = load_checkpoint(source) if not isinstance(source, dict) else source
    name = source if not isinstance(source, dict) else "the checkpoint"
    if ck.get("task", "classify") != "denoise":
        raise UserError(f"{name} is a classifier ({ck.get('arch')}); sample needs a denoiser checkpoint written by "
                        "redistill distill with a unet teacher/student")
    if not isinstance(ck.get("diffusion"), dict):
        raise UserError(f"{name} has no noise schedule ('diffusion'); re-train it with this redistill")
    model = model_from_checkpoint(ck, weights=weights).to(device)
    model.image_size = int(ck["image_size"])
    return model, Diffusion.make(**ck["diffusion"]), ck


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C] (the samples.npz layout)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images) -> torch.Tensor:
    """uint8 [N, H, W, C] (array or tensor) -> float [N, C, H, W] in [-1, 1]."""
    t = torch.as_tensor(images)
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1)


def save_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2) -> None:
    """Write images in [-1, 1] ([N, C, H, W]) as one PNG grid with ``nrow`` images a row, atomically."""
    from PIL import Image
    from torchvision.utils import make_grid


    grid = make_grid(images.detach().float().cpu().clamp(-1, 1).add(1).div(2), nrow=nrow, padding=padding)
    img = Image.fromarray(grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    atomic_write(path, lambda f: img.save(f, format="PNG"))

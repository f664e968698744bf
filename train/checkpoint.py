"""Checkpoints that carry everything export needs: weights, architecture, RED sites, classes, normalisation."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from redistill.errors import UserError
from redistill.io import atomic_torch_save
from train.models import build_model, model_kwargs, task_of
from train.red import SitePlan, insert_red_blocks

FORMAT = "redistill-checkpoint"
VERSION = 1
#: what every reader of a checkpoint (evaluate, export, resume, memory) takes from it
REQUIRED = ("arch", "role", "method", "num_classes", "image_size", "classes", "mean", "std", "red", "model")


def make_payload(
    model: nn.Module, *, arch: str, role: str, method: str, num_classes: int, image_size: int,
    classes: List[str], mean, std, width_mult: float, plans: List[SitePlan], red_distance: str,
    config: Dict[str, Any], epoch: int, history: List[dict], best_val: float,
    optimizer: Optional[dict] = None, build_kwargs: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A checkpoint dict made only of tensors and plain Python values (loadable with weights_only=True).

    ``build_kwargs`` are the builder options beyond the name (a U-Net's width, levels, ...); ``extra``
    holds what one task adds (a denoiser's EMA weights and noise schedule).
    """
    module = model.module if hasattr(model, "module") else model
    return {
        "format": FORMAT, "version": VERSION,
        "arch": arch, "role": role, "method": method, "task": task_of(arch),
        "build_kwargs": dict(build_kwargs if build_kwargs is not None else model_kwargs(arch, width_mult)),
        "num_classes": num_classes, "image_size": image_size, "width_mult": width_mult,
        "classes": list(classes), "mean": [float(x) for x in mean], "std": [float(x) for x in std],
        "red": {"distance": red_distance, "sites": [dict(asdict(p), hw=list(p.hw)) for p in plans]},
        "model": module.state_dict(),
        "optimizer": optimizer, "epoch": epoch, "history": history, "best_val": best_val,
        "config": config, "torch_version": str(torch.__version__),
        **(extra or {}),
    }


def save_checkpoint(payload: Dict[str, Any], path) -> Path:
    return atomic_torch_save(payload, path)


def load_checkpoint(path) -> Dict[str, Any]:
    """Load with ``weights_only=True``; a missing, corrupt or foreign file is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found: run `redistill distill` first or give the path to a .pt it wrote")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load of a file that is no checkpoint raises anything (`echo hi > x.pt`: KeyError)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = [ln for ln in lines if "Unsupported global" in ln or "error" in ln.lower()]
        msg = (why or lines or [""])[-1]
        if not why:  # a bare "101" says nothing without its exception's name
            msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
        raise UserError(f"checkpoint {p} is corrupt or not a PyTorch file ({msg[:160]}): give a best.pt or last.pt "
                        "written by `redistill distill`, or train again") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(
            f"{p} is not a ReDistill checkpoint (no format={FORMAT!r}; a bare state_dict or another tool's file?): "
            "use a best.pt or last.pt written by `redistill distill`"
        )
    if ck.get("version", 0) > VERSION:
        raise UserError(f"{p} has checkpoint version {ck['version']}, newer than this redistill ({VERSION}); upgrade redistill-edge")
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise UserError(f"{p} lacks {', '.join(missing)} (a damaged or hand-edited checkpoint?): use a best.pt or "
                        "last.pt written by `redistill distill`")
    return ck


def site_plans(ck: Dict[str, Any]) -> List[SitePlan]:
    return [SitePlan(**dict(s, hw=tuple(s["hw"]))) for s in ck["red"]["sites"]]


def model_from_checkpoint(ck: Dict[str, Any], weights: str = "auto") -> nn.Module:
    """Rebuild the network (with its RED blocks) from a checkpoint's metadata and load its weights.

    ``weights``: ``auto`` loads a denoiser's EMA weights (what is sampled and deployed) and any other
    network's trained weights; ``raw`` always loads the trained (non-EMA) weights.
    """
    kwargs = ck.get("build_kwargs")
    if kwargs is None:  # checkpoints written before build_kwargs existed
        kwargs = model_kwargs(ck["arch"], ck["width_mult"])
    model = build_model(ck["arch"], ck["num_classes"], ck["image_size"], **kwargs)
    insert_red_blocks(model, site_plans(ck))
    state = ck["model"]
    if weights == "auto" and ck.get("ema") is not None:
        state = ck["ema"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit {ck['arch']}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model

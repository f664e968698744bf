"""Networks built by name for analysis: a plain architecture, a preset's student with its RED blocks,
a checkpoint's network; and their theoretical peak memory through an analysis-only ONNX export.

The ONNX analysis itself is ``redistill.memory`` (no torch); this module is the torch side of it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from torch import nn

from redistill.errors import UserError
from redistill.memory import MemoryReport, analyze_onnx
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import AUTO_SITES, REDSiteConfig, RunConfig, build_kwargs, load_config, presets
from train.losses import METHODS
from train.models import build_model, example_inputs, input_names, output_names, task_of
from train.red import SitePlan, auto_sites, insert_red_blocks, plan_sites

#: training's largest image size (``train.config``); a design is sized at any size ``build_model`` takes
TRAIN_MAX_SIZE = 224


def build_student(cfg: RunConfig, num_classes: int, teacher: Optional[nn.Module]) -> Tuple[nn.Module, List[SitePlan]]:
    """The student network with RED blocks inserted when the method uses RED; returns (model, plans)."""
    model = build_model(cfg.student.arch, num_classes, cfg.data.image_size, **build_kwargs(cfg, cfg.student))
    plans: List[SitePlan] = []
    if METHODS.get(cfg.method).needs_sites:
        sites = [asdict(s) for s in cfg.red.sites]
        plans = plan_sites(model, teacher, sites, cfg.data.image_size, cfg.red.alpha)
        insert_red_blocks(model, plans)
    elif METHODS.get(cfg.method).needs_taps:  # FitNet/AT: no blocks; the sites are checked now, tapped in training
        plan_sites(model, teacher, [asdict(s) for s in cfg.red.sites], cfg.data.image_size, cfg.red.alpha)
    return model, plans


def export_for_analysis(model: nn.Module, image_size: int, path: Union[str, os.PathLike], batch: int = 1) -> Path:
    """Export a torch model to ONNX (legacy exporter, opset 13, BatchNorm folded) for analysis only.

    Inputs are the model's own (``train.models.example_inputs``): one image for a classifier, ``x, t[, y]``
    for a denoiser, named by ``input_names``/``output_names`` as in an exported bundle.
    """
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dummy = tuple(x.to(device) for x in example_inputs(model, image_size, batch=batch))
        model.eval()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, dummy, str(path), dynamo=False, opset_version=13, input_names=input_names(model),
                              output_names=output_names(model), do_constant_folding=True)
    finally:
        model.train(was_training)
    return Path(path)


def analyze_model(model: nn.Module, image_size: int, batch: int = 1, dtype: Optional[str] = None,
                  inplace: bool = False, name: Optional[str] = None) -> MemoryReport:
    """Export ``model`` to a temporary ONNX file and analyse it (no training or checkpoint needed)."""
    with tempfile.TemporaryDirectory(prefix="redistill-memory-") as tmp:
        path = export_for_analysis(model, image_size, Path(tmp) / "model.onnx")
        return analyze_onnx(path, batch=batch, dtype=dtype, inplace=inplace,
                            name=name or getattr(model, "arch_name", type(model).__name__))


def _default_classes(arch: str) -> int:
    return 0 if task_of(arch) == "denoise" else 10


def build_design(arch: str, image_size: int, red_config: Optional[str] = None, num_classes: Optional[int] = None,
                 **build_options) -> nn.Module:
    """The plain model ``arch``, or with ``red_config`` (a preset or YAML) that model with the config's RED blocks.

    ``num_classes`` defaults to 10 for a classifier and 0 (unconditional) for a denoiser; ``build_options``
    go to the builders of both networks (a U-Net's ``ch``, ``ch_mult``, ...) over the config's own.
    """
    if num_classes is None:
        num_classes = _default_classes(arch)
    if not red_config:
        return build_model(arch, num_classes, image_size, **build_options)
    cfg = design_config(red_config, image_size, [f"student.arch={arch}", "method=red"])
    if not cfg.red.sites:
        raise UserError(f"config {red_config!r} has no red.sites; give a config with RED sites (e.g. mobilenetv2_x4)")
    teacher = None
    if cfg.teacher.arch:
        teacher = build_model(cfg.teacher.arch, num_classes, image_size,
                              **{**build_kwargs(cfg, cfg.teacher), **build_options})
    model = build_model(arch, num_classes, image_size, **{**build_kwargs(cfg, cfg.student), **build_options})
    plans = plan_sites(model, teacher, [asdict(s) for s in cfg.red.sites], image_size, cfg.red.alpha)
    insert_red_blocks(model, plans)
    model.arch_name = f"{arch}+RED"
    return model


def design_config(source: str, image_size: int, overrides: Sequence[str] = ()) -> RunConfig:
    """``load_config`` at ``image_size`` for sizing a design, also past training's 224 px: such a config is
    validated at 224 px, then set to the real size, and ``red.sites: auto`` is placed again for it."""
    if image_size <= TRAIN_MAX_SIZE:
        return load_config(source, [*overrides, f"data.image_size={image_size}"])
    cfg = load_config(source, [*overrides, f"data.image_size={TRAIN_MAX_SIZE}"])
    cfg.data.image_size = image_size
    path = Path(source) if Path(source).is_file() else presets()[source]
    raw = yaml.safe_load(path.read_text()) or {}
    if isinstance(raw.get("red"), dict) and raw["red"].get("sites") == AUTO_SITES and cfg.red.sites:
        cfg.red.sites = [REDSiteConfig(**s) for s in auto_sites(cfg.student.arch, cfg.teacher.arch, image_size)]
    return cfg


def checkpoint_design(path: Union[str, os.PathLike]) -> Tuple[nn.Module, int]:
    """(model, image size) rebuilt from a checkpoint: its architecture, builder options and RED blocks."""
    ck = load_checkpoint(path)
    model = model_from_checkpoint(ck)
    model.arch_name = ck["arch"] + ("+RED" if ck["red"]["sites"] else "")
    return model, ck["image_size"]


def pair_designs(preset: str, image_size: int, num_classes: Optional[int] = None):
    """[(label, model)] for a preset's teacher, student and student+RED (built with the preset's builder options)."""
    cfg = design_config(preset, image_size)
    if num_classes is None:
        num_classes = _default_classes(cfg.student.arch)
    teacher = build_model(cfg.teacher.arch, num_classes, image_size, **build_kwargs(cfg, cfg.teacher))
    student = build_model(cfg.student.arch, num_classes, image_size, **build_kwargs(cfg, cfg.student))
    red = build_design(cfg.student.arch, image_size, preset, num_classes)
    return [("teacher", teacher), ("student", student), ("student+RED", red)], cfg


def theoretical_reduction(teacher: nn.Module, student_ckpt: Path, image_size: int) -> Dict[str, Any]:
    """Liveness peak activation memory (FP32, batch 1) of teacher and student, from ``redistill.memory``."""
    student = model_from_checkpoint(load_checkpoint(student_ckpt))
    t = analyze_model(teacher.cpu().eval(), image_size)
    s = analyze_model(student, image_size)
    return {"teacher_peak_bytes": t.peak_bytes, "student_peak_bytes": s.peak_bytes,
            "reduction": round(t.peak_bytes / s.peak_bytes, 2), "image_size": image_size,
            "definition": "liveness peak of the exported ONNX graph, FP32, batch 1 (redistill memory)"}

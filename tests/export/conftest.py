"""Tiny fixtures for the export tests: a 10-class image folder and a student trained for a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
REAL = REPO / "data" / "cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = {"train": 4, "test": 3}


def _make_folder(root: Path) -> Path:
    """Real CIFAR-10 JPEGs when data/cifar10 is unpacked, else random 32 px PNGs (same layout)."""
    from PIL import Image  # not torchvision.io: its encoders are deprecated since 0.29

    g = torch.Generator().manual_seed(0)
    for split, n in PER_CLASS.items():
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            src = REAL / split / c
            files = sorted(src.glob("*.jpg"))[:n] if src.is_dir() else []
            for i in range(n):
                if i < len(files):
                    shutil.copy(files[i], d / files[i].name)
                else:
                    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy()
                    Image.fromarray(pixels).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("images"))


def train_student(preset: str, root: Path, steps: int = 3, image_size: int = 32):
    """Build ``preset``'s student (RED blocks included) and take a few SGD steps; returns (cfg, model, plans)."""
    from train.config import load_config
    from train.design import build_student

    cfg = load_config(preset, [f"data.root={root}", f"data.image_size={image_size}", "name=fixture"])
    torch.manual_seed(0)
    model, plans = build_student(cfg, len(CLASSES), None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 3, image_size, image_size, generator=g)
        y = torch.randint(0, len(CLASSES), (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # non-trivial BatchNorm statistics, so that folding is actually exercised
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return cfg, model.eval(), plans


@pytest.fixture(scope="session")
def make_student():
    """``train_student`` as a fixture, so test modules need no import from this conftest."""
    return train_student


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, image_root) -> Path:
    from train.checkpoint import make_payload, save_checkpoint

    cfg, model, plans = train_student("quick", image_root)
    payload = make_payload(
        model, arch=cfg.student.arch, role="student", method=cfg.method, num_classes=len(CLASSES), image_size=32,
        classes=CLASSES, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), width_mult=cfg.student.width_mult,
        plans=plans, red_distance=cfg.red.distance, config=cfg.to_dict(), epoch=1, history=[], best_val=10.0,
    )
    return save_checkpoint(payload, tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, checkpoint):
    """One FP32 (tx2) and one INT8 (orin-int8) bundle of the fixture student (INT8: minmax on 16 images, no node in
    float, so the search only measures it on validation; tests/export/test_int8_pipeline.py runs the rest)."""
    from export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("bundles")
    fp32, _ = run_export(ExportOptions(str(checkpoint), out=str(out / "fp32"), verify_images=16, quiet=True))
    int8, _ = run_export(ExportOptions(str(checkpoint), out=str(out / "int8"), target="orin-int8", calib_method="minmax",
                                       calib_images=16, int8_max_float_nodes=0, int8_refine_scales=False, verify_images=16, quiet=True))
    return fp32, int8


@pytest.fixture(scope="session")
def denoiser_checkpoint(tmp_path_factory, image_root) -> Path:
    """An unconditional tiny U-Net student (unet-2-221, ch 16) with a RED block on its head, as training saves it."""
    from tests.support.fixtures import tiny_denoiser_checkpoint

    return tiny_denoiser_checkpoint(tmp_path_factory.mktemp("ddpm") / "best.pt", image_root, CLASSES)


@pytest.fixture(scope="session")
def denoiser_bundle(tmp_path_factory, denoiser_checkpoint):
    """The FP32 tx2 bundle of ``denoiser_checkpoint``: (folder, manifest)."""
    from export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("ddpm-bundles") / "fp32"
    return run_export(ExportOptions(str(denoiser_checkpoint), out=str(out), verify_images=8, reference_images=4, quiet=True))

"""Shared fixtures: tiny generated image folders, so tests never need the real data set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Keep the 2-core machine responsive when several torch processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_imagefolder(root: Path, classes=("cat", "dog", "ship", "truck"), n_train=12, n_test=4, size=32, seed=0) -> Path:
    """Write root/{train,test}/<class>/NNNN.jpg: noisy images whose mean colour depends on the class."""
    import torch
    from PIL import Image  # not torchvision.io: its encoders and decoders are deprecated since 0.29

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            base = torch.tensor([(ci * 70) % 256, (ci * 130 + 60) % 256, (255 - ci * 50) % 256], dtype=torch.float32)
            for i in range(n):
                img = base.view(3, 1, 1) + 40 * torch.randn(3, size, size, generator=g)
                pixels = img.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(d / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: its networks are tiny, and on a shared 2-core machine more threads only contend."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable

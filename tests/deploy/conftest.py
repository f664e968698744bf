"""Shared fixtures for the deploy tests: tiny FP32/INT8 bundles and a two-server loopback sshd fleet."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT_PATH = REPO / "deploy" / "agent" / "agent.py"
VENV_PYTHON = str(Path(sys.executable))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """``{"fp32": path, "int8": path}``, written with export.bundle.write_bundle under one folder."""
    from deploy.fixtures import tiny_bundle

    root = tmp_path_factory.mktemp("bundles")
    return {"fp32": tiny_bundle(root / "tiny-fp32"), "int8": tiny_bundle(root / "tiny-int8", int8=True)}


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    """Two sshd instances on 127.0.0.1 (aliases loop0, loop1 in ``fleet.config``); killed at the end."""
    from deploy.loopback import LoopbackSshd, sshd_available

    why = sshd_available()
    if why:
        pytest.skip(f"no loopback sshd: {why} (.ci/run installs openssh-server/openssh-client/rsync)")
    with LoopbackSshd(tmp_path_factory.mktemp("sshd"), n=2) as s:
        yield s


@pytest.fixture
def agent():
    """A fresh import of the standalone agent file (it is not a package module on the device)."""
    spec = importlib.util.spec_from_file_location("redistill_agent_under_test", AGENT_PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def denoiser_bundle(tmp_path_factory, tiny_images):
    """A real FP32 bundle of a tiny U-Net denoiser (inputs x, t; output eps) written by `redistill export`."""
    from deploy.fixtures import tiny_denoiser_checkpoint
    from export.pipeline import ExportOptions, run_export

    root = tmp_path_factory.mktemp("ddpm")
    ck = tiny_denoiser_checkpoint(root / "best.pt", tiny_images, ["cat", "dog", "ship", "truck"])
    path, _ = run_export(ExportOptions(str(ck), out=str(root / "ddpm-fp32"), verify_images=4, reference_images=3,
                                       quiet=True))
    return path

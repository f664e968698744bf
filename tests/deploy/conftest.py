"""Shared fixtures for the deploy tests: tiny FP32/INT8 bundles, a two-server loopback sshd fleet, a denoiser bundle,
and the agent folder copied elsewhere (as on a device)."""

import pytest

from deploy.agent.contract import LOCK_ENV
from tests.support.agent import copy_agent


@pytest.fixture(autouse=True)
def own_measurement_lock(tmp_path, monkeypatch):
    """Agents these tests start directly take a lock of their own, not the machine's /tmp one another test run holds
    (agents reached over the loopback sshd get one per server from its SetEnv)."""
    monkeypatch.setenv(LOCK_ENV, str(tmp_path / "agent.lock"))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """``{"fp32": path, "int8": path}``, written with export.bundle.write_bundle under one folder."""
    from tests.support.fixtures import tiny_bundle

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
def agent_copy(tmp_path):
    """The agent folder copied under another name, as the deploy copies it to a device."""
    return copy_agent(tmp_path / "device" / "copied-agent")


@pytest.fixture(scope="session")
def denoiser_bundle(tmp_path_factory, tiny_images):
    """A real FP32 bundle of a tiny U-Net denoiser (inputs x, t; output eps) written by `redistill export`."""
    from export.pipeline import ExportOptions, run_export
    from tests.support.fixtures import tiny_denoiser_checkpoint

    root = tmp_path_factory.mktemp("ddpm")
    ck = tiny_denoiser_checkpoint(root / "best.pt", tiny_images, ["cat", "dog", "ship", "truck"])
    path, _ = run_export(ExportOptions(str(ck), out=str(root / "ddpm-fp32"), verify_images=4, reference_images=3,
                                       quiet=True))
    return path

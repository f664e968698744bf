"""Helpers for tests of the on-device agent: its folder copied elsewhere (as on a device), short options, and the
TensorRT/pycuda FAKES of tests/deploy/fake_tensorrt.py (they record calls; they do not verify TensorRT)."""

import importlib.util
import shutil
import sys
from pathlib import Path

from deploy.agent import fingerprint
from deploy.agent.cli import parse_args

AGENT_DIR = Path(fingerprint.AGENT_DIR)
FAKES = Path(__file__).resolve().parents[1] / "deploy" / "fake_tensorrt.py"


def copy_agent(dest: Path) -> Path:
    """Copy the agent's files (what the deployer sends) to ``dest``, outside the project."""
    for rel in fingerprint.agent_files(str(AGENT_DIR)):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(AGENT_DIR / rel, dest / rel)
    return dest


def agent_args(bundle, cache, *extra):
    """The agent's parsed options for a short in-process run of ``bundle``."""
    return parse_args(["--bundle", str(bundle), "--cache-dir", str(cache), "--iters", "5", "--warmup", "1",
                       "--mem-iters", "2", *extra])


def load_fakes():
    spec = importlib.util.spec_from_file_location("fake_tensorrt", FAKES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def install_fake_trt(monkeypatch, version, **kw):
    """Put FAKE ``tensorrt`` (API surface of ``version``) and ``pycuda`` modules in sys.modules; returns the call log."""
    fakes = load_fakes()
    calls = []
    pkg, driver, memory = fakes.make_fake_pycuda(calls)
    trt = fakes.make_fake_tensorrt(version, calls, memory, **kw)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return calls

"""The agent's hash: the server (deploy.deployer) and the agent (run from a copied folder) compute the same one,
over every agent file, and it changes when any of them changes."""

import subprocess
import sys

import pytest

from deploy import deployer
from deploy.agent import fingerprint
from tests.support.agent import AGENT_DIR, copy_agent


def hash_by_the_copied_agent(folder):
    """The hash as the agent computes it on a device: its own fingerprint module, loaded from the copied folder."""
    code = ("import runpy, sys; main = runpy.run_path(%r); pkg = main['load_package'](%r); "
            "import importlib; print(importlib.import_module('redistill_agent.fingerprint').agent_sha256())"
            % (str(folder / "__main__.py"), str(folder)))
    return subprocess.run([sys.executable, "-I", "-c", code], stdout=subprocess.PIPE, text=True, check=True,
                          cwd=str(folder.parent)).stdout.strip()


def test_server_and_copied_agent_agree(tmp_path):
    copy = copy_agent(tmp_path / "elsewhere" / "agent")
    server = deployer.agent_sha256()
    assert server == fingerprint.agent_sha256(str(AGENT_DIR)) == hash_by_the_copied_agent(copy)
    assert set(deployer.agent_files()) == set(fingerprint.agent_files(str(copy)))
    assert {"__main__.py", "contract.py", "fingerprint.py", "backends/registry.py", "backends/trt.py"} <= \
        set(deployer.agent_files())


@pytest.mark.parametrize("rel", fingerprint.agent_files())
def test_any_changed_agent_file_changes_the_hash(tmp_path, rel):
    copy = copy_agent(tmp_path / "agent")
    before = fingerprint.agent_sha256(str(copy))
    path = copy / rel
    path.write_bytes(path.read_bytes() + b"\n")
    assert fingerprint.agent_sha256(str(copy)) != before


def test_added_or_renamed_files_count_caches_do_not(tmp_path):
    copy = copy_agent(tmp_path / "agent")
    before = fingerprint.agent_sha256(str(copy))
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "cli.cpython-36.pyc").write_bytes(b"cache")
    (copy / "notes.txt").write_text("not code")
    assert fingerprint.agent_sha256(str(copy)) == before
    (copy / "backends" / "extra.py").write_text("")
    assert fingerprint.agent_sha256(str(copy)) != before
    (copy / "backends" / "extra.py").unlink()
    (copy / "device.py").rename(copy / "device2.py")
    assert fingerprint.agent_sha256(str(copy)) != before

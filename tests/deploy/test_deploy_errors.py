"""A finished measurement survives a failed report write (kept on the device, its path named), agent argument errors
are one line naming the fix, and the interrupt message fits the command (real OpenSSH server on 127.0.0.1)."""

import errno
import json
import sys
from pathlib import Path

import pytest

from deploy import deployer as deployer_mod
from deploy.deployer import Deployer, DeployOptions
from deploy.ssh import SshOptions, parse_hosts
from export.bundle import bundle_id
from tests.deploy.test_deploy_loopback import FAST, assert_one_line_error, reports_in, run_deploy


def options(fleet, tmp, *agent_args):
    return DeployOptions(python=sys.executable, remote_dir=str(tmp / "device"), reports=str(tmp / "reports"),
                         connect_timeout=5, agent_args=[*FAST, *agent_args], ssh=SshOptions(config=str(fleet.config)),
                         quiet=True)


def test_report_the_device_cannot_write_still_reaches_the_server(fleet, bundles, tmp_path):
    remote = tmp_path / "device" / bundle_id(bundles["fp32"])
    remote.mkdir(parents=True)
    (remote / "reports").write_text("a file where the device keeps its reports")
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path)
    assert p.returncode == 0, p.stderr
    assert "could not write the report to" in p.stderr
    saved = json.loads(reports_in(tmp_path)[0].read_text())
    kept = Path(saved["agent"]["device_copy"])
    try:
        assert kept.is_file() and json.loads(kept.read_text())["latency"] == saved["latency"]
        assert f"device copy at {kept}" in p.stderr
    finally:
        kept.unlink()


def test_a_report_the_server_cannot_save_is_kept_on_the_device(fleet, bundles, tmp_path, monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(deployer_mod, "atomic_write_json", full)
    [res] = Deployer(str(bundles["fp32"]), options(fleet, tmp_path)).run(parse_hosts("loop0"))
    assert res.error and "\n" not in res.error and res.report_path is None
    assert "could not save the report" in res.error and "No space left on device" in res.error
    where = res.error.split("kept on the device at ")[1].split(" ")[0].rstrip(":;,")
    host, path = where.split(":", 1)
    assert host == "loop0" and Path(path).is_file() and json.loads(Path(path).read_text())["latency"]["p50_ms"] > 0
    assert f"scp loop0:{path} " in res.error


def test_a_bad_agent_argument_is_one_line_not_a_crash(fleet, bundles, tmp_path):
    # the server refuses it first; a value that gets past it anyway reaches the user the same way
    [res] = Deployer(str(bundles["fp32"]), options(fleet, tmp_path, "--warmup", "-5")).run(parse_hosts("loop0"))
    assert res.error and "\n" not in res.error, res.error
    assert "--warmup must be at least 0 (got -5)" in res.error and "crashed" not in res.error
    assert "--backend onnxruntime" not in res.error


@pytest.mark.parametrize("flag,value,needle", [
    ("--warmup", "-5", "--warmup must be at least 0 (got -5)"),
    ("--min-top1", "5", "--min-top1 must be at most 1"),
    ("--min-top1", "-0.5", "--min-top1 must be at least 0"),
    ("--threads", "-2", "--threads must be at least 0"),
    ("--workspace-mb", "0", "--workspace-mb must be at least 1"),
])
def test_bad_measurement_options_are_refused_before_ssh(bundles, tmp_path, flag, value, needle):
    p = run_deploy(bundles["fp32"], "nowhere.invalid", tmp_path / "no-ssh-config", tmp_path, flag, value)
    assert_one_line_error(p, needle)
    assert "preflight" not in p.stderr


def test_interrupt_message_fits_the_command(monkeypatch, capsys, bundles):
    from redistill import cli

    def interrupted(self, hosts):
        raise KeyboardInterrupt
    monkeypatch.setattr(Deployer, "run", interrupted)
    monkeypatch.setattr(deployer_mod, "require_client", lambda tool: None)
    assert cli.main(["deploy", str(bundles["fp32"]), "--host", "h"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("redistill deploy: interrupted") and "--resume" not in err and "\n" not in err

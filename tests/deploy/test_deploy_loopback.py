"""End to end over a real OpenSSH server on 127.0.0.1: `make deploy` to a two-sshd fleet, then the failure modes.

Both servers share this machine's filesystem, so they stand in for two devices on the network
path (ssh, copy, remote run of the copied agent folder, report) but not for two separate disks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from deploy.agent.contract import REPORT_SCHEMA, REPORT_SCHEMA_VERSION
from deploy.agent.fingerprint import agent_files
from deploy.deployer import agent_sha256

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = sys.executable

FAST = ["--iters", "20", "--warmup", "2", "--mem-iters", "3", "--threads", "1", "--slope-batches", "1,2,4"]


def run_deploy(bundle, host, config, tmp, *extra, python=VENV_PYTHON, remote=None):
    argv = [sys.executable, "-m", "redistill.cli", "deploy", str(bundle), "--host", host, "--ssh-config", str(config),
            "--python", python, "--reports", str(tmp / "reports"), "--remote-dir", str(remote or tmp / "device"),
            "--connect-timeout", "5", *FAST, *extra]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp)


def reports_in(tmp):
    return sorted((tmp / "reports").rglob("*.json")) if (tmp / "reports").exists() else []


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("redistill deploy: error: "), p.stderr
    for n in needles:
        assert n in last, last
    return last


def check_report(path, bundle_id):
    r = json.loads(Path(path).read_text())
    assert r["schema"] == REPORT_SCHEMA and r["schema_version"] == REPORT_SCHEMA_VERSION
    assert r["bundle"]["id"] == bundle_id and r["deploy"]["bundle_id"] == bundle_id
    # the agent hashed the folder it ran from on the device; the server hashed the one it copied
    assert r["agent"]["sha256"] == r["deploy"]["agent_sha256"] == agent_sha256()
    assert r["backend"]["name"] == "onnxruntime"
    assert r["output_check"]["passed"] and r["output_check"]["top1_agreement"] == 1.0
    lat = r["latency"]
    for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms", "throughput_per_s"):
        assert lat[k] > 0, k
    assert lat["iterations"] == 20 and lat["warmup"] == 2
    mem = r["memory"]
    for k in ("activation", "process_peak", "process_after_load", "system_ram"):
        assert mem[k]["bytes"] > 0, k
        assert mem[k]["what"] and mem[k]["how"], k
    assert "arena" in mem["activation"]["how"]
    assert mem["theoretical_peak"]["bytes"] > 0
    # the tiny bundles have a dynamic batch: ORT per image with graph optimisations off and on, each with resolution
    per_image = mem["per_image"]
    assert per_image["batches"] == [1, 2, 4] and per_image["skipped"] is None
    for f in per_image["figures"]:
        assert [p["batch"] for p in f["points"]] == [1, 2, 4] and f["resolution_bytes"] > 0 and f["what"] and f["how"]
    assert [f["graph_optimization"] for f in per_image["figures"]] == ["off", "on"]
    return r


def test_make_deploy_to_two_device_fleet_in_parallel(fleet, bundles, tmp_path):
    from export.bundle import bundle_id

    args = (f"--ssh-config {fleet.config} --reports {tmp_path / 'reports'} --remote-dir {tmp_path / 'device'} "
            "--connect-timeout 5 " + " ".join(FAST))
    p = subprocess.run(["make", "-s", "-C", str(REPO), "deploy", "JETSON=loop0,loop1",
                        f"BUNDLES={bundles['fp32'].parent}", "PRESET=tiny", f"JETSON_PYTHON={VENV_PYTHON}", f"ARGS={args}"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=150)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[loop0] agent: verifying bundle" in p.stderr and "[loop1] agent: verifying bundle" in p.stderr
    bid = bundle_id(bundles["fp32"])
    for alias in ("loop0", "loop1"):
        found = list((tmp_path / "reports" / alias / "tiny-fp32").glob("*.json"))
        assert len(found) == 1, p.stderr
        r = check_report(found[0], bid)
        assert r["deploy"]["host"] == alias
    assert not list((tmp_path / "reports").rglob(".*.tmp"))


def test_second_deploy_copies_nothing_and_int8_runs(fleet, bundles, tmp_path):
    from export.bundle import bundle_id

    first = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path)
    assert first.returncode == 0, first.stderr
    copied_agent = tmp_path / "device" / bundle_id(bundles["fp32"]) / "agent"
    assert agent_files(str(copied_agent)) == agent_files()  # the whole folder, subfolders included
    (copied_agent / "agent.py").write_text("raise SystemExit('a file an older agent left')\n")
    second = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "copy (rsync): 0 file(s)" in second.stderr and "already on the device" in second.stderr
    assert not (copied_agent / "agent.py").exists()  # removed, so the device runs and hashes the server's folder
    reps = reports_in(tmp_path)
    assert len(reps) == 2
    newest = check_report(reps[-1], bundle_id(bundles["fp32"]))
    assert newest["deploy"]["files_copied"] == []
    assert any(f.endswith("model.onnx") for f in json.loads(reps[0].read_text())["deploy"]["files_copied"])
    # the Q/DQ bundle runs as exported on ONNX Runtime; fp16 there is a clear refusal
    p8 = run_deploy(bundles["int8"], "loop1", fleet.config, tmp_path)
    assert p8.returncode == 0, p8.stderr
    r8 = check_report(sorted((tmp_path / "reports" / "loop1").rglob("*.json"))[0], bundle_id(bundles["int8"]))
    assert r8["backend"]["precision"] == "int8"
    refused = run_deploy(bundles["int8"], "loop1", fleet.config, tmp_path, "--precision", "fp16")
    assert_one_line_error(refused, "onnxruntime backend runs the model as exported", "--backend tensorrt")


def test_scp_copy_works_too(fleet, bundles, tmp_path):
    p = run_deploy(bundles["fp32"], "loop1", fleet.config, tmp_path, "--copy", "scp")
    assert p.returncode == 0, p.stderr
    assert "copy (scp)" in p.stderr and len(reports_in(tmp_path)) == 1


def test_wrong_port(fleet, bundles, tmp_path):
    from deploy.loopback import free_port

    p = run_deploy(bundles["fp32"], f"root@127.0.0.1:{free_port()}", fleet.config, tmp_path)
    assert_one_line_error(p, "cannot reach", "connection refused", "check the address and port")
    assert reports_in(tmp_path) == []


def test_unknown_client_key_is_refused(fleet, bundles, tmp_path):
    cfg = fleet.write_client_config(tmp_path / "cfg", identity=fleet.stranger_key)
    p = run_deploy(bundles["fp32"], "loop0", cfg, tmp_path)
    assert_one_line_error(p, "refused authentication", "ssh-copy-id")
    assert reports_in(tmp_path) == []


def test_changed_host_key_is_refused(fleet, bundles, tmp_path):
    kh = fleet.write_known_hosts(tmp_path / "known_hosts", fleet.other_host_key)
    cfg = fleet.write_client_config(tmp_path / "cfg", known_hosts=kh)
    p = run_deploy(bundles["fp32"], "loop0", cfg, tmp_path)
    assert_one_line_error(p, "host key of loop0 has changed", "ssh-keygen -R")
    assert reports_in(tmp_path) == []


def test_unknown_host_key_is_not_accepted_silently(fleet, bundles, tmp_path):
    kh = tmp_path / "empty_known_hosts"
    kh.write_text("")
    cfg = fleet.write_client_config(tmp_path / "cfg", known_hosts=kh)
    p = run_deploy(bundles["fp32"], "loop0", cfg, tmp_path)
    assert_one_line_error(p, "not in known_hosts", "connect once")
    assert kh.read_text() == "" and reports_in(tmp_path) == []


def test_missing_interpreter(fleet, bundles, tmp_path):
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, python="/nonexistent/python3")
    assert_one_line_error(p, "no Python interpreter '/nonexistent/python3'", "JETSON_PYTHON")
    assert reports_in(tmp_path) == []


def test_bundle_altered_on_device_is_refused_then_repaired(fleet, bundles, tmp_path):
    from export.bundle import bundle_id

    ok = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path)
    assert ok.returncode == 0, ok.stderr
    onnx = tmp_path / "device" / bundle_id(bundles["fp32"]) / "bundle" / "model.onnx"
    st = onnx.stat()
    data = bytearray(onnx.read_bytes())
    data[-8] ^= 0xFF  # same size, same mtime: rsync's quick check will not notice, the agent must
    onnx.write_bytes(bytes(data))
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns))
    (tmp_path / "reports").rename(tmp_path / "reports-ok")
    bad = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path)
    assert_one_line_error(bad, "model.onnx does not match its sha256", "--recopy")
    assert reports_in(tmp_path) == []
    fixed = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, "--recopy")
    assert fixed.returncode == 0, fixed.stderr
    assert "model.onnx" in fixed.stderr.split("copy (rsync)")[0] or "1 file(s)" in fixed.stderr


def test_agent_crash_reports_remote_traceback(fleet, bundles, tmp_path):
    from export.bundle import read_manifest, write_bundle

    src = bundles["fp32"]
    m = read_manifest(src)
    for k in ("schema", "schema_version", "files"):
        m.pop(k)
    buf = tmp_path / "bad_outputs.npy"
    np.save(buf, np.zeros((4, 7), np.float32))  # wrong shape: the output check cannot compare
    bad = write_bundle(tmp_path / "bad-fp32", {"model.onnx": src / "model.onnx",
                                                "reference/inputs.npy": src / "reference" / "inputs.npy",
                                                "reference/outputs.npy": buf}, m)
    p = run_deploy(bad, "loop0", fleet.config, tmp_path)
    last = assert_one_line_error(p, "the agent crashed", "ValueError", "remote traceback is printed above")
    assert "Traceback (most recent call last)" in p.stderr and "[loop0]" in p.stderr
    assert reports_in(tmp_path) == [], last

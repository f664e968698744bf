"""The agent: bundle verification, parsers, the ONNX Runtime backend in-process, the folder run standalone from a copy,
vermin, and the TensorRT backend's 8.2 / 10.x handling against FAKE API surfaces (tests/deploy/fake_tensorrt.py).

The fakes check which calls the agent makes for each version; they do not verify TensorRT itself.
"""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.agent import bundle as agent_bundle
from deploy.agent import device, phases, probes
from deploy.agent.backends import choose_backend
from deploy.agent.common import AgentError
from deploy.agent.contract import ERROR_PREFIX, EXIT_REFUSED, RSS_DELTA_RESOLUTION_BYTES
from export.bundle import bundle_id
from tests.deploy.fake_tensorrt import device_memory
from tests.support.agent import AGENT_DIR, agent_args, install_fake_trt

PROJECT = ("redistill", "train", "export", "deploy", "bench", "tests")
HEAVY = ("onnxruntime", "tensorrt", "torch", "onnx", "pycuda")


def run_copied_agent(folder, *argv):
    """``python3 FOLDER ...`` isolated from the project (-I: no cwd, no PYTHONPATH), as the deploy runs it."""
    return subprocess.run([sys.executable, "-I", str(folder), *map(str, argv)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=str(Path(folder).parent))


def test_agent_is_python36_compatible():
    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).exists():
        pytest.skip("vermin is not installed (it is in the dev extra: pip install -e '.[dev]')")
    p = subprocess.run([vermin, "--target=3.6-", "--violations", "--no-tips", str(AGENT_DIR)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout


def test_copied_agent_folder_runs_alone_and_imports_only_stdlib_and_numpy(agent_copy, bundles):
    code = ("import runpy, sys; sys.argv = ['agent', '--verify-only', '--bundle', %r]\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))\n"
            "print(sorted(m for m in sys.modules if m.startswith('redistill_agent')))"
            % (str(bundles["fp32"]), str(agent_copy), PROJECT + HEAVY))
    p = subprocess.run([sys.executable, "-I", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=str(agent_copy.parent))
    exit_line, project, agent = p.stdout.strip().splitlines()
    assert exit_line == "exit 0", p.stderr
    assert project == "[]", project
    assert "redistill_agent.cli" in agent and "redistill_agent.backends.trt" in agent
    assert "bundle %s verified" % bundle_id(bundles["fp32"]) in p.stderr


def test_agent_modules_import_each_other_relatively():
    """Relative imports work both as deploy.agent here and as the copied folder's package on the device."""
    for path in AGENT_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in PROJECT + ("redistill_agent",)]
            assert not bad, f"{path.relative_to(AGENT_DIR)}:{node.lineno} imports {bad}; import agent modules relatively"


def test_verification_catches_altered_and_missing_files(bundles, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(bundles["fp32"], b)
    manifest, bid = agent_bundle.load_and_verify_bundle(str(b))
    assert bid == bundle_id(b)
    (b / "reference" / "outputs.npy").write_bytes(b"x" + (b / "reference" / "outputs.npy").read_bytes()[1:])
    with pytest.raises(AgentError, match="outputs.npy does not match its sha256"):
        agent_bundle.load_and_verify_bundle(str(b))
    (b / "reference" / "outputs.npy").unlink()
    with pytest.raises(AgentError, match="missing on the device"):
        agent_bundle.load_and_verify_bundle(str(b))


def test_parsers():
    line = "RAM 2020/7852MB (lfb 1164x4MB) CPU [2%@345,off,off,1%@345] GR3D_FREQ 0% VDD_IN 3140/3208"
    assert probes.parse_tegrastats_ram(line) == (2020 << 20, 7852 << 20)
    assert probes.parse_tegrastats_ram("CPU [1%]") is None
    assert device.parse_l4t_release("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref") == "R32.7.1"
    assert device.parse_nvpmodel("NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    stats = phases.latency_stats([0.001, 0.002, 0.003, 0.004], batch=2)
    assert stats["mean_ms"] == pytest.approx(2.5) and stats["min_ms"] == pytest.approx(1.0)
    assert stats["throughput_per_s"] == pytest.approx(800.0) and stats["iterations"] == 4


def test_onnxruntime_phases_in_process(bundles, tmp_path):
    args = agent_args(bundles["fp32"], tmp_path, "--backend", "onnxruntime")
    manifest, bid = agent_bundle.load_and_verify_bundle(str(bundles["fp32"]))
    lat = phases.phase_latency(args, str(bundles["fp32"]), manifest, bid)
    assert lat["output_check"]["passed"] and lat["output_check"]["max_abs_diff"] < 1e-5
    assert lat["backend"]["cpu_mem_arena"] is False and lat["backend"]["mem_pattern"] is False
    mem = phases.phase_memory(args, str(bundles["fp32"]), manifest, bid)["memory"]
    assert mem["activation"]["bytes"] > 0 and mem["process_peak"]["bytes"] >= mem["process_after_load"]["bytes"]
    # every measured figure says what it includes, how it was measured and what it resolves
    for name in ("activation", "process_peak", "process_after_load", "system_ram"):
        assert mem[name]["what"] and mem[name]["how"] and mem[name]["resolution_how"], name
        assert mem[name]["resolution_bytes"] >= 1024, name
    act = mem["activation"]
    assert act["method"] == "onnxruntime_rss_delta" and act["batch"] == 1 and act["per_image"] is False
    assert act["resolution_bytes"] == RSS_DELTA_RESOLUTION_BYTES


def test_copied_agent_refusal_is_one_line_exit_3(agent_copy, bundles):
    p = run_copied_agent(agent_copy, "--bundle", bundles["fp32"], "--backend", "onnxruntime", "--precision", "fp16")
    assert p.returncode == EXIT_REFUSED and p.stdout == "", p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(ERROR_PREFIX + " refused: the onnxruntime backend")


def test_agent_rejects_options_below_their_minimum(capsys):
    """A bad argument is a refusal like any other: one ERROR_PREFIX line naming the fix, exit EXIT_REFUSED."""
    with pytest.raises(SystemExit) as e:
        agent_args("b", "c", "--iters", "0")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == EXIT_REFUSED and last.startswith(ERROR_PREFIX + " bad-argument: ")
    assert "--iters must be at least 1 (got 0); fix that option" in last


@pytest.mark.parametrize("version", ["8.2.1.8", "10.3.0"])
def test_tensorrt_version_handling_against_fakes(bundles, tmp_path, monkeypatch, version):
    calls = install_fake_trt(monkeypatch, version)
    v10 = version.startswith("10")
    assert choose_backend("auto").name == "tensorrt"
    args = agent_args(bundles["fp32"], tmp_path / "engines", "--backend", "tensorrt", "--batch", "2")
    manifest, bid = agent_bundle.load_and_verify_bundle(str(bundles["fp32"]))
    lat = phases.phase_latency(args, str(bundles["fp32"]), manifest, bid)
    assert lat["output_check"]["passed"], lat["output_check"]
    assert lat["backend"]["api"] == ("execute_async_v3" if v10 else "execute_v2")
    assert lat["backend"]["engine_cache"]["hit"] is False and lat["backend"]["cuda_buffers"] == "pycuda"
    assert "builder.build_serialized_network" in calls and "builder.build_engine" not in calls
    assert ("builder.create_network(flags=0)" if v10 else "builder.create_network(flags=1)") in calls
    assert any(c.startswith("config.set_memory_pool_limit") for c in calls) == v10
    assert any(c.startswith("config.max_workspace_size=") for c in calls) == (not v10)
    assert ("context.execute_async_v3" in calls) == v10 and ("context.execute_v2" in calls) == (not v10)
    assert "profile.set_shape(input, (1, 3, 64, 64), (2, 3, 64, 64), (4, 3, 64, 64))" in calls
    # engine, timing cache and sidecar are keyed by bundle, TensorRT version, GPU and precision
    engines = list((tmp_path / "engines").glob("*.engine"))
    assert len(engines) == 1
    name = engines[0].name
    assert name.startswith(bid[:16]) and "nvidia-tegra-x2" in name and name.endswith("-fp32.engine") and version in name
    side = json.loads(engines[0].with_suffix(".json").read_text())
    assert side["tensorrt"] == version and side["gpu"] == "NVIDIA Tegra X2" and side["precision"] == "fp32"
    assert engines[0].with_suffix(".timing-cache").read_bytes() == b"FAKE-TIMING-CACHE"
    # the memory run reuses the cached engine and reads the right activation-size attribute
    calls.clear()
    mem = phases.phase_memory(args, str(bundles["fp32"]), manifest, bid)["memory"]
    assert "builder.build_serialized_network" not in calls
    # the engine is sized for its profile's largest batch (4, the reference count), and the figure says so
    assert mem["activation"]["bytes"] == device_memory(23456 if v10 else 12345, 4) and mem["activation"]["batch"] == 4
    assert ("device_memory_size_v2" in mem["activation"]["how"]) == v10
    assert mem["activation"]["resolution_bytes"] == 1 and "exact" in mem["activation"]["resolution_how"]
    # fp16 is a separate engine
    args16 = agent_args(bundles["fp32"], tmp_path / "engines", "--backend", "tensorrt", "--precision", "fp16")
    lat16 = phases.phase_latency(args16, str(bundles["fp32"]), manifest, bid)
    assert lat16["backend"]["precision"] == "fp16" and "config.set_flag(FP16)" in calls
    assert len(list((tmp_path / "engines").glob("*.engine"))) == 2


def test_int8_refused_without_fast_int8_like_tx2(bundles, tmp_path, monkeypatch):
    install_fake_trt(monkeypatch, "8.2.1.8", fast_int8=False)
    args = agent_args(bundles["int8"], tmp_path, "--backend", "tensorrt")
    manifest, bid = agent_bundle.load_and_verify_bundle(str(bundles["int8"]))
    with pytest.raises(AgentError, match=r"platform_has_fast_int8 = False .*TX2 has no INT8.*--precision fp16"):
        phases.phase_latency(args, str(bundles["int8"]), manifest, bid)
    assert not list(tmp_path.glob("*.engine"))


def test_int8_builds_on_fast_int8_platform_only_for_qdq(bundles, tmp_path, monkeypatch):
    calls = install_fake_trt(monkeypatch, "10.3.0", fast_int8=True)
    args = agent_args(bundles["int8"], tmp_path, "--backend", "tensorrt")
    manifest, bid = agent_bundle.load_and_verify_bundle(str(bundles["int8"]))
    lat = phases.phase_latency(args, str(bundles["int8"]), manifest, bid)
    assert lat["backend"]["precision"] == "int8" and "config.set_flag(INT8)" in calls
    m32, b32 = agent_bundle.load_and_verify_bundle(str(bundles["fp32"]))
    args32 = agent_args(bundles["fp32"], tmp_path, "--backend", "tensorrt", "--precision", "int8")
    with pytest.raises(AgentError, match="not Q/DQ-quantized"):
        phases.phase_latency(args32, str(bundles["fp32"]), m32, b32)
    args_fp16 = agent_args(bundles["int8"], tmp_path, "--backend", "tensorrt", "--precision", "fp16")
    with pytest.raises(AgentError, match="Q/DQ-quantized .* only as INT8"):
        phases.phase_latency(args_fp16, str(bundles["int8"]), manifest, bid)


def test_auto_falls_back_to_onnxruntime_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert choose_backend("auto").name == "onnxruntime"


# --- a denoiser bundle: several inputs (x, t), output eps ------------------------------------------------------


def test_denoiser_bundle_onnxruntime_feeds_every_input(denoiser_bundle, tmp_path):
    manifest, bid = agent_bundle.load_and_verify_bundle(str(denoiser_bundle))
    assert manifest["schema_version"] == 2
    assert [(i["name"], i["dtype"]) for i in agent_bundle.bundle_inputs(manifest)] == [("x", "float32"), ("t", "float32")]
    feeds, y = agent_bundle.load_reference(str(denoiser_bundle), manifest)
    assert list(feeds) == ["x", "t"] and feeds["t"].dtype == np.float32 and feeds["x"].shape == (3, 3, 32, 32)
    assert 0 <= feeds["t"].min() and feeds["t"].max() <= 999 and y.shape == (3, 3, 32, 32)
    args = agent_args(denoiser_bundle, tmp_path, "--backend", "onnxruntime")
    lat = phases.phase_latency(args, str(denoiser_bundle), manifest, bid)
    chk = lat["output_check"]
    assert chk["passed"] and chk["max_abs_diff"] < 1e-4 and chk["top1_agreement"] is None and chk["samples"] == 3
    assert lat["latency"]["batch"] == 1 and "one denoising step" in lat["latency"]["what"]
    mem = phases.phase_memory(args, str(denoiser_bundle), manifest, bid)["memory"]
    assert mem["batch"] == 1 and mem["activation"]["bytes"] is not None


def test_denoiser_reference_must_cover_every_input(denoiser_bundle):
    manifest, _ = agent_bundle.load_and_verify_bundle(str(denoiser_bundle))
    broken = dict(manifest, reference=dict(manifest["reference"], inputs={"x": manifest["reference"]["inputs"]["x"]}))
    with pytest.raises(AgentError, match="no reference data for input 't'"):
        agent_bundle.load_reference(str(denoiser_bundle), broken)


def test_agent_opens_only_files_the_manifest_lists_with_a_sha256(denoiser_bundle, tmp_path):
    manifest, _ = agent_bundle.load_and_verify_bundle(str(denoiser_bundle))
    outside = tmp_path / "t.npy"
    outside.write_bytes((denoiser_bundle / manifest["reference"]["inputs"]["t"]).read_bytes())
    sneaky = dict(manifest, reference=dict(manifest["reference"], inputs=dict(manifest["reference"]["inputs"],
                                                                              t=str(outside))))
    with pytest.raises(AgentError, match="does not list it with a sha256"):
        agent_bundle.load_reference(str(denoiser_bundle), sneaky)
    with pytest.raises(AgentError, match="does not list it with a sha256"):
        agent_bundle.onnx_path(str(denoiser_bundle), dict(manifest, onnx={"file": "../model.onnx"}))


def test_v1_only_agent_refuses_a_several_input_bundle_cleanly(denoiser_bundle, monkeypatch):
    monkeypatch.setattr(agent_bundle, "BUNDLE_SCHEMA_VERSION", 1)  # what an agent from before schema 2 does
    with pytest.raises(AgentError, match="schema version 2 is newer than this agent understands"):
        agent_bundle.load_and_verify_bundle(str(denoiser_bundle))


@pytest.mark.parametrize("version", ["8.2.1.8", "10.3.0"])
def test_tensorrt_binds_every_denoiser_input_by_name_against_fakes(denoiser_bundle, tmp_path, monkeypatch,
                                                                   version):
    calls = install_fake_trt(monkeypatch, version)
    v10 = version.startswith("10")
    args = agent_args(denoiser_bundle, tmp_path / "engines", "--backend", "tensorrt")
    manifest, bid = agent_bundle.load_and_verify_bundle(str(denoiser_bundle))
    lat = phases.phase_latency(args, str(denoiser_bundle), manifest, bid)
    # the fake engine lists t before x: a positional binding would feed x into t and fail the output check
    assert lat["output_check"]["passed"] and lat["output_check"]["max_abs_diff"] < 1e-4, lat["output_check"]
    if v10:
        assert {"context.set_input_shape(x, (1, 3, 32, 32))", "context.set_input_shape(t, (1,))",
                "context.set_tensor_address(x)", "context.set_tensor_address(t)",
                "context.set_tensor_address(eps)"} <= set(calls)
    else:
        assert {"context.set_binding_shape(0=t, (1,))", "context.set_binding_shape(1=x, (1, 3, 32, 32))"} <= set(calls)
    assert not any(c.startswith("profile.set_shape") for c in calls)  # static batch 1: no optimisation profile
    mem = phases.phase_memory(args, str(denoiser_bundle), manifest, bid)["memory"]
    assert mem["activation"]["bytes"] == (23456 if v10 else 12345) and mem["batch"] == 1
    assert mem["activation"]["batch"] == 1

"""The loopback deploy bench end to end: a throwaway sshd, two tiny bundles deployed, the results page written."""

import json

import pytest

from bench.loopback_bench import main
from deploy.loopback import sshd_available
from tests.support.fixtures import tiny_bundle


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return tiny_bundle(root / "tiny-fp32"), tiny_bundle(root / "tiny-int8", int8=True)


def test_loopback_bench_writes_results(tiny_bundles, tmp_path):
    if sshd_available():
        pytest.skip(sshd_available())
    out = tmp_path / "res" / "deploy_loopback"
    argv = [*map(str, tiny_bundles), "--out", str(out), "--reports", str(tmp_path / "reports"), "--iters", "10",
            "--warmup", "1", "--mem-iters", "2"]
    assert main(argv) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [r["precision"] for r in doc["results"]] == ["fp32", "int8"]
    for r in doc["results"]:
        assert r["measured_activation_bytes"] > 0 and r["theoretical_peak_bytes"] > 0 and r["latency_ms"]["p50_ms"] > 0
        assert r["output_check"]["passed"] and r["backend"] == "onnxruntime"
        assert r["iterations"] == 10 and r["warmup"] == 1
    md = out.with_suffix(".md").read_text()
    assert "not a Jetson" in md and "tiny-int8" in md
    assert doc["command"] == "python -m bench.loopback_bench " + " ".join(argv)

"""A walk over the agent's backend registry: every registered backend verifies, loads and measures a tiny bundle.

ONNX Runtime runs for real; TensorRT runs through the FAKE tensorrt/pycuda modules of tests/deploy/fake_tensorrt.py
(they check the calls the agent makes, not TensorRT itself). A backend registered without an entry here fails.
"""

import pytest

from deploy.agent import cli as agent_cli
from deploy.agent import phases
from deploy.agent.backends import BACKENDS, Backend, backend_choices, choose_backend, get_backend, register_backend
from deploy.agent.bundle import load_and_verify_bundle
from deploy.agent.common import AgentError
from tests.deploy.test_options import deploy_parser
from tests.support.agent import agent_args, install_fake_trt

#: how each registered backend is made available here: None = for real, else what installs a FAKE of it
HOW = {
    "onnxruntime": None,
    "tensorrt": lambda monkeypatch: install_fake_trt(monkeypatch, "10.3.0"),
}


def test_every_backend_has_a_check_here_and_is_offered_by_both_parsers():
    assert sorted(BACKENDS) == sorted(HOW)
    assert all(issubclass(cls, Backend) and cls.name == name for name, cls in BACKENDS.items())
    assert backend_choices() == ("auto", "tensorrt", "onnxruntime")  # the order auto tries them
    for parser in (agent_cli.build_parser(), deploy_parser()):
        (action,) = [a for a in parser._actions if a.dest == "backend"]
        assert tuple(action.choices) == backend_choices()


@pytest.mark.parametrize("name", sorted(BACKENDS), ids=lambda n: n if HOW.get(n) is None else f"{n}-FAKE")
def test_every_registered_backend_measures_a_tiny_bundle(name, bundles, tmp_path, monkeypatch):
    if HOW[name] is not None:
        HOW[name](monkeypatch)
    cls = get_backend(name)
    assert cls.available(), f"{name} is not importable here"
    args = agent_args(bundles["fp32"], tmp_path / "engines", "--backend", name)
    manifest, bid = load_and_verify_bundle(str(bundles["fp32"]))
    lat = phases.phase_latency(args, str(bundles["fp32"]), manifest, bid)
    assert lat["backend"]["name"] == name and lat["backend"]["precision"] == "fp32"
    assert lat["output_check"]["passed"] and lat["output_check"]["top1_agreement"] == 1.0, lat["output_check"]
    assert lat["latency"]["iterations"] == 5 and lat["latency"]["p50_ms"] > 0
    mem = phases.phase_memory(args, str(bundles["fp32"]), manifest, bid)["memory"]
    assert mem["activation"]["bytes"] > 0 and mem["activation"]["what"] and mem["activation"]["how"]
    assert mem["iterations"] == 2


def test_registry_refuses_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match="registered twice"):
        register_backend("onnxruntime")(type("Y", (Backend,), {}))
    with pytest.raises(AgentError, match="unknown backend 'openvino'; valid: onnxruntime, tensorrt"):
        choose_backend("openvino")


def test_auto_prefers_the_backend_the_bundle_target_names(monkeypatch):
    install_fake_trt(monkeypatch, "10.3.0")  # FAKE tensorrt: both backends importable
    assert choose_backend("auto").name == "tensorrt"
    assert choose_backend("auto", {"backend": "onnxruntime"}).name == "onnxruntime"
    assert choose_backend("auto", {"backend": "no-such-backend"}).name == "tensorrt"
    assert choose_backend("tensorrt", {"backend": "onnxruntime"}).name == "tensorrt"  # an explicit choice wins

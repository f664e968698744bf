import numpy as np
import pytest
from onnx import numpy_helper

from train.fold import fold_batchnorm
from export.onnx_export import check_model, export_onnx
from export.preflight import preflight
from export.calibration import CALIBRATION
from export.quantize import quantize_int8
from export.targets import get_target
from export.verify import compare, run, session, torch_logits
from redistill.errors import UserError


@pytest.fixture(scope="module")
def student(image_root, make_student):
    _, model, _ = make_student("quick", image_root, steps=2)
    return model, export_onnx(fold_batchnorm(model, 32), 32)


def test_int8_qdq_is_symmetric_and_runs(student):
    model, fp32 = student
    calib = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    q = quantize_int8(fp32, calib, "minmax")
    check_model(q)
    inits = {t.name: t for t in q.graph.initializer}
    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 20
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == 3 and not numpy_helper.to_array(zp).any(), n.name  # int8 zero
    assert preflight(q, get_target("orin-int8"))["passed"]
    clips = lambda m: sum(n.op_type == "Clip" for n in m.graph.node)  # noqa: E731
    assert clips(q) == clips(fp32) == 5, "ReLU6 must survive quantization"
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    r = compare(torch_logits(model, x), run(session(q), x), None)
    assert np.isfinite(r["max_abs_diff"]) and r["max_abs_diff"] < 1.0


def test_calibration_methods_are_a_registry():
    assert CALIBRATION.names() == ["entropy", "minmax", "percentile", "percentile-99.9", "percentile-99.99"]
    with pytest.raises(UserError, match="Did you mean 'entropy'"):
        CALIBRATION.get("entropi")


def test_graph_outputs_stay_float(student):
    """No Q/DQ on the logits: rounding them only adds noise, and the runtime hands them over in float."""
    model, fp32 = student
    calib = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    q = quantize_int8(fp32, calib, "minmax")
    prod = {o: n for n in q.graph.node for o in n.output}
    out = q.graph.output[0].name
    assert out == fp32.graph.output[0].name and prod[out].op_type == "Gemm"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0].startswith(out) for n in q.graph.node)
    check_model(q)

"""The three paper pairs export at opset 13 within TensorRT 8.2's operator list and match PyTorch."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from train.fold import fold_batchnorm
from export.onnx_export import check_model, export_onnx
from export.preflight import preflight
from export.targets import get_target
from export.verify import compare, run, session, torch_logits


def _red_patterns(proto):
    """Count y = x * sigmoid(conv(x)) + clip(conv(x), 0, 6): Add(Mul(_, Sigmoid(Conv)), Clip(Conv, 0, 6))."""
    by_out = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    found = 0
    for add in (n for n in proto.graph.node if n.op_type == "Add"):
        srcs = [by_out.get(i) for i in add.input]
        mul = next((s for s in srcs if s is not None and s.op_type == "Mul"), None)
        clip = next((s for s in srcs if s is not None and s.op_type == "Clip"), None)
        if mul is None or clip is None:
            continue
        sig = [by_out.get(i) for i in mul.input]
        if not any(s is not None and s.op_type == "Sigmoid" and by_out[s.input[0]].op_type == "Conv" for s in sig):
            continue
        assert by_out[clip.input[0]].op_type == "Conv"
        lo, hi = (float(inits[i]) for i in clip.input[1:])  # opset-13 Clip: min/max are initializer inputs
        assert (lo, hi) == (0.0, 6.0)
        found += 1
    return found


@pytest.mark.parametrize("preset", ["mobilenetv2_x4", "mobilenetv3_small_x4", "resnext18_x4"])
def test_paper_pairs_export_for_trt82(image_root, make_student, preset):
    cfg, model, plans = make_student(preset, image_root, steps=0)
    proto = export_onnx(fold_batchnorm(model, 32), 32, opset=13)
    check_model(proto)
    summary = preflight(proto, get_target("tx2"))
    assert summary["opset"] == 13 and proto.ir_version <= 7
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Constant" not in ops
    assert ops <= get_target("tx2").allowed_ops
    if "mobilenetv3" in cfg.student.arch:
        assert "HardSwish" not in ops and "HardSigmoid" in ops  # HardSwish is opset 14: decomposed at 13
    if "resnext" in cfg.student.arch:
        assert any(a.name == "group" and a.i > 1 for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute)
    assert "GlobalAveragePool" in ops
    assert _red_patterns(proto) == len(plans) == 5
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    r = compare(torch_logits(model, x), run(session(proto), x), 1e-4)
    assert r["passed"], r


def test_static_and_dynamic_batch(image_root, make_student):
    _, model, _ = make_student("quick", image_root, steps=0)
    folded = fold_batchnorm(model, 32)
    static = export_onnx(folded, 32)
    dims = static.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 32, 32]
    assert static.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert (static.graph.input[0].name, static.graph.output[0].name) == ("input", "logits")
    dyn = export_onnx(folded, 32, dynamic_batch=True)
    assert dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert run(session(dyn), x, batch=3).shape == (3, 10)

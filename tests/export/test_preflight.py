import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.preflight import preflight
from export.targets import TARGETS, TRT82_OPS, get_target
from redistill.errors import UserError


def _graph(op="Mod", opset=13, **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    b = numpy_helper.from_array(np.full((1, 4), 3.0, np.float32), "b")
    node = helper.make_node(op, ["x", "b"], ["y"], name="the_bad_node", **attrs)
    g = helper.make_graph([node], "g", [x], [y], [b])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_mod_is_refused_naming_the_node():
    m = _graph("Mod", fmod=1)
    onnx.checker.check_model(m)
    with pytest.raises(UserError, match=r"the_bad_node.*Mod.*TensorRT 8.2"):
        preflight(m, get_target("tx2"))
    with pytest.raises(UserError, match="the_bad_node"):
        preflight(m, get_target("orin"))
    assert preflight(m, get_target("cpu"))["op_counts"] == {"Mod": 1}


def test_opset_and_ir_limits():
    with pytest.raises(UserError, match="opset 14 is above 13"):
        preflight(_graph("Add", opset=14), get_target("tx2"))
    m = _graph("Add")
    m.ir_version = 8
    with pytest.raises(UserError, match="IR version 8"):
        preflight(m, get_target("tx2"))
    assert preflight(_graph("Add"), get_target("tx2"))["passed"]


def test_nonzero_zero_point_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq0")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    with pytest.raises(UserError, match="q0.*zero point"):
        preflight(m, get_target("orin"))


def test_allow_list_is_explicit_and_sourced():
    assert {"Conv", "Clip", "Sigmoid", "Mul", "Add", "HardSigmoid", "GlobalAveragePool", "Gemm", "Flatten",
            "QuantizeLinear", "DequantizeLinear"} <= TRT82_OPS
    assert not {"Mod", "HardSwish", "NonZero", "Trilu"} & TRT82_OPS
    assert "release/8.2-GA" in get_target("tx2").ops_source


def test_each_target_is_one_runtime_and_one_precision():
    table = {t.name: (t.backend, t.precision, t.max_opset, t.allowed_ops is TRT82_OPS) for t in TARGETS.values()}
    assert table == {
        "tx2": ("tensorrt", "fp32", 13, True),
        "orin": ("tensorrt", "fp32", 13, True),
        "orin-int8": ("tensorrt", "int8", 13, True),
        "cpu": ("onnxruntime", "fp32", 17, False),
        "cpu-int8": ("onnxruntime", "int8", 17, False),
    }
    # no INT8 on a TX2: asking for it gives the reason and the two ways out
    with pytest.raises(UserError, match=r"--target tx2-int8 is refused: .*sm_62.*--target tx2.*--target cpu-int8"):
        get_target("tx2-int8")
    with pytest.raises(UserError, match="Did you mean 'orin'"):
        get_target("orin-fp16")


def test_refusal_points_to_a_target_without_an_operator_list():
    with pytest.raises(UserError, match="or use --target cpu-int8$"):
        preflight(_graph("Mod", fmod=1), get_target("orin-int8"))

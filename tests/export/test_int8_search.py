"""INT8 that keeps its accuracy: calibration reuse, nodes kept in float, per-node sensitivity and the greedy search,
on real ONNX Runtime with tiny real graphs."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.calibration import CALIBRATION, auto_methods
from export.int8_search import Goal, search_int8
from export.onnx_export import check_model, export_onnx
from export.preflight import preflight
from export.quantize import calibrate, entropy_threshold, float_nodes, quantize_int8, quantized_nodes
from export.sensitivity import PASS_THROUGH, node_sensitivity, units
from export.targets import get_target
from export.verify import run, session
from redistill.errors import UserError
from train.fold import fold_batchnorm


@pytest.fixture(scope="module")
def student(image_root, make_student, one_thread):
    """The quick student (RED blocks, 32 px) as FP32 ONNX, minmax ranges on 8 images, and its INT8 graph."""
    _, model, _ = make_student("quick", image_root, steps=2)
    fp32 = export_onnx(fold_batchnorm(model, 32), 32)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ranges = calibrate(fp32, x, "minmax")
    return fp32, x, ranges, quantize_int8(fp32, ranges)


def _dq_fed(q, name):
    prod = {o: n for n in q.graph.node for o in n.output}
    node = next(n for n in q.graph.node if n.name == name)
    return [i for i in node.input if i in prod and prod[i].op_type == "DequantizeLinear"]


def test_ranges_are_reused_and_match_calibrating_inline(student):
    fp32, x, ranges, q = student
    again = quantize_int8(fp32, x, "minmax")  # the old call: calibrate inside
    a, b = run(session(q), x), run(session(again), x)
    assert np.array_equal(a, b)


def test_excluded_nodes_are_float_and_the_graph_stays_tensorrt_parsable(student):
    fp32, x, ranges, q = student
    quant = quantized_nodes(q)
    by_op = {}
    for n in fp32.graph.node:
        if n.name in quant:
            by_op.setdefault(n.op_type, n.name)
    keep = [quant[0], by_op["GlobalAveragePool"], by_op["Gemm"], by_op["Add"], by_op["Clip"]]
    q2 = quantize_int8(fp32, ranges, exclude=keep)
    assert float_nodes(q2, keep) == {k: True for k in keep}
    for k in keep:
        assert not _dq_fed(q2, k), k  # no DequantizeLinear feeds it: float inputs and float weights
    inits = {t.name: t for t in q2.graph.initializer}
    gemm = next(n for n in q2.graph.node if n.name == by_op["Gemm"])
    assert inits[gemm.input[1]].data_type == TensorProto.FLOAT
    others = [n for n in quant if n not in keep]
    assert not any(float_nodes(q2, others).values()), "only the excluded nodes leave INT8"
    check_model(q2)
    assert preflight(q2, get_target("orin-int8"))["passed"]  # symmetric, zero point 0, opset 13, allow-list
    # every node in float is the FP32 graph again, and no Q/DQ is left
    q_all = quantize_int8(fp32, ranges, exclude=quant)
    assert not [n for n in q_all.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert np.abs(run(session(q_all), x) - run(session(fp32), x)).max() <= 1e-5


def test_unknown_node_to_exclude_is_one_line(student):
    fp32, _, ranges, _ = student
    with pytest.raises(UserError, match="no node of that name"):
        quantize_int8(fp32, ranges, exclude=["/not/a/node"])


def test_entropy_threshold_is_onnxruntimes(one_thread):
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(0)
    c = HistogramCollector("entropy", False, 256, 128, 99.999, "same")
    data = {"heavy": [rng.standard_t(3, 3000).astype(np.float32)],
            "relu": [np.maximum(rng.standard_normal(3000), 0).astype(np.float32)], "zeros": [np.zeros(64, np.float32)]}
    c.collect(data)
    c.collect({k: [v[0] * 1.7] for k, v in data.items()})  # a wider second batch grows the histogram
    for name, h in c.histogram_dict.items():
        assert tuple(map(float, entropy_threshold(h, 128))) == tuple(map(float, c.get_entropy_threshold(h, 128))), name


def test_entropy_is_not_minmax(student):
    """onnxruntime's defaults made entropy equal minmax (one candidate threshold); the registry's bins do not."""
    fp32, x, ranges, _ = student
    assert CALIBRATION.get("entropy").options["num_bins"] > CALIBRATION.get("entropy").options["num_quantized_bins"]
    ent = calibrate(fp32, x, "entropy")
    amp = lambda d, k: max(float(np.max(np.abs(np.asarray(v)))) for v in d.data[k].range_value)  # noqa: E731
    narrower = [k for k in ranges.data.keys() if k in ent.data.keys() and amp(ent, k) < amp(ranges, k) * 0.99]
    assert narrower, "entropy clipped no tensor's range"


def test_units_join_pass_through_nodes_to_their_reader(student):
    fp32, _, _, q = student
    groups = units(fp32, q)
    ops = {n.name: n.op_type for n in fp32.graph.node}
    outputs = {n.name: n.output[0] for n in fp32.graph.node}
    readers = {}
    for n in fp32.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    seen = [m for g in groups.values() for m in g]
    assert len(seen) == len(set(seen)), "a node in two units"
    for sink, members in groups.items():
        assert members[-1] == sink and ops[sink] not in PASS_THROUGH
        for a, b in zip(members, members[1:]):
            assert ops[a] in PASS_THROUGH and readers[outputs[a]] == [b]
    assert any(len(g) > 1 for g in groups.values())  # the quick student's ReLU6 Clips join their Add


def test_sensitivity_ranks_every_unit(student):
    fp32, x, _, q = student
    ranking = node_sensitivity(fp32, q, {"input": x[:5]}, chunk=2)  # chunks of 2: sums over calls
    assert {r.name for r in ranking} == set(units(fp32, q))
    noise = [r.added_noise for r in ranking]
    assert noise == sorted(noise, reverse=True)
    first = next(r for r in ranking if r.name == quantized_nodes(q)[0])
    assert first.input_sqnr_db == float("inf")  # the first conv reads the clean input
    assert all(r.output_sqnr_db < 200 for r in ranking)
    json.dumps([r.record() for r in ranking], allow_nan=False)
    whole = node_sensitivity(fp32, q, {"input": x[:5]}, chunk=32)
    assert [r.name for r in whole] == [r.name for r in ranking]


def _tiny_classifier(seed=0):
    """input [1,3,8,8] -> Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm: a graph seconds to search.

    The first conv has no padding and zero-mean kernels, so a constant added to an image changes its input range
    but none of the later activations."""
    rng = np.random.default_rng(seed)
    w = lambda name, *shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)  # noqa: E731
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1 -= w1.mean(axis=(2, 3), keepdims=True)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), w("b1", 8), w("w2", 8, 8, 3, 3), w("b2", 8), w("wf", 10, 8),
             numpy_helper.from_array(np.zeros(10, np.float32), "bf")]  # no bias: the logits follow the image
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def test_search_keeps_units_float_until_the_goal(one_thread):
    """One calibration image offset by +3000 makes the input's INT8 step so coarse that the real images round
    away, while every later range is right: the search must keep the first conv in float and so meet the goal."""
    fp32 = _tiny_classifier()
    rng = np.random.default_rng(1)
    vx = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    vy = run(session(fp32), vx).argmax(1)  # FP32 is right on every validation image
    cal = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    cal[0] += 3000.0
    goal = Goal(max_drop=6.0, max_float_nodes=3, methods=["minmax"], sizes=[8])
    said = []
    r = search_int8(fp32, {8: cal}, (vx, vy), goal, said.append)
    assert r.fp32_top1 == 100.0 and r.trace[0].step == "calibration" and r.trace[0].chosen
    first = r.trace[0].score
    assert first.drop > 20, "the offset calibration image must hurt, or this test tests nothing"
    kept = [t for t in r.trace if t.step == "keep float" and t.chosen]
    assert r.float_nodes == ["conv1"], "the goal is met with the first unit: the search stops there"
    agree = [first.agreement] + [t.score.agreement for t in kept]
    assert agree == sorted(agree) and len(set(agree)) == len(agree)  # each unit kept keeps FP32's top-1 on more images
    assert r.score.drop < first.drop
    assert r.goal_met and r.score.drop + r.score.se <= 6.0  # met with one standard error to spare
    assert all(float_nodes(r.model, r.float_nodes).values())
    assert r.ranking[0].name == "conv1", "the unit reading the coarse input adds the most noise"
    rec = r.record()
    json.dumps(rec, allow_nan=False)
    assert rec["chosen"]["float_nodes"] == r.float_nodes and rec["validation"]["images"] == 40 and rec["goal_met"]
    assert [u["nodes"] for u in r.float_units] == [t.unit for t in kept]
    assert all("of the validation images, drop" in u["why"] for u in r.float_units)
    assert any(line.strip().startswith("float: conv1") for line in said)


def test_the_cap_bounds_the_float_nodes(one_thread):
    fp32 = _tiny_classifier()
    rng = np.random.default_rng(1)
    vx = rng.standard_normal((40, 3, 8, 8)).astype(np.float32)
    vy = run(session(fp32), vx).argmax(1)
    cal = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    cal[0] += 3000.0
    r = search_int8(fp32, {8: cal}, (vx, vy), Goal(0.0, 0, ["minmax"], [8]))
    assert not r.float_nodes and not r.goal_met and len(r.trace) == 1


def test_search_with_no_float_nodes_only_chooses_the_calibration(one_thread):
    fp32 = _tiny_classifier(1)
    rng = np.random.default_rng(2)
    vx = rng.standard_normal((12, 3, 8, 8)).astype(np.float32)
    vy = run(session(fp32), vx).argmax(1)
    cal = {n: rng.standard_normal((n, 3, 8, 8)).astype(np.float32) for n in (4, 8)}
    r = search_int8(fp32, cal, (vx, vy), Goal(0.0, 0, auto_methods(), [4, 8]))
    calib = [t for t in r.trace if t.step == "calibration"]
    assert [(t.method, t.calib_images) for t in calib] == [(m, n) for n in (4, 8) for m in auto_methods()]
    assert sum(t.chosen for t in calib) == 1 and len(r.trace) == len(calib) and not r.float_nodes
    best = max(calib, key=lambda t: (t.score.agreement, -t.score.drop))  # the most images keep FP32's top-1
    assert best.chosen and (r.method, r.calib_images) == (best.method, best.calib_images)
    assert auto_methods()[0] == "minmax" and sorted(auto_methods()) == CALIBRATION.names()


def test_score_counts_broken_and_mended_images(monkeypatch):
    """The drop is (broken - mended) / n and its standard error comes from those two counts (paired)."""
    import export.int8_search as search

    fp32 = _tiny_classifier(3)
    x = np.random.default_rng(4).standard_normal((20, 3, 8, 8)).astype(np.float32)
    ref = run(session(fp32), x)
    labels = ref.argmax(1).copy()
    labels[:4] = (labels[:4] + 1) % 10  # FP32 is wrong on 4 images
    s = search.validate(fp32, x, labels, ref)
    assert (s.top1, s.drop, s.agreement, s.se, s.logit_sqnr_db) == (80.0, 0.0, 1.0, 0.0, None)
    other = ref.copy()
    other[4, labels[4]] = -1e9  # an INT8 stand-in that breaks image 4 ...
    other[0, labels[0]] = 1e9  # ... and mends image 0
    monkeypatch.setattr(search, "run", lambda sess, images, batch=1: other)
    s = search.validate(fp32, x, labels, ref)
    assert (s.top1, s.drop, s.agreement) == (80.0, 0.0, 0.9) and s.se == pytest.approx(100 * np.sqrt(2) / 20)


def test_a_failing_calibration_is_skipped_in_auto_and_one_line_alone(one_thread, monkeypatch):
    import export.int8_search as search

    fp32 = _tiny_classifier(2)
    rng = np.random.default_rng(3)
    vx = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    vy = run(session(fp32), vx).argmax(1)
    real = search.calibrate

    def flaky(proto, images, method):
        if method == "percentile":
            raise UserError("INT8 calibration 'percentile' failed in onnxruntime (ValueError: Too many bins); "
                            "choose another --calib-method")
        return real(proto, images, method)

    monkeypatch.setattr(search, "calibrate", flaky)
    cal = {4: rng.standard_normal((4, 3, 8, 8)).astype(np.float32)}
    r = search.search_int8(fp32, cal, (vx, vy), Goal(0.5, 0, ["minmax", "percentile"], [4]))
    assert r.method == "minmax" and r.record()["failed"][0]["method"] == "percentile"
    with pytest.raises(UserError, match="percentile' failed"):
        search.search_int8(fp32, cal, (vx, vy), Goal(0.5, 0, ["percentile"], [4]))


def test_a_calibrator_crash_is_one_line(student, monkeypatch):
    """numpy's histogram inside onnxruntime fails on activations narrower than float32 resolution: one line."""
    import onnxruntime.quantization as ortq

    fp32, x, _, _ = student

    class Broken:
        def collect_data(self, reader):
            raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")

    monkeypatch.setattr(ortq, "create_calibrator", lambda *a, **k: Broken())
    with pytest.raises(UserError, match=r"^INT8 calibration 'percentile' failed in onnxruntime \(ValueError: Too many "
                                        r"bins.*choose another --calib-method$") as e:
        calibrate(fp32, x, "percentile")
    assert "\n" not in str(e.value)


def test_batched_graph_gives_the_same_logits_or_is_not_used(student):
    from export.verify import batched

    fp32, x, _, _ = student
    many = batched(fp32, x[:2])
    assert many is not fp32 and many.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert np.abs(run(session(many), x, batch=8) - run(session(fp32), x)).max() <= 1e-4
    # a graph that fixes its batch inside (Reshape to [1, -1]) is kept as it is
    nodes = [helper.make_node("Reshape", ["input", "shape"], ["flat"], name="reshape"),
             helper.make_node("Relu", ["flat"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    fixed = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    assert batched(fixed, np.ones((2, 2, 2), np.float32)) is fixed

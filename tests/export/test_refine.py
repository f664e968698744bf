"""Activation scales refined at the logits (export.refine) and the search step that keeps them, on real ONNX Runtime."""

import json

import numpy as np
import pytest
from onnx import numpy_helper

import export.int8_search as int8_search
import export.refine as refine
from export.int8_search import Goal, search_int8
from export.onnx_export import check_model
from export.preflight import preflight
from export.quantize import calibrate, quantize_int8, range_ties
from export.refine import activation_quantizers, only, refine_scales, scaled
from export.targets import get_target
from export.verify import run, session
from tests.export.test_int8_search import _tiny_classifier

WIDE = 200.0  # how much too wide the spoiled range is


def _scale(q, tensor):
    inits = {t.name: t for t in q.graph.initializer}
    return float(numpy_helper.to_array(inits[activation_quantizers(q)[tensor].input[1]]).reshape(-1)[0])


@pytest.fixture(scope="module")
def tiny(one_thread):
    fp32 = _tiny_classifier()
    rng = np.random.default_rng(1)
    cal = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    return fp32, cal, calibrate(fp32, cal, "minmax")


def test_scaled_ranges_scale_the_quantizer_and_stay_symmetric(tiny):
    fp32, _, ranges = tiny
    q = quantize_int8(fp32, ranges)
    q2 = quantize_int8(fp32, scaled(ranges, {"r1": 0.5}))
    assert _scale(q2, "r1") == pytest.approx(0.5 * _scale(q, "r1"), rel=1e-6)
    assert _scale(q2, "c2") == _scale(q, "c2")  # the others untouched
    check_model(q2)
    assert preflight(q2, get_target("orin-int8"))["passed"]  # zero points 0: what TensorRT takes


def test_only_rounds_one_activation_and_no_weight(tiny):
    fp32, cal, ranges = tiny
    q = quantize_int8(fp32, ranges)
    m = only(q, fp32, ["r1"])
    assert list(activation_quantizers(m)) == ["r1"]
    inits = {t.name for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    dq_weights = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert not dq_weights and all(prod.get(n.input[0]) is not None for n in m.graph.node if n.op_type == "DequantizeLinear")
    out, ref = run(session(m), cal), run(session(fp32), cal)
    assert 0 < np.abs(out - ref).max() < np.abs(run(session(q), cal) - ref).max()


def test_a_range_far_too_wide_is_narrowed(tiny, monkeypatch):
    fp32, cal, ranges = tiny
    monkeypatch.setattr(refine, "FACTORS", (1 / WIDE, 0.5, 1.0, 2.0))
    spoiled = scaled(ranges, {"r1": WIDE})
    new, factors = refine_scales(fp32, spoiled, cal)
    assert factors["r1"] == 1 / WIDE
    assert set(factors.values()) <= set(refine.FACTORS) - {1.0}
    q_new = quantize_int8(fp32, new)
    assert _scale(q_new, "r1") == pytest.approx(_scale(quantize_int8(fp32, ranges), "r1"), rel=1e-5)
    ref = run(session(fp32), cal)
    err = lambda q: float(np.sum((run(session(q), cal) - ref) ** 2))  # noqa: E731
    assert err(q_new) < err(quantize_int8(fp32, spoiled)) / 10


@pytest.mark.parametrize("refine_on", [True, False])
def test_the_search_keeps_refined_scales_only_when_asked_and_better(tiny, monkeypatch, refine_on):
    """A calibration whose relu range is far too wide: the refined ranges keep FP32's top-1 on more validation
    images and are kept; without the option the search has no such step."""
    fp32, cal, ranges = tiny
    monkeypatch.setattr(refine, "FACTORS", (1 / WIDE, 0.5, 1.0, 2.0))
    real = int8_search.calibrate
    monkeypatch.setattr(int8_search, "calibrate", lambda g, x, m: scaled(real(g, x, m), {"r1": WIDE}))
    rng = np.random.default_rng(3)
    vx = rng.standard_normal((60, 3, 8, 8)).astype(np.float32)
    vy = run(session(fp32), vx).argmax(1)
    said = []
    r = search_int8(fp32, {16: cal}, (vx, vy), Goal(0.0, 0, ["minmax"], [16], refine_on), said.append)
    first = r.trace[0].score
    steps = [t.step for t in r.trace]
    rec = r.record()
    json.dumps(rec, allow_nan=False)
    if not refine_on:
        assert steps == ["calibration"] and r.refined is None and rec["refine_scales"] is None
        return
    assert first.agreement < 0.95, "the spoiled range must cost top-1s, or this test tests nothing"
    assert steps == ["calibration", "refine scales"] and r.trace[1].chosen
    assert r.refined["kept"] and r.refined["factors"]["r1"] == 1 / WIDE and rec["chosen"]["scales_refined"]
    assert r.score.agreement > first.agreement and r.score is r.trace[1].score
    assert _scale(r.model, "r1") < _scale(quantize_int8(fp32, scaled(ranges, {"r1": WIDE})), "r1") / 10
    assert any("refined scales" in line for line in said)


def test_tensors_sharing_a_scale_are_one_group(tiny):
    """onnxruntime rounds a Flatten's output at its input's scale: the two are measured and refined as one."""
    fp32, _, ranges = tiny
    q = quantize_int8(fp32, ranges)
    groups = refine.scale_groups(q)
    acts = activation_quantizers(q)
    assert groups["g"] == ["g", "f"] and "f" not in groups
    assert acts["f"].input[1] == acts["g"].input[1] == "g_scale"
    assert all(len(ts) == 1 for p, ts in groups.items() if p != "g")


def test_a_relu_input_is_refined_with_its_output_as_onnxruntime_ties_their_ranges(tiny):
    """onnxruntime gives conv1's output (read only by the Relu) the Relu output's range: a range set on it alone is
    ignored, so it is one group with the Relu's output, and a factor chosen for that group moves both scales."""
    fp32, _, ranges = tiny
    assert range_ties(fp32) == {"c1": "r1"}
    q = quantize_int8(fp32, ranges)
    assert _scale(q, "c1") == _scale(q, "r1")
    assert _scale(quantize_int8(fp32, scaled(ranges, {"c1": 0.5})), "c1") == _scale(q, "c1")  # ignored
    q2 = quantize_int8(fp32, scaled(ranges, {"r1": 0.5}))
    assert _scale(q2, "c1") == _scale(q2, "r1") == pytest.approx(0.5 * _scale(q, "r1"), rel=1e-6)
    groups = refine.scale_groups(q, range_ties(fp32))
    assert sorted(groups["r1"]) == ["c1", "r1"] and "c1" not in groups


def test_the_refinement_aims_at_the_reference_logits(tiny, monkeypatch):
    """After fine-tuning, the search scores against the original FP32 graph; the refinement must aim there too."""
    fp32, cal, ranges = tiny
    seen = {}

    def spy(g, r, images, say, reference=None, q=None):
        seen["reference"] = reference
        return r, {}

    monkeypatch.setattr(int8_search, "refine_scales", spy)
    original = _tiny_classifier(seed=1)
    vy = run(session(original), cal).argmax(1)
    search_int8(fp32, {16: cal}, (cal, vy), Goal(0.0, 0, ["minmax"], [16], True), reference=original)
    assert seen["reference"] is original

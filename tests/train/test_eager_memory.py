"""The traced eager peak: exact bytes on modules whose allocations are known, the split, theory vs measurement."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from redistill.cli import main
from redistill.errors import UserError
from train.design import analyze_model, build_design, pair_designs
from train.eager_memory import measure_eager, node_positions
from train.red import REDBlock

N = 3 * 16 * 16 * 4  # one 1x3x16x16 float32 map: the input at image_size 16, and every map below


class Chain(nn.Module):
    """sin -> cos -> exp: every op makes one map; at most the input and two maps are alive at once."""

    def forward(self, x):
        a = torch.sin(x)
        b = torch.cos(a)
        del a
        return torch.exp(b)


def _cos_then_sin(x: torch.Tensor) -> torch.Tensor:
    """One op with an internal temporary: cos(x) lives only inside the op, sin of it is the output."""
    tmp = torch.cos(x)
    return torch.sin(tmp)


# registered with the dispatcher, so that the profiler records it as one op around its cos and sin
_LIB = torch.library.Library("redistill_test", "DEF")
_LIB.define("cos_then_sin(Tensor x) -> Tensor")
_LIB.impl("cos_then_sin", _cos_then_sin, "CPU")


class WithTemporary(nn.Module):
    def forward(self, x):
        return torch.ops.redistill_test.cos_then_sin(x)


def test_peak_of_a_known_chain_is_exact():
    r = measure_eager(Chain(), image_size=16)
    # the input, then sin's map, then cos's map: x + a + b = 3 maps, first reached by cos
    assert r.peak_bytes == 3 * N
    assert (r.input_bytes, r.activation_bytes, r.scratch_bytes) == (N, 2 * N, 0)
    assert r.peak_op == "(model) aten::cos"
    assert r.activation_peak_bytes == 2 * N
    assert [s.op for s in r.timeline] == ["aten::sin", "aten::cos", "aten::exp"]
    assert [s.peak_bytes for s in r.timeline] == [2 * N, 3 * N, 3 * N]
    # once each op's inputs are dropped: x + a, x + b (a deleted), x + the output (b dropped on return)
    assert [s.end_bytes for s in r.timeline] == [2 * N, 2 * N, 2 * N]
    assert sum(b.bytes for b in r.at_activation_peak) == r.activation_peak_bytes
    assert r.untracked_frees == 0 and r.resolution.startswith("1 byte")


def test_batch_scales_every_map():
    r = measure_eager(Chain(), image_size=16, batch=3)
    assert r.peak_bytes == 3 * 3 * N and r.batch == 3


def test_an_ops_internal_temporary_is_scratch():
    r = measure_eager(WithTemporary(), image_size=16)
    assert r.peak_bytes == 3 * N  # input + the temporary + the output, all inside the one op
    assert (r.input_bytes, r.activation_bytes, r.scratch_bytes) == (N, N, N)
    (scratch,) = [b for b in r.at_peak if b.kind == "scratch"]
    assert scratch.op == "redistill_test::cos_then_sin" and scratch.inner_op == "aten::cos"
    assert r.max_scratch_bytes == N and "cos_then_sin" in r.max_scratch_op
    assert r.by_op("scratch") == [(scratch.where, N)]
    assert "scratch 3.00 KiB ((model) redistill_test::cos_then_sin > aten::cos 3.00 KiB)" in r.explain()


def test_folding_removes_the_batchnorm_output():
    net = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3))
    assert measure_eager(net, 16, fold_bn=True).activation_peak_bytes == N
    assert measure_eager(net, 16, fold_bn=False).activation_peak_bytes == 2 * N  # conv and BN outputs at once


def test_bad_batch_and_device_are_one_line_errors():
    with pytest.raises(UserError, match="batch must be at least 1"):
        measure_eager(Chain(), 16, batch=0)
    with pytest.raises(UserError, match="use cpu or cuda"):
        measure_eager(Chain(), 16, device="mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trace_equals_the_allocator_statistics():
    r = measure_eager(Chain(), image_size=64, device="cuda")
    assert r.device == "cuda" and r.peak_bytes > 0
    assert r.allocator_peak_bytes == r.peak_bytes
    assert r.input_bytes == 3 * 64 * 64 * 4


# --- real networks ------------------------------------------------------------------------------


def test_red_student_eager_activations_match_liveness():
    """Before the fix a RED block held its input, product, encoding and sum at once: 1.39x the liveness peak."""
    model = build_design("mobilenetv2-4-1221111", 32, "mobilenetv2_x4")
    theory = analyze_model(model, 32, inplace=True)
    measured = measure_eager(model, 32)
    assert measured.activation_peak_bytes <= 1.06 * theory.peak_bytes
    assert "red_in" in measured.activation_peak_op

    def formula(self, x):
        return x * torch.sigmoid(self.gate(x)) + self.encode(x)

    old = REDBlock.forward
    REDBlock.forward = formula
    try:
        before = measure_eager(model, 32)
    finally:
        REDBlock.forward = old
    assert before.activation_peak_bytes >= 1.3 * theory.peak_bytes


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_mobilenetv3_inplace_peak_agrees_with_the_eager_trace(which):
    """Hardswish (HardSigmoid then Mul at opset 13) runs in place: the in-place figure was 1.8x the eager one."""
    designs, _ = pair_designs("mobilenetv3_small_x4", 32)
    model = dict(designs)[which]
    theory = analyze_model(model, 32, inplace=True)
    measured = measure_eager(model, 32)
    assert 0.8 * measured.activation_peak_bytes <= theory.inplace_peak_bytes <= measured.activation_peak_bytes
    assert theory.inplace_peak_bytes < 0.7 * theory.peak_bytes


def test_node_positions_put_the_kth_conv_on_the_kth_conv_node():
    model = build_design("resnet18-2-21222", 32)
    theory = analyze_model(model, 32)
    measured = measure_eager(model, 32)
    x = node_positions(measured, theory)
    assert len(x) == len(measured.timeline) and x == sorted(x)
    assert x[0] == 0 and x[-1] == len(theory.nodes) - 1
    convs = [x[s.index] for s in measured.timeline if s.op == "aten::conv2d"]
    assert convs == [k for k, row in enumerate(theory.nodes) if row.op == "Conv"]


# --- the command ---------------------------------------------------------------------------------


def test_memory_cli_eager_writes_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "mem.json", tmp_path / "mem.png"
    assert main(["memory", "--arch", "mobilenetv3_small-4-22111111111", "--image-size", "32", "--eager",
                 "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "measured: one eager forward pass, PyTorch CPU allocator traced" in out and "op at the peak" in out
    doc = json.loads(js.read_text())
    (m,) = doc["models"]
    e = m["eager"]
    assert e["peak_bytes"] == e["activation_bytes"] + e["input_bytes"] + e["scratch_bytes"] > 0
    assert e["input_bytes"] == 3 * 32 * 32 * 4 and m["inplace_peak_bytes"] is not None  # --eager implies --inplace
    assert sum(b["bytes"] for b in e["at_peak"]) == e["peak_bytes"] and e["timeline"]
    assert "--eager" in doc["command"] and "byte-exact" in doc["eager_definition"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_cli_eager_refuses_onnx_files_and_dtype(tmp_path, capsys):
    assert main(["memory", str(tmp_path / "m.onnx"), "--eager"]) == 2
    assert "give --arch, --pair or --checkpoint instead of ONNX files" in capsys.readouterr().err
    assert main(["memory", "--arch", "resnet18", "--eager", "--dtype", "int8"]) == 2
    assert "drop --dtype" in capsys.readouterr().err
    assert main(["memory", "--arch", "resnet18", "--device", "cuda"]) == 2
    assert "add --eager" in capsys.readouterr().err


def test_resnet_stages_free_their_input_in_eager_mode(monkeypatch):
    """Called whole, a stage held the maxpool output through all of layer1: 1.33x the in-place peak."""
    import train.models

    designs, _ = pair_designs("resnet34_x4", 64)
    model = dict(designs)["student"]
    theory = analyze_model(model, 64, inplace=True)
    measured = measure_eager(model, 64)
    assert 0.9 * theory.inplace_peak_bytes <= measured.activation_peak_bytes <= 1.1 * theory.inplace_peak_bytes

    monkeypatch.setattr(train.models, "_observed", lambda stage: True)  # every stage called whole, as torchvision does
    held = measure_eager(model, 64)
    assert held.activation_peak_bytes >= 1.25 * theory.inplace_peak_bytes

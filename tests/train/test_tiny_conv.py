"""runtime.tiny_map_conv: convs on 2 x 2 and smaller maps over their valid taps give the conv's outputs and
gradients, and leave weights, hooks and exported graphs as they were."""

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from train.models import build_model
from train.tiny_conv import TinyMapConv2d, _TinyMapConv, eligible, set_tiny_map_conv, taps


def test_taps_are_the_kernel_positions_that_meet_the_map():
    assert [t[:2] for t in taps(1, 1, 3, 3, 1, 1)] == [(1, 1)]  # a single pixel: the centre only
    assert taps(2, 2, 3, 3, 1, 1)[0][:2] == (1, 1)  # the centre first: it reads every pixel
    assert len(taps(2, 2, 3, 3, 1, 1)) == 9 and len(taps(1, 2, 3, 3, 1, 1)) == 3
    a, b, i0, i1, j0, j1, dh, dw = taps(2, 2, 3, 3, 1, 1)[1]  # top-left tap: output (1, 1) reads input (0, 0)
    assert (a, b, i0, i1, j0, j1, dh, dw) == (0, 0, 1, 2, 1, 2, -1, -1)


@pytest.mark.parametrize("shape,k", [((2, 2), (3, 3)), ((1, 1), (3, 3)), ((1, 2), (3, 3)), ((2, 1), (3, 3)),
                                     ((3, 3), (5, 5)), ((8, 8), (3, 3)), ((2, 3), (3, 5)), ((3, 2), (5, 3)),
                                     ((1, 3), (1, 5)), ((2, 1), (3, 1))])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_outputs_and_gradients_are_the_convolutions(shape, k, bias, fmt):
    torch.manual_seed(0)
    pad = (k[0] // 2, k[1] // 2)
    x = torch.randn(5, 6, *shape).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(7, 6, *k).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(7, requires_grad=True) if bias else None
    gy = torch.randn(5, 7, *shape)
    ref = F.conv2d(x, w, b, padding=pad)
    want = torch.autograd.grad(ref, [x, w] + ([b] if bias else []), gy)
    out = _TinyMapConv.apply(x, w, b, pad)
    got = torch.autograd.grad(out, [x, w] + ([b] if bias else []), gy)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=fmt)  # the input's layout
    for g, r in zip(got, want):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,pad,size", [((3, 5), (1, 2), (2, 3)), ((5, 3), (2, 1), (3, 2))])
def test_a_non_square_kernel_takes_the_tap_path_up_to_its_reach_on_each_axis(monkeypatch, k, pad, size):
    conv = nn.Conv2d(3, 4, k, padding=pad)
    assert set_tiny_map_conv(conv, True) == 1
    calls = []
    real = _TinyMapConv.apply
    monkeypatch.setattr(_TinyMapConv, "apply", lambda *a: calls.append(a[3]) or real(*a))
    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=pad), rtol=1e-5, atol=1e-5)
    conv(torch.randn(2, 3, size[0] + 1, size[1]))
    conv(torch.randn(2, 3, size[0], size[1] + 1))
    assert calls == [pad]


def test_in_place_ops_after_it_and_changes_after_the_switch_are_safe():
    conv = nn.Conv2d(4, 5, 3, padding=1)
    set_tiny_map_conv(conv, True)
    x = torch.randn(2, 4, 2, 2, requires_grad=True)
    F.relu(conv(x), inplace=True).sum().backward()  # the output is no view of the Function's
    assert x.grad is not None and conv.weight.grad is not None
    conv.stride = (2, 2)  # no longer eligible: the ordinary (strided) convolution
    assert conv(torch.randn(1, 4, 2, 2)).shape[2:] == (1, 1)
    assert set_tiny_map_conv(conv, False) == 1 and type(conv) is nn.Conv2d  # switched back all the same


def test_torch_export_sees_a_convolution():
    conv = nn.Conv2d(4, 5, 3, padding=1)
    set_tiny_map_conv(conv, True)
    graph = torch.export.export(conv, (torch.randn(2, 4, 2, 2),)).graph
    assert any("conv" in str(n.target) for n in graph.nodes)


def test_only_plain_same_size_convs_are_switched_and_only_tiny_maps_take_the_tap_path(monkeypatch):
    convs = {"3x3": nn.Conv2d(4, 4, 3, padding=1), "5x5": nn.Conv2d(4, 4, 5, padding=2, bias=False),
             "stride": nn.Conv2d(4, 4, 3, stride=2, padding=1), "groups": nn.Conv2d(4, 4, 3, padding=1, groups=2),
             "1x1": nn.Conv2d(4, 4, 1), "dilated": nn.Conv2d(4, 4, 3, padding=2, dilation=2),
             "valid": nn.Conv2d(4, 4, 3), "reflect": nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")}
    assert {k for k, m in convs.items() if eligible(m)} == {"3x3", "5x5"}
    model = nn.Sequential(*convs.values())
    assert set_tiny_map_conv(model, True) == 2
    assert [type(m) is TinyMapConv2d for m in model] == [True, True] + [False] * 6
    calls = []
    real = _TinyMapConv.apply
    monkeypatch.setattr(_TinyMapConv, "apply", lambda *a: calls.append(a[0].shape[2:]) or real(*a))
    conv = model[0]
    for size in (1, 2, 3, 8):
        conv(torch.randn(2, 4, size, size))
    assert calls == [(1, 1), (2, 2)]  # a 3 x 3 kernel reaches the whole map up to 2 x 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(torch.randn(2, 4, 2, 2))
    assert len(calls) == 2  # autocast runs the conv it knows
    assert set_tiny_map_conv(model, False) == 2 and all(type(m) is nn.Conv2d for m in model[:2])


def test_an_aggressive_pooling_student_keeps_its_weights_hooks_outputs_and_graph(tmp_path):
    from train.design import export_for_analysis

    torch.manual_seed(0)
    model = build_model("resnext18-4-11221", 10, 32)  # ends on 2 x 2 maps at 32 px
    keys = list(model.state_dict())
    seen = []
    model.layer4[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain = model(x)
        n = set_tiny_map_conv(model, True)
        tiny = model(x)
    assert n > 0 and list(model.state_dict()) == keys and len(seen) == 2 and seen[1][2:] == (2, 2)
    torch.testing.assert_close(tiny, plain, rtol=1e-5, atol=1e-5)
    g = onnx.load(str(export_for_analysis(model, 32, tmp_path / "m.onnx"))).graph
    assert sum(node.op_type == "Conv" for node in g.node) == sum(isinstance(m, nn.Conv2d) for m in model.modules())

import pytest
import torch
import torch.nn.functional as F

from redistill.errors import UserError
from train.losses import LossInputs, kd_loss, red_loss, total_loss
from train.models import build_model
from train.red import REDBlock, REDSite, SitePlan, cosine_distance, insert_red_blocks, mse_distance, plan_sites


def _randomize_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.randn(mod.num_features, generator=g))
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=g))


def test_red_block_computes_the_formula():
    torch.manual_seed(0)
    blk = REDBlock(5).eval()
    _randomize_bn(blk)
    x = torch.randn(2, 5, 7, 6)
    conv1, bn1 = blk.gate[0], blk.gate[1]
    conv3, bn3 = blk.encode[0], blk.encode[1]
    assert conv1.kernel_size == (1, 1) and conv3.kernel_size == (3, 3)
    expected = x * torch.sigmoid(bn1(conv1(x))) + torch.clamp(bn3(conv3(x)), 0, 6)
    torch.testing.assert_close(blk(x), expected)


def test_cosine_and_mse_equal_hand_computed_values():
    # y: channels [1,3] and [3,5] -> channel mean [2,4]; t: a single channel [4,2]
    y = torch.tensor([[[[1.0, 3.0]], [[3.0, 5.0]]]])
    t = torch.tensor([[[[4.0, 2.0]]]])
    # cos = (2*4 + 4*2) / (sqrt(20) * sqrt(20)) = 0.8
    assert cosine_distance(y, t).item() == pytest.approx(0.2, abs=1e-6)
    # ((2-4)^2 + (4-2)^2) / 2 = 4
    assert mse_distance(y, t).item() == pytest.approx(4.0, abs=1e-6)


def test_red_loss_is_alpha_weighted_mean_over_blocks():
    y = torch.tensor([[[[1.0, 3.0]], [[3.0, 5.0]]]])
    t = torch.tensor([[[[4.0, 2.0]]]])
    plans = [SitePlan("a", "out", "x", "out", alpha=50.0), SitePlan("b", "in", "z", "in", alpha=10.0)]
    b = LossInputs(torch.zeros(1, 2), student_feats={"a:out": y, "b:in": y}, teacher_feats={"a:out": t, "b:in": y},
                   plans=plans, distance="cosine")
    # block a: 50 * 0.2 = 10; block b: identical maps -> 0; mean = 5
    assert red_loss(b).item() == pytest.approx(5.0, abs=1e-4)


def test_kd_loss_equals_hinton_formula():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, -1.0]])
    T = 2.0
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    expected = (pt * (pt.log() - ps.log())).sum(1).mean() * T * T
    assert kd_loss(LossInputs(s, t, temperature=T)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_total_loss_weights_ce_and_mean_of_distillation_losses():
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[2.0, 1.0]])
    ce = torch.tensor(3.0)
    kd = kd_loss(LossInputs(s, t, temperature=4.0))
    loss, parts = total_loss("kd", ce, LossInputs(s, t, temperature=4.0), 0.5, 0.5)
    assert loss.item() == pytest.approx(0.5 * 3.0 + 0.5 * kd.item(), rel=1e-6)
    loss, _ = total_loss("student", ce, LossInputs(s), 0.5, 0.5)
    assert loss.item() == 3.0 and set(parts) == {"ce", "kd"}


def test_red_blocks_are_real_submodules_in_the_state_dict():
    s = build_model("mobilenetv3_small-4-22111111111", 10, 32)
    t = build_model("mobilenetv3_small-1-22121111211", 10, 32)
    plans = plan_sites(s, t, [{"student": "features.0.0", "where": "out", "teacher": "features.2.block.1.0"},
                              {"student": "features.1.block.0.0", "where": "in", "teacher": "features.4.block.1.0"}], 32, 50.0)
    blocks = insert_red_blocks(s, plans)
    assert set(blocks) == {"features.0.0:out", "features.1.block.0.0:in"}
    assert isinstance(s.features[0][0], REDSite) and isinstance(s.features[0][0].red_out, REDBlock)
    keys = s.state_dict().keys()
    assert "features.0.0.red_out.gate.0.weight" in keys and "features.1.block.0.0.red_in.encode.1.running_var" in keys
    assert s(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_spatial_mismatch_names_both_layers_and_shapes():
    s = build_model("mobilenetv2-4-1221111", 10, 128)
    t = build_model("mobilenetv2-1-1222121", 10, 128)
    with pytest.raises(UserError) as e:
        plan_sites(s, t, [{"student": "features.0.0", "where": "out", "teacher": "features.7.conv.3"}], 128, 50.0)
    msg = str(e.value)
    assert "features.0.0" in msg and "features.7.conv.3" in msg and "32x32" in msg and "[1, 64, 16, 16]" in msg


def test_unknown_layer_gets_did_you_mean():
    s = build_model("resnet18-4-11221", 10, 64)
    with pytest.raises(UserError, match="Did you mean 'layer2.0'"):
        plan_sites(s, None, [{"student": "layr2.0", "teacher": "x"}], 64, 1.0)

import pytest
import torch
import torch.nn.functional as F
import yaml

from redistill.errors import UserError
from train.config import PRESET_DIR, load_config
from train.losses import LossInputs, kd_loss, red_loss, total_loss
from train.models import build_model, parse_arch
from train.plan import student_schedules
from train.red import (REDBlock, REDSite, SitePlan, auto_sites, cosine_distance, feature_sizes, insert_red_blocks,
                       mse_distance, plan_sites, stride_layers)
from train.skeleton import no_weight_init


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


def test_red_block_in_inference_is_bit_identical_and_leaves_its_input_alone():
    """Under no_grad the block computes in the gate's buffer; the result must equal the formula's bit for bit."""
    torch.manual_seed(0)
    blk = REDBlock(6).eval()
    _randomize_bn(blk)
    x = torch.randn(3, 6, 9, 7)
    keep = x.clone()
    with torch.enable_grad():
        expected = blk(x)
    with torch.no_grad():
        got = blk(x)
    assert torch.equal(got, expected) and torch.equal(x, keep)
    assert got.data_ptr() != x.data_ptr()


def test_red_student_outputs_are_bit_identical_with_and_without_grad():
    from train.design import build_design

    torch.manual_seed(0)
    model = build_design("mobilenetv2-4-1221111", 32, "mobilenetv2_x4").eval()
    _randomize_bn(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.enable_grad():
        expected = model(x)
    with torch.no_grad():
        got = model(x)
    assert torch.equal(got, expected)


def test_exported_red_block_keeps_the_formulas_graph(tmp_path):
    """Exporters trace the formula (Mul(x, Sigmoid), Add), so bundles exported before the in-place path match."""
    import onnx

    from train.design import export_for_analysis

    path = export_for_analysis(REDBlock(3), 8, tmp_path / "red.onnx")
    nodes = onnx.load(str(path)).graph.node
    (mul,) = [n for n in nodes if n.op_type == "Mul"]
    assert mul.input[0] == "input" and [n.op_type for n in nodes][-1] == "Add"


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


def test_sites_are_planned_against_a_teacher_on_another_device():
    """The trainer moves the teacher to the GPU before the student is built (found on a GPU: the probe's images
    stayed on the CPU); the meta device stands in for a GPU here: a forward there mixes no CPU tensor."""
    s = build_model("mobilenetv3_small-4-22111111111", 10, 32)
    t = build_model("mobilenetv3_small-1-22121111211", 10, 32).to("meta")
    plans = plan_sites(s, t, [{"student": "features.0.0", "where": "out", "teacher": "features.2.block.1.0"}], 32, 50.0)
    assert [p.teacher for p in plans] == ["features.2.block.1.0"]


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


# --- automatic sites (red.sites: auto) ------------------------------------------------------------------------

PAPER_PRESETS = ("mobilenetv2_x4", "mobilenetv2_x8", "mobilenetv3_small_x4", "resnext18_x4")


def _sites(entries):
    """Site entries compared as (student, where, teacher, teacher side)."""
    return [(s["student"], s.get("where", "out"), s["teacher"], s.get("teacher_where") or s.get("where", "out"))
            for s in entries]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_auto_sites_equal_the_paper_presets(preset):
    raw = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    assert isinstance(raw["red"]["sites"], list), "the paper presets keep their hand-written sites as the reference"
    got = auto_sites(raw["student"]["arch"], raw["teacher"]["arch"], raw["data"]["image_size"])
    assert _sites(got) == _sites(raw["red"]["sites"])


@pytest.mark.parametrize("preset, twin", [("resnet34_x4", "resnext18_x4"), ("quick", "mobilenetv3_small_x4")])
def test_auto_presets_place_their_twins_sites(preset, twin):
    """The presets that say `sites: auto` get the hand-written sites of the paper preset they copy."""
    assert yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())["red"]["sites"] == "auto"
    cfg = load_config(preset)
    twin_sites = yaml.safe_load((PRESET_DIR / f"{twin}.yaml").read_text())["red"]["sites"]
    assert _sites([vars(s) for s in cfg.red.sites]) == _sites(twin_sites)


def test_stride_layers_are_the_papers_downsampling_layers():
    assert stride_layers("mobilenetv2")[:4] == ("features.0.0", "features.1.conv.0.0", "features.2.conv.1.0",
                                                "features.4.conv.1.0")
    assert stride_layers("mobilenetv3_small")[:3] == ("features.0.0", "features.1.block.0.0", "features.2.block.1.0")
    for family in ("resnet18", "resnet34", "resnet50", "resnext18"):
        assert stride_layers(family) == ("conv1", "maxpool", "layer1.0", "layer2.0", "layer3.0", "layer4.0")


def test_feature_sizes_round_up_like_the_padded_layers():
    assert feature_sizes(parse_arch("resnet18-2-21222"), 224) == [(224, 112), (112, 56), (56, 56), (56, 28),
                                                                  (28, 14), (14, 7)]
    assert feature_sizes(parse_arch("resnet18-4-11112"), 100)[-1] == (25, 13)


def _schedules_fit(teacher: str, image_size: int, every: int = 1):
    """Every ``every``-th student schedule of ``teacher``: auto sites that plan_sites accepts on the real networks."""
    with no_weight_init():  # weight values are never read: only shapes
        t = build_model(teacher, 10, image_size)
        checked = 0
        for arch in student_schedules(parse_arch(teacher))[::every]:
            sites = auto_sites(str(arch), teacher, image_size)
            s = build_model(str(arch), 10, image_size)
            plans = plan_sites(s, t, sites, image_size, 50.0)  # raises on any H x W mismatch
            assert plans and all(p.channels > 0 for p in plans)
            assert any(p.where == "out" and p.student == stride_layers(arch.family)[0] for p in plans) == (
                arch.stem > parse_arch(teacher).stem)
            checked += 1
    return checked



@pytest.mark.parametrize("teacher, size", [("resnet18", 224), ("resnet50", 64)])
def test_auto_sites_fit_every_schedule_of_resnet18_and_resnet50(teacher, size, one_thread):
    assert _schedules_fit(teacher, size) == 29


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["mobilenetv2-1-1222121", "mobilenetv3_small-1-22121111211", "resnet18-1-21222",
                                     "resnet34-1-21222", "resnet50-1-21222", "resnext18-1-21222"])
def test_auto_sites_fit_every_schedule_of_every_family(teacher, one_thread):
    assert _schedules_fit(teacher, 32) > 20


def test_auto_sites_refuse_what_they_cannot_place():
    with pytest.raises(UserError, match="one family, but the student is a resnet18 and the teacher a mobilenetv2"):
        auto_sites("resnet18-4-11221", "mobilenetv2-1-1222121", 128)
    with pytest.raises(UserError, match="downsamples no earlier than"):
        auto_sites("resnet18-1-21222", "resnet18-1-21222", 128)
    with pytest.raises(UserError, match="list the sites of a unet network by hand"):
        auto_sites("unet-2-221", "unet-1-222", 32)
    with pytest.raises(UserError, match="set teacher.arch"):
        load_config(None, ["student.arch=resnet18-4-11221", "teacher.checkpoint=t.pt", "red.sites=auto"])

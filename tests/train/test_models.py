import pytest
import torch

from redistill.errors import UserError
from train.config import build_kwargs, is_paper_pair, load_config, paper_pairs, presets
from train.design import build_student
from train.losses import METHODS
from train.models import FAMILIES, build_model, example_inputs, parse_arch

PRESETS = sorted(presets())


def _small(arch: str) -> dict:
    """Builder options that keep a denoiser small in a test (classifiers take none)."""
    return {"ch": 16} if FAMILIES.get(parse_arch(arch).family).task == "denoise" else {}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_with_matching_red_sites(preset):
    """Teacher and student build at the preset's size, and every RED site matches the teacher's H x W."""
    cfg = load_config(preset)
    denoise = cfg.task == "denoise"
    n = 0 if denoise else 10
    if denoise:  # the U-Net's width changes no H x W; a narrow one keeps the test fast
        cfg.unet.ch = 16
    size = cfg.data.image_size
    teacher = build_model(cfg.teacher.arch, n, size, **build_kwargs(cfg, cfg.teacher))
    student, plans = build_student(cfg, n, teacher)  # raises on any H x W mismatch
    if METHODS.get(cfg.method).needs_sites:
        assert len(plans) == len(cfg.red.sites) > 0
    with torch.no_grad():
        out = student.eval()(*example_inputs(student, size))
    assert out.shape == ((1, 3, size, size) if denoise else (1, 10))


def test_paper_pairs_are_the_128px_red_classifier_presets():
    pairs = paper_pairs()
    assert {"mobilenetv2_x4", "mobilenetv2_x8", "mobilenetv3_small_x4", "resnext18_x4"} <= set(pairs)
    assert "quick" not in pairs and "ddpm_cifar10_x2" not in pairs  # 32 px; a denoiser
    assert pairs == [p for p in PRESETS if is_paper_pair(load_config(p))]


@pytest.mark.parametrize("preset", paper_pairs())
def test_paper_pairs_have_equal_total_stride_and_an_aggressive_student_stem(preset):
    cfg = load_config(preset)
    t, s = parse_arch(cfg.teacher.arch), parse_arch(cfg.student.arch)
    assert t.total_stride == s.total_stride == 16
    assert s.stem in (4, 8) and t.stem == 1


@pytest.mark.parametrize("family", FAMILIES.names())
def test_every_family_builds_at_32px_and_any_stride_schedule(family):
    fam = FAMILIES.get(family)
    default = parse_arch(fam.default)
    n = 0 if fam.task == "denoise" else 7
    # the same strides in reverse order: another valid schedule of equal total stride
    other = f"{family}-{default.stem}-{''.join(map(str, reversed(default.strides)))}"
    for name, size in ((fam.default, 32), (other, 64)):
        m = build_model(name, n, size, **_small(name)).eval()
        assert m.arch_name == str(parse_arch(name)) and str(parse_arch(other)) == other
        with torch.no_grad():
            out = m(*example_inputs(m, size))
        assert out.shape == ((1, 3, size, size) if fam.task == "denoise" else (1, 7))


def test_stem_stride_really_downsamples():
    m = build_model("mobilenetv2-4-1221111", 10, 64)
    assert m.features[0][0].stride == (4, 4)
    r = build_model("resnet18-8-11221", 10, 64)
    assert r.conv1.stride == (8, 8) and r.maxpool.stride == 1 and r.layer4[0].conv1.stride == (1, 1)


def test_bare_family_name_is_the_torchvision_schedule():
    assert str(parse_arch("resnet18")) == "resnet18-2-21222"


def test_unknown_architecture_suggests_nearest_names():
    with pytest.raises(UserError, match="unknown architecture 'mobilenet_v2-4-1221111'. Did you mean 'mobilenetv2-4-1221111'"):
        build_model("mobilenet_v2-4-1221111")


def test_wrong_number_of_stage_digits_is_explained():
    with pytest.raises(UserError, match="takes 7 stage strides.*got 6"):
        parse_arch("mobilenetv2-4-122111")


def test_image_size_and_stride_limits():
    with pytest.raises(UserError, match="32 to 224"):
        build_model("resnet18-2-21222", image_size=16)
    with pytest.raises(UserError, match="total stride 128 exceeds image_size 64"):
        build_model("resnet18-8-21222", image_size=64)


def test_mobilenetv3_squeeze_excitation_as_linear_changes_nothing_but_speed(tmp_path):
    """runtime.se_linear: the same weights (names, shapes, init), outputs and exported graph as torchvision's."""
    import onnx
    from functools import partial

    from torchvision.models.mobilenetv3 import InvertedResidual, MobileNetV3, _mobilenet_v3_conf

    from train.design import export_for_analysis
    from train.models import set_se_linear

    torch.manual_seed(0)
    model = build_model("mobilenetv3_small-2-22121111211", 10, 64)
    torch.manual_seed(0)
    setting, last = _mobilenet_v3_conf("mobilenet_v3_small")
    plain = MobileNetV3(setting, last, num_classes=10, block=partial(InvertedResidual),
                        norm_layer=partial(torch.nn.BatchNorm2d, eps=0.001, momentum=0.1))
    theirs, ours = plain.state_dict(), model.state_dict()
    assert list(theirs) == list(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert set_se_linear(model, True) == 9  # every squeeze-excitation of MobileNetV3-small
    x = torch.randn(4, 3, 64, 64)
    for train in (True, False):
        model.train(train)
        torch.manual_seed(1)
        linear = model(x)
        set_se_linear(model, False)
        torch.manual_seed(1)
        conv = model(x)
        set_se_linear(model, True)
        torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-5)
    graphs = []
    for on in (True, False):
        set_se_linear(model, on)
        g = onnx.load(str(export_for_analysis(model, 64, tmp_path / f"{on}.onnx"))).graph
        graphs.append(([n.op_type for n in g.node], sorted(i.name for i in g.initializer)))
    assert graphs[0] == graphs[1] and graphs[0][0].count("Conv") > 40 and "Gemm" in graphs[0][0]

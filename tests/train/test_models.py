import pytest
import torch

from redistill.errors import UserError
from train.config import load_config
from train.models import FAMILIES, build_model, parse_arch
from train.trainer import build_student

PAPER_PAIRS = ["mobilenetv2_x4", "mobilenetv2_x8", "mobilenetv3_small_x4", "resnext18_x4"]


@pytest.mark.parametrize("preset", PAPER_PAIRS)
def test_paper_pairs_have_equal_total_stride_and_matching_red_shapes(preset):
    cfg = load_config(preset)
    t, s = parse_arch(cfg.teacher.arch), parse_arch(cfg.student.arch)
    assert t.total_stride == s.total_stride == 16
    assert s.stem in (4, 8) and t.stem == 1
    teacher = build_model(cfg.teacher.arch, 10, 128)
    student, plans = build_student(cfg, 10, teacher)  # raises on any H x W mismatch
    assert len(plans) == len(cfg.red.sites)
    # the student's own shapes agree with the teacher's at every site
    x = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        assert student.eval()(x).shape == (1, 10)


@pytest.mark.parametrize("name,shape", [
    ("mobilenetv2-2-1122111", (1, 7)),
    ("mobilenetv3_small-8-11111111121", (1, 7)),
    ("resnet18-4-11111", (1, 7)),
    ("resnet50-8-11221", (1, 7)),
    ("resnext18-2-12211", (1, 7)),
])
def test_any_valid_stride_schedule_builds(name, shape):
    m = build_model(name, num_classes=7, image_size=64).eval()
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 64, 64)).shape == shape
    assert str(parse_arch(name)) == name


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


def test_every_family_has_a_buildable_default():
    for fam in FAMILIES.names():
        name = FAMILIES.get(fam).default
        assert build_model(name, 10, 64) is not None

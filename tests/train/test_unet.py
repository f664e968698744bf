"""The DDPM U-Net family: shapes for every stride schedule, RED sites of equal H x W, memory of the paper's pair."""

import pytest
import torch

from redistill.errors import UserError
from train.config import load_config
from train.models import build_model, example_inputs, input_names, parse_arch, task_of
from train.red import plan_sites
from train.design import build_student
from train.trainer import TeacherTap

TINY = dict(ch=16, ch_mult=[1, 2, 2, 2], attn=[1], num_res_blocks=1, dropout=0.0)


@pytest.mark.parametrize("arch", ["unet-1-222", "unet-2-221", "unet-2-222", "unet-4-211", "unet-1-111", "unet-2-122"])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_equals_input_for_every_stride_schedule(arch, size):
    torch.manual_seed(0)
    net = build_model(arch, 0, size, **TINY).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        eps = net(x, torch.tensor([3.0, 999.0]))
    assert eps.shape == x.shape
    assert torch.isfinite(eps).all()


def test_three_levels_and_class_conditioning():
    net = build_model("unet-2-22", 10, 32, ch=16, ch_mult=[1, 2, 2], attn=[], num_res_blocks=1).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = net(x, torch.tensor([5.0, 5.0]), torch.tensor([0, 1]))
        b = net(x, torch.tensor([5.0, 5.0]))  # no label: the "no label" token
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert input_names(net) == ["x", "t", "y"] and len(example_inputs(net, 32)) == 3


def test_teacher_and_student_have_the_same_modules_only_strides_differ():
    t = build_model("unet-1-222", 0, 32, **TINY)
    s = build_model("unet-2-221", 0, 32, **TINY)
    ts, ss = t.state_dict(), s.state_dict()
    assert set(ts) == set(ss)
    differ = [k for k in ts if ts[k].shape != ss[k].shape]
    assert differ == ["tail.2.weight", "tail.2.bias"]  # 3 * A * A output channels before the pixel shuffle


def test_digit_count_and_task_errors():
    assert task_of("unet-1-222") == "denoise" and task_of("resnet18-1-21222") == "classify"
    with pytest.raises(UserError, match="one digit per level"):
        build_model("unet-1-22", 0, 32, **TINY)
    with pytest.raises(UserError, match="Did you mean 'unet-1-222'"):
        parse_arch("unte-1-222")
    with pytest.raises(UserError, match="unet denoiser"):
        load_config("ddpm_bench", ["method=kd"])
    with pytest.raises(UserError, match="unet.ch_mult has 4 levels"):
        load_config("ddpm_bench", ["student.arch=unet-2-22"])
    with pytest.raises(UserError, match="classifier vs denoiser"):
        load_config("ddpm_bench", ["teacher.arch=resnet18-1-21222"])
    with pytest.raises(UserError, match="Did you mean 'unet.num_res_blocks'"):
        load_config("ddpm_bench", ["unet.num_res_block=3"])


@pytest.mark.parametrize("preset", ["ddpm_cifar10_x2", "ddpm_bench"])
def test_red_sites_match_teacher_tensors_of_equal_hw(preset):
    cfg = load_config(preset, [f"unet.ch={16}", "unet.norm_groups=8"])
    from train.config import build_kwargs

    teacher = build_model(cfg.teacher.arch, 0, 32, **build_kwargs(cfg, cfg.teacher)).eval()
    student, plans = build_student(cfg, 0, teacher)
    assert [p.key for p in plans] == ["head:out", "down.0.1:out", "down.1.2:out", "up.1.2:out", "up.0.2:out"]
    tap = TeacherTap(teacher, plans)
    for b in student.modules():
        if hasattr(b, "record"):
            b.record = True
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 700.0])
    _, t_feats = tap(x, t)
    student.eval()
    with torch.no_grad():
        student(x, t)
    from train.trainer import _blocks_in_plan_order

    for p, block in zip(plans, _blocks_in_plan_order(student, plans)):
        s_shape, t_shape = block.last.shape, t_feats[p.key].shape
        assert s_shape[-2:] == t_shape[-2:] == p.hw, p.key
    assert {p.hw for p in plans} == {(16, 16), (8, 8)}


def test_mismatched_red_site_names_both_shapes():
    teacher = build_model("unet-1-222", 0, 32, **TINY)
    student = build_model("unet-2-221", 0, 32, **TINY)
    with pytest.raises(UserError, match="pick a teacher layer of equal H x W"):
        plan_sites(student, teacher, [{"student": "head", "teacher": "down.0.0"}], 32, 1.0)


def test_paper_pair_theoretical_peak_is_at_least_3_5x_lower():
    """The issue's acceptance: student+RED vs teacher, one denoising step, 32 px, FP32, batch 1, paper width 128."""
    from train.design import analyze_model, pair_designs

    designs, _ = pair_designs("ddpm_cifar10_x2", 32)
    peaks = {label: analyze_model(m, 32).peak_bytes for label, m in designs}
    assert peaks["teacher"] / peaks["student+RED"] >= 3.5
    assert peaks["student+RED"] >= peaks["student"]  # RED blocks are counted, not hidden

"""The DDPM U-Net family: shapes for every stride schedule, RED sites of equal H x W, memory of the paper's pair."""

import pytest
import torch

from redistill.errors import UserError
from train.config import load_config
from train.models import build_model, example_inputs, input_names, parse_arch, task_of
from train.red import plan_sites
from train.design import build_student
from train.step import TeacherTap

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


#: the paper code's DDPM sites (pipeline_diffusion/config/reedx2_dist_config.yaml), transcribed: student layer ->
#: (teacher layer of its input-side block, of its output-side block); None = no block on that side
PAPER_CONFIG = {"head": (None, "downblocks.2"), "downblocks.2": ("downblocks.5", "downblocks.5"),
                "downblocks.5": ("downblocks.8", "downblocks.8"), "upblocks.7": ("upblocks.3", "upblocks.3"),
                "upblocks.11": ("upblocks.7", "upblocks.7"), "tail": ("upblocks.11", None)}
#: each site of the paper placement here (student key, teacher layer and side, H x W at 32 px)
PAPER_SITES = [("head:out", "down.1.0", "out", 16), ("down.1.0:in", "down.2.0", "in", 16),
               ("down.1.0:out", "down.2.0", "out", 8), ("down.2.0:in", "down.3.0", "in", 8),
               ("down.2.0:out", "down.3.0", "out", 4), ("up.2.3:in", "up.3.3", "in", 4),
               ("up.2.3:out", "up.3.3", "out", 8), ("up.1.3:in", "up.2.3", "in", 8),
               ("up.1.3:out", "up.2.3", "out", 16), ("tail:in", "up.1.3", "in", 16)]
OUTPUT_SITES = [("head:out", "down.1.0", "out", 16), ("down.0.1:out", "down.1.2", "out", 16),
                ("down.1.2:out", "down.2.2", "out", 8), ("up.1.2:out", "up.2.2", "out", 8),
                ("up.0.2:out", "up.1.2", "out", 16)]


def _paper_module(name, levels=4, n=2):
    """The paper model's flat ``downblocks.K`` / ``upblocks.K`` (pipeline_diffusion/model.py UNet) as named here."""
    if "." not in name:
        return name
    path, k = name.split(".")
    order = []  # the paper's flat lists: down = per level n ResBlocks then a DownSample (not after the last level);
    if path == "downblocks":  # up = per level, top first, n + 1 ResBlocks then an UpSample (not after level 0)
        for i in range(levels):
            order += [f"down.{i}.{j + (i > 0)}" for j in range(n)] + ([f"down.{i + 1}.0"] if i < levels - 1 else [])
    else:
        for i in reversed(range(levels)):
            order += [f"up.{i}.{j}" for j in range(n + 1)] + ([f"up.{i}.{n + 1}"] if i > 0 else [])
    return order[int(k)]


def _pair(preset, *overrides):
    from train.config import build_kwargs

    cfg = load_config(preset, ["unet.ch=16", "unet.norm_groups=8", *overrides])
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.arch, 0, 32, **build_kwargs(cfg, cfg.teacher)).eval()
    student, plans = build_student(cfg, 0, teacher)
    return teacher, student.eval(), plans


def test_paper_placement_is_the_paper_codes():
    """``red.sites: paper`` for [2,2,2,1] against [1,2,2,2] gives exactly the paper's dist config, in its order."""
    want = []
    for layer, (t_in, t_out) in PAPER_CONFIG.items():
        for where, t in (("in", t_in), ("out", t_out)):
            if t is not None:
                want.append((_paper_module(layer), where, _paper_module(t), where))
    cfg = load_config("ddpm_cifar10_x2")
    assert [(s.student, s.where, s.teacher, s.teacher_where or s.where) for s in cfg.red.sites] == want
    assert len(want) == 10 and cfg.red.alpha == 1.0 and (cfg.loss.w_ce, cfg.loss.w_dist) == (0.5, 0.5)
    assert [s.student for s in load_config("ddpm_bench", ["red.sites=outputs"]).red.sites] == [
        "head", "down.0.1", "down.1.2", "up.1.2", "up.0.2"]


@pytest.mark.parametrize("preset", ["ddpm_cifar10_x2", "ddpm_bench"])
@pytest.mark.parametrize("placement", ["paper", "outputs"])
def test_red_sites_match_teacher_tensors_of_equal_hw(preset, placement):
    """The presets' default is the paper placement; each block sits at its module with the teacher's H x W."""
    teacher, student, plans = _pair(preset, *([] if placement == "paper" else ["red.sites=outputs"]))
    expected = PAPER_SITES if placement == "paper" else OUTPUT_SITES
    assert [(p.key, p.teacher, p.teacher_where, p.hw) for p in plans] == [(k, t, tw, (h, h)) for k, t, tw, h in expected]
    tap = TeacherTap(teacher, plans)
    for b in student.modules():
        if hasattr(b, "record"):
            b.record = True
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 700.0])
    _, t_feats = tap(x, t)
    with torch.no_grad():
        student(x, t)
    from train.step import blocks_in_plan_order

    modules = dict(student.named_modules())
    for p, block in zip(plans, blocks_in_plan_order(student, plans)):
        site = modules[p.student]
        assert block is (site.red_in if p.where == "in" else site.red_out), p.key
        assert block.last.shape[-2:] == t_feats[p.key].shape[-2:] == p.hw, p.key


def _skips(model, x, t, num_res_blocks=2):
    """{up block: the skip tensor it concatenates}: the trailing channels of each up residual block's input."""
    got, handles = {}, []
    for name, m in model.named_modules():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "up" and int(parts[2]) <= num_res_blocks:
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: got.__setitem__(name, args[0])))
    with torch.no_grad():
        out = model(x, t)
    for h in handles:
        h.remove()
    return got, out


def _paper_hooked(student):
    """The student wired as the paper's reed/hooks.py DistillationHook wires it: the same RED blocks, taken out of
    their ``REDSite`` and run by a forward pre-hook (replaces the layer's input) or a forward hook (replaces its
    output, returned as ``.clone()``) on the plain layer."""
    import copy

    from train.red import REDSite

    net = copy.deepcopy(student)
    for name, site in [(n, m) for n, m in net.named_modules() if isinstance(m, REDSite)]:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        if child.isdigit():
            parent[int(child)] = site.layer
        else:
            setattr(parent, child, site.layer)
        if site.red_in is not None:
            site.layer.register_forward_pre_hook(lambda mod, args, b=site.red_in: (b(args[0]),) + tuple(args[1:]))
        if site.red_out is not None:
            site.layer.register_forward_hook(lambda mod, args, out, b=site.red_out: b(out).clone())
    return net


@pytest.mark.parametrize("placement", ["paper", "outputs"])
def test_skip_connections_receive_what_the_papers_wiring_gives_them(placement):
    """Every skip a U-Net up block concatenates is the tensor the paper's hook wiring gives it, and: the head's RED
    output is on the skip; with the paper's placement the RED block on down.1.0's input is not (the skip keeps
    down.0.1's raw output), with the outputs placement down.0.1's RED output is."""
    _, student, plans = _pair("ddpm_bench", "unet.num_res_blocks=2", *([] if placement == "paper" else ["red.sites=outputs"]))
    g = torch.Generator().manual_seed(3)
    for b in student.modules():  # non-trivial BatchNorm statistics, so a RED block is far from the identity
        if isinstance(b, torch.nn.BatchNorm2d):
            b.running_mean.normal_(0, 0.5, generator=g)
            b.running_var.uniform_(0.5, 2.0, generator=g)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([10.0, 700.0])
    ours, out = _skips(student, x, t)
    paper, paper_out = _skips(_paper_hooked(student), x, t)
    assert set(ours) == set(paper) and len(ours) == 12
    for name in ours:
        assert torch.equal(ours[name], paper[name]), name
    assert torch.equal(out, paper_out)

    modules = dict(student.named_modules())
    raw = {}
    block = getattr(modules["down.0.1"], "layer", modules["down.0.1"])  # the residual block, inside any REDSite
    block.register_forward_hook(lambda mod, args, o: raw.__setitem__("down.0.1", o))
    for b in student.modules():
        if hasattr(b, "record"):
            b.record = True
    ours, _ = _skips(student, x, t)
    last = {p.key: (modules[p.student].red_in if p.where == "in" else modules[p.student].red_out).last for p in plans}

    def skip(up, ch):
        return ours[up][:, -ch:]

    c0 = last["head:out"].shape[1]
    assert torch.equal(skip("up.0.2", c0), last["head:out"])  # hs[0]: the head's RED output, in both placements
    if placement == "paper":
        assert torch.equal(skip("up.1.2", c0), last["down.1.0:out"])  # a DownSample's RED output is its skip
        assert torch.equal(skip("up.0.0", c0), raw["down.0.1"])  # the DownSample's input RED is not on the skip
        assert not torch.allclose(raw["down.0.1"], last["down.1.0:in"])
    else:
        assert torch.equal(skip("up.0.0", c0), last["down.0.1:out"])
        assert not torch.allclose(raw["down.0.1"], last["down.0.1:out"])


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


def test_one_epoch_distillation_with_the_paper_placement_trains_and_exports(tiny_images, tmp_path, one_thread):
    """A tiny ddpm_bench run (the paper placement, its default) trains one epoch and exports a verified bundle
    whose 10 RED blocks' BatchNorms are all folded into their convs."""
    import onnx

    from export.bundle import verify_bundle
    from export.pipeline import ExportOptions, run_export
    from train.checkpoint import load_checkpoint
    from train.trainer import run_distill

    cfg = load_config("ddpm_bench", [f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=paper", "epochs=1",
                                     "unet.ch=8", "unet.norm_groups=4", "unet.dropout=0.0", "diffusion.timesteps=50",
                                     "data.train_subset=0", "data.test_subset=0", "data.batch_size=16",
                                     "data.val_fraction=0.1", "device=cpu", "log_every=0"])
    summary = run_distill(cfg)
    ck = load_checkpoint(tmp_path / "paper" / "student" / "best.pt")
    assert [f"{s['student']}:{s['where']}" for s in ck["red"]["sites"]] == [k for k, *_ in PAPER_SITES]
    assert summary["student"]["best"]["test_diffusion_loss"] > 0
    path, m = run_export(ExportOptions(str(tmp_path / "paper" / "student" / "best.pt"), out=str(tmp_path / "bundle"),
                                       verify_images=4, reference_images=2, quiet=True))
    verify_bundle(path)
    assert m["model"]["red_blocks"] == 10 and m["verification"]["fp32"]["passed"]
    assert m["onnx"]["batchnorm_folding"] == {"into_conv": 20, "as_affine": 0}
    assert not [n for n in onnx.load(str(path / "model.onnx")).graph.node if n.op_type == "BatchNormalization"]

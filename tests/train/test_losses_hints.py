"""FitNet, AT and the paper's RED+KD weighting: hand-computed losses, the taps and regressors, tiny real runs."""

import math

import pytest
import torch

from redistill.cli import main
from redistill.errors import UserError
from train.checkpoint import load_checkpoint
from train.config import load_config
from train.design import build_student
from train.hints import REGRESSOR_KEY, ConvReg
from train.losses import LossInputs, at_loss, fitnet_loss, kd_loss, total_loss
from train.models import build_model
from train.optim import make_optimizer
from train.red import REDSite, SitePlan
from train.tasks import ClassifyTask
from train.step import TeacherTap

TINY = ["data.batch_size=8", "data.eval_batch_size=16", "data.val_fraction=0.1"]
PLANS = [SitePlan("a", "out", "x", "out", alpha=50.0), SitePlan("b", "in", "z", "in", alpha=10.0)]


def test_fitnet_loss_is_the_hint_mse_averaged_over_sites():
    s = torch.tensor([[[[1.0, 2.0]]]])
    t = torch.tensor([[[[2.0, 0.0]]]])
    b = LossInputs(torch.zeros(1, 2), student_feats={"a:out": s, "b:in": s}, teacher_feats={"a:out": t, "b:in": s},
                   plans=PLANS)
    # site a: ((1-2)^2 + (2-0)^2) / 2 = 2.5; site b: identical -> 0; mean 1.25
    assert fitnet_loss(b).item() == pytest.approx(1.25)
    loss, parts = total_loss("fitnet", torch.tensor(2.0), LossInputs(**{**b.__dict__, "weights": {"fitnet": 100.0}}),
                             0.5, 0.5)
    assert loss.item() == pytest.approx(0.5 * 2.0 + 0.5 * 100 * 1.25) and parts["fitnet"] == pytest.approx(1.25)


def test_fitnet_regresses_the_student_to_the_teacher_channels():
    reg = ConvReg(2, 3)
    with torch.no_grad():
        reg.conv.weight.zero_()
        reg.conv.bias.copy_(torch.tensor([1.0, -1.0, 2.0]))
    reg.eval()  # fresh BatchNorm statistics: y = x / sqrt(1 + eps)
    s, t = torch.randn(1, 2, 1, 2), torch.zeros(1, 3, 1, 2)
    b = LossInputs(torch.zeros(1, 2), student_feats={"a:out": s}, teacher_feats={"a:out": t}, plans=PLANS[:1],
                   regressors={"a:out": reg})
    # regressed map: relu([1, -1, 2] / sqrt(1 + 1e-5)) per position -> squares 1 and 4 over 3 channels
    assert fitnet_loss(b).item() == pytest.approx(5 / 3 / (1 + 1e-5), rel=1e-5)
    with pytest.raises(UserError, match="regressor"):
        fitnet_loss(LossInputs(torch.zeros(1, 2), student_feats={"a:out": s}, teacher_feats={"a:out": t}, plans=PLANS[:1]))


def test_at_loss_is_the_attention_map_distance_summed_over_sites():
    s = torch.tensor([[[[1.0, 3.0]], [[3.0, 5.0]]]])  # mean_c s^2 = [5, 17]
    t = torch.tensor([[[[4.0, 2.0]]]])  # t^2 = [16, 4]
    a_s = [5 / math.sqrt(5 ** 2 + 17 ** 2), 17 / math.sqrt(5 ** 2 + 17 ** 2)]
    a_t = [16 / math.sqrt(16 ** 2 + 4 ** 2), 4 / math.sqrt(16 ** 2 + 4 ** 2)]
    one = ((a_s[0] - a_t[0]) ** 2 + (a_s[1] - a_t[1]) ** 2) / 2
    b = LossInputs(torch.zeros(1, 2), student_feats={"a:out": s, "b:in": s}, teacher_feats={"a:out": t, "b:in": t},
                   plans=PLANS)
    assert at_loss(b).item() == pytest.approx(2 * one, rel=1e-5)
    loss, _ = total_loss("at_kd", torch.tensor(1.0), LossInputs(**{**b.__dict__, "teacher_logits": torch.zeros(1, 2),
                                                                   "weights": {"at": 1000.0}}), 0.5, 0.5)
    # KD of equal logits is 0: D = mean(1000 * AT, 0)
    assert loss.item() == pytest.approx(0.5 + 0.5 * (1000 * 2 * one) / 2, rel=1e-5)


def test_red_kd_paper_averages_every_block_and_kd_as_one_mean():
    y = torch.tensor([[[[1.0, 3.0]], [[3.0, 5.0]]]])
    t = torch.tensor([[[[4.0, 2.0]]]])
    s_log, t_log = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 1.0]])
    b = LossInputs(s_log, t_log, {"a:out": y, "b:in": y}, {"a:out": t, "b:in": y}, PLANS, "cosine", temperature=2.0)
    kd = kd_loss(b).item()
    ce = torch.tensor(3.0)
    # RED blocks: a = 50 * (1 - cos([2, 4], [4, 2])) = 50 * 0.2 = 10, b = 0
    paper, parts = total_loss("red_kd_paper", ce, b, 0.5, 0.5)
    assert paper.item() == pytest.approx(0.5 * 3 + 0.5 * (10 + 0 + kd) / 3, rel=1e-5)
    assert parts["red"] == pytest.approx(5.0, abs=1e-4) and parts["kd"] == pytest.approx(kd)
    one_to_one, _ = total_loss("red_kd", ce, b, 0.5, 0.5)
    assert one_to_one.item() == pytest.approx(0.5 * 3 + 0.5 * ((10 + 0) / 2 + kd) / 2, rel=1e-5)


def test_the_paper_weighting_takes_its_own_kd_temperature():
    cfg = load_config("quick", ["method=red_kd_paper"])
    assert cfg.loss.red_kd_paper_temperature == 2.0 and cfg.loss.kd_temperature == 4.0
    with pytest.raises(UserError, match="red_kd_paper_temperature"):
        load_config("quick", ["method=red_kd_paper", "loss.red_kd_paper_temperature=0"])
    for key in ("loss.fitnet_weight=-1", "loss.at_weight=-1", "loss.at_p=0"):
        with pytest.raises(UserError, match=key.split("=")[0]):
            load_config("quick", ["method=fitnet", key])


def test_tap_methods_keep_the_student_plain_and_check_sites_early():
    cfg = load_config("quick", ["method=fitnet"])
    teacher = build_model(cfg.teacher.arch, 4, 32)
    student, plans = build_student(cfg, 4, teacher)
    assert plans == [] and not any(isinstance(m, REDSite) for m in student.modules())
    assert len(cfg.red.sites) == 5
    bad = load_config("quick", ["method=at", "red.sites=[{student: features.0.0, teacher: features.9.block.1.0}]"])
    with pytest.raises(UserError, match="pick a teacher layer of equal H x W"):
        build_student(bad, 4, teacher)


def test_tap_methods_refuse_a_denoiser():
    with pytest.raises(UserError, match="applies to classifiers only"):
        load_config("ddpm_bench", ["method=fitnet"])


def _fitnet_task(method="fitnet"):
    torch.manual_seed(0)
    cfg = load_config("quick", [f"method={method}"])
    teacher = build_model(cfg.teacher.arch, 4, 32)
    student, plans = build_student(cfg, 4, teacher)
    task = ClassifyTask(cfg, method, TeacherTap(teacher, plans), plans, {}, num_classes=4)
    task.attach(student)
    return cfg, student, task


def test_fitnet_regressors_train_with_the_student_and_are_saved():
    cfg, student, task = _fitnet_task()
    regs = task.trainable_modules()
    assert len(regs) == 1 and len(regs[0]) == 5
    opt = make_optimizer(cfg, torch.nn.ModuleList([student, *regs]))
    before = [p.detach().clone() for p in regs[0].parameters()]
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    loss, parts, _ = task.batch_loss(student, x, y, torch.Generator())
    assert parts["fitnet"] > 0 and task.taps.student == {} and task.taps.teacher == {}
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, regs[0].parameters()))
    saved = task.extra_state()[REGRESSOR_KEY]
    _, _, fresh = _fitnet_task()
    fresh.load_extra({REGRESSOR_KEY: saved})
    for a, b in zip(fresh.regressors.state_dict().values(), regs[0].state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="no FitNet regressors"):
        fresh.load_extra({})


def test_at_has_no_trainable_extras_and_taps_only_while_training():
    _, student, task = _fitnet_task("at")
    assert task.trainable_modules() == [] and task.extra_state() == {}
    with torch.no_grad():
        student.eval()(torch.randn(2, 3, 32, 32))
    assert task.taps.student == {}  # the hooks record only inside batch_loss


@pytest.fixture(scope="module")
def teacher_ckpt(tiny_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["distill", "quick", "method=teacher", f"data.root={tiny_images}", f"out_dir={out}", "name=t",
                 "epochs=1", *TINY]) == 0
    return out / "t" / "teacher" / "best.pt"


@pytest.mark.parametrize("method", ["fitnet", "fitnet_kd", "at", "at_kd", "red_kd_paper"])
def test_one_epoch_of_each_new_method(method, tiny_images, teacher_ckpt, tmp_path, one_thread):
    assert main(["distill", "quick", f"method={method}", f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=s",
                 "epochs=1", f"teacher.checkpoint={teacher_ckpt}", *TINY]) == 0
    ck = load_checkpoint(tmp_path / "s" / "student" / "last.pt")
    hist = ck["history"]
    assert ck["method"] == method and len(hist) == 1 and math.isfinite(hist[0]["train_loss"])
    losses = {"fitnet": ["fitnet"], "fitnet_kd": ["fitnet", "kd"], "at": ["at"], "at_kd": ["at", "kd"],
              "red_kd_paper": ["red", "kd"]}[method]
    assert all(f"train_{n}" in hist[0] for n in losses)
    assert (REGRESSOR_KEY in ck) == method.startswith("fitnet")
    assert bool(ck["red"]["sites"]) == (method == "red_kd_paper")  # only RED methods keep blocks in the student


def test_a_resumed_fitnet_run_restores_its_regressors(tiny_images, teacher_ckpt, tmp_path, one_thread):
    # a constant learning rate (milestone past the end) makes 1 + 1 resumed epochs equal 2 epochs
    common = ["method=fitnet", f"data.root={tiny_images}", f"teacher.checkpoint={teacher_ckpt}", "recipe=paper_student",
              "optim.milestones=[0.99]", *TINY]
    assert main(["distill", "quick", *common, f"out_dir={tmp_path / 'full'}", "name=r", "epochs=2"]) == 0
    assert main(["distill", "quick", *common, f"out_dir={tmp_path / 'cut'}", "name=r", "epochs=1"]) == 0
    assert main(["distill", "quick", *common, f"out_dir={tmp_path / 'cut'}", "name=r", "epochs=2", "--resume"]) == 0
    a = load_checkpoint(tmp_path / "full" / "r" / "student" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "r" / "student" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = a[REGRESSOR_KEY]["state"], b[REGRESSOR_KEY]["state"]
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    # the optimizer holds the student's parameters and the 5 regressors' (conv weight and bias, BN weight and bias)
    n_student = len(list(build_model(a["arch"], 4, 32).parameters()))
    assert sum(len(g["params"]) for g in b["optimizer"]["param_groups"]) == n_student + 5 * 4

"""Training denoisers with the one trainer: the loss falls, RED + diffusion, EMA, exact resume, evaluate."""

import json

import pytest
import torch

from redistill.cli import main as cli_main
from redistill.errors import UserError
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import build_kwargs, load_config
from train.diffusion import Diffusion
from train.models import build_model
from train.tasks import DenoiseTask
from train.design import build_student
from train.step import TeacherTap
from train.trainer import run_distill

SMALL = ["unet.ch=8", "unet.num_res_blocks=2", "unet.norm_groups=4", "unet.dropout=0.0", "diffusion.timesteps=50"]


def _cfg(root, out, *extra):
    return load_config("ddpm_bench", [f"data.root={root}", f"out_dir={out}", "name=r", "data.train_subset=0",
                                      "data.test_subset=0", "data.batch_size=16", "data.val_fraction=0.1", "epochs=2",
                                      "device=cpu", "diffusion.ema_decay=0.9", *SMALL, *extra])


def _batch(n=8):
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(-0.8, 0.8, n).view(n, 1, 1, 1)
    return (base + 0.1 * torch.randn(n, 3, 32, 32, generator=g)).clamp(-1, 1)


def _fixed_loss(model, diffusion, x):
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, diffusion.T, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(diffusion.q_sample(x, t, noise), t.float()), noise))


def test_a_few_training_steps_lower_the_loss(tmp_path):
    cfg = _cfg(tmp_path, tmp_path, "method=red")
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher.arch, 0, 32, **build_kwargs(cfg, cfg.teacher)).eval()
    student, plans = build_student(cfg, 0, teacher)
    from train.step import blocks_in_plan_order

    blocks = {p.key: b for p, b in zip(plans, blocks_in_plan_order(student, plans))}
    task = DenoiseTask(cfg, "red", TeacherTap(teacher, plans), plans, blocks)
    task.attach(student)
    x, y = _batch(), torch.zeros(8, dtype=torch.long)
    before = _fixed_loss(student.eval(), task.diffusion, x)
    opt = torch.optim.Adam(student.parameters(), 2e-3)
    student.train()
    for b in blocks.values():
        b.record = True
    parts_seen = []
    for step in range(40):
        loss, parts, _ = task.batch_loss(student, x, y, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.after_step(student)
        parts_seen.append(parts)
    after = _fixed_loss(student.eval(), task.diffusion, x)
    assert after < before * 0.9, (before, after)
    assert set(parts_seen[0]) == {"diffusion", "red"}
    # 0.5 * diffusion + 0.5 * RED is what was minimised
    assert parts_seen[-1]["red"] < parts_seen[0]["red"]
    # EMA weights moved towards the trained ones but are not them
    ema, raw = task.ema.state_dict(), student.state_dict()
    k = "head.layer.weight"
    assert not torch.equal(ema[k], raw[k])


def test_teacher_sees_the_same_noisy_input_as_the_student(tmp_path):
    cfg = _cfg(tmp_path, tmp_path, "method=red")
    teacher = build_model(cfg.teacher.arch, 0, 32, **build_kwargs(cfg, cfg.teacher)).eval()
    student, plans = build_student(cfg, 0, teacher)
    seen = {}
    teacher.register_forward_pre_hook(lambda m, inp: seen.setdefault("teacher", inp))
    student.register_forward_pre_hook(lambda m, inp: seen.setdefault("student", inp))
    from train.step import blocks_in_plan_order

    blocks = {p.key: b for p, b in zip(plans, blocks_in_plan_order(student, plans))}
    for b in blocks.values():
        b.record = True
    task = DenoiseTask(cfg, "red", TeacherTap(teacher, plans), plans, blocks)
    task.batch_loss(student, _batch(4), torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(0))
    for a, b in zip(seen["teacher"], seen["student"]):
        assert torch.equal(a, b)


def test_interrupted_denoiser_run_resumes_to_the_same_weights_and_ema(tiny_images, tmp_path, monkeypatch):
    full = run_distill(_cfg(tiny_images, tmp_path / "full", "method=red", "teacher.epochs=1"))
    assert full["student"]["best"]["test_diffusion_loss"] > 0

    import train.trainer as T

    real_write = T._write_metrics
    calls = {"n": 0}

    def write_then_die(path, history):
        real_write(path, history)
        calls["n"] += 1
        if "student" in str(path) and len(history) == 1:
            raise KeyboardInterrupt  # killed after the student's first epoch was saved

    monkeypatch.setattr(T, "_write_metrics", write_then_die)
    cfg = _cfg(tiny_images, tmp_path / "split", "method=red", "teacher.epochs=1")
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg)
    monkeypatch.setattr(T, "_write_metrics", real_write)
    with pytest.raises(UserError, match="--resume"):
        run_distill(cfg)
    run_distill(cfg, resume=True)
    a = load_checkpoint(tmp_path / "full" / "r" / "student" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "r" / "student" / "last.pt")
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert a["ema_updates"] == b["ema_updates"] > 0
    assert [h["epoch"] for h in b["history"]] == [1, 2]


def test_checkpoint_carries_schedule_and_ema_and_evaluate_reports_denoising_loss(tiny_images, tmp_path, capsys):
    summary = run_distill(_cfg(tiny_images, tmp_path, "method=teacher", "epochs=1"))
    path = tmp_path / "r" / "teacher" / "best.pt"
    ck = load_checkpoint(path)
    assert ck["task"] == "denoise" and ck["num_classes"] == 0
    assert ck["diffusion"] == {"schedule": "linear", "timesteps": 50, "beta_start": 1e-4, "beta_end": 0.02}
    assert ck["build_kwargs"]["ch"] == 8 and ck["mean"] == [0.5] * 3
    ema_model = model_from_checkpoint(ck)
    raw_model = model_from_checkpoint(ck, weights="raw")
    assert not torch.equal(ema_model.head.weight, raw_model.head.weight)
    assert Diffusion.make(**ck["diffusion"]).T == 50
    capsys.readouterr()
    assert cli_main(["evaluate", str(path), "--json", str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["diffusion_loss"] == pytest.approx(summary["teacher"]["best"]["test_diffusion_loss"], abs=1e-5)


def test_class_conditional_training_with_label_dropout(tiny_images, tmp_path):
    run_distill(_cfg(tiny_images, tmp_path, "method=teacher", "epochs=1", "diffusion.conditional=true",
                     "diffusion.p_uncond=0.5"))
    ck = load_checkpoint(tmp_path / "r" / "teacher" / "best.pt")
    assert ck["num_classes"] == 4
    model = model_from_checkpoint(ck)
    assert model.label.num_embeddings == 5  # 4 classes + the "no label" token of classifier-free guidance

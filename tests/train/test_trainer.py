import json
import signal
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

from redistill.cli import main
from redistill.errors import UserError
from tests.conftest import PYTHON, REPO, cli_env
from train.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint
from train.config import load_config
from train.losses import LossInputs, total_loss
from train.models import build_model
from train.design import build_student
from train.optim import lr_at, make_optimizer
from train.step import TeacherTap

TINY = ["data.batch_size=8", "data.eval_batch_size=16", "data.val_fraction=0.1", "optim.warmup_epochs=0"]


def test_training_step_lowers_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = load_config("quick", ["method=red_kd", "optim.lr=0.01"])
    teacher = build_model(cfg.teacher.arch, 4, 32)
    student, plans = build_student(cfg, 4, teacher)
    tap = TeacherTap(teacher, plans)
    blocks = {p.key: b for p, b in zip(plans, [m for m in student.modules() if type(m).__name__ == "REDBlock"])}
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt = make_optimizer(cfg, student)
    student.train()

    def step():
        for b in blocks.values():
            b.record = True
        tl, tf = tap(x)
        logits = student(x)
        # blocks are keyed by their site; recover them through the REDSite they sit in
        feats = {}
        for n, m in student.named_modules():
            if type(m).__name__ == "REDSite":
                if m.red_in is not None:
                    feats[f"{n}:in"] = m.red_in.last
                if m.red_out is not None:
                    feats[f"{n}:out"] = m.red_out.last
        loss, parts = total_loss("red_kd", F.cross_entropy(logits, y),
                                 LossInputs(logits, tl, feats, tf, plans, "cosine", 4.0), 0.5, 0.5)
        return loss, parts

    first, parts = step()
    assert {"ce", "red", "kd"} <= set(parts) and parts["red"] > 0
    for _ in range(6):
        loss, _ = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last, _ = step()
    assert last.item() < first.item()


def _distill_cmd(data, out, *extra):
    return [PYTHON, "-m", "redistill.cli", "distill", "quick", "method=student",
            f"data.root={data}", f"out_dir={out}", "name=r", *TINY, *extra]


def _weights(path):
    return load_checkpoint(path)["model"]


def test_killed_run_resumes_to_the_same_weights(tiny_images, tmp_path):
    epochs = "epochs=4"
    full = subprocess.run(_distill_cmd(tiny_images, tmp_path / "full", epochs), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_distill_cmd(tiny_images, killed_dir, epochs), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "r" / "student" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists(), "the run never wrote its first checkpoint"
    done = load_checkpoint(last)["epoch"]
    assert done < 4, "the run finished before it could be killed; the test proves nothing"

    # without --resume the existing run is protected
    again = subprocess.run(_distill_cmd(tiny_images, killed_dir, epochs), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run(_distill_cmd(tiny_images, killed_dir, epochs, "--resume"), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    a, b = _weights(tmp_path / "full" / "r" / "student" / "last.pt"), _weights(last)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    hist = [json.loads(l) for l in (killed_dir / "r" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]


def test_torchrun_two_gloo_processes_complete_an_epoch(tiny_images, tmp_path):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "redistill.cli",
           "distill", "quick", "method=student", "student.arch=mobilenetv3_small-4-22111111111",
           f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=ddp", "epochs=1", *TINY]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "ddp" / "student" / "last.pt")
    assert ck["epoch"] == 1
    hist = ck["history"]
    assert len(hist) == 1 and hist[0]["train_images_per_s"] > 0
    assert r.stdout.count("=== redistill distill: done ===") == 1  # only rank 0 reports


def test_distill_then_evaluate_end_to_end(tiny_images, tmp_path, capsys):
    rc = main(["distill", "quick", f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=e2e", "epochs=1",
               "method=red_kd", *TINY])
    assert rc == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "test top-1" in out
    assert "theoretical peak activation memory" in out and "x lower" in out
    summary = json.loads((tmp_path / "e2e" / "summary.json").read_text())
    assert summary["memory"]["reduction"] > 3
    ck = load_checkpoint(tmp_path / "e2e" / "student" / "best.pt")
    assert ck["arch"] == "mobilenetv3_small-4-22111111111" and ck["method"] == "red_kd"
    assert ck["classes"] == ["cat", "dog", "ship", "truck"] and len(ck["mean"]) == 3 and len(ck["red"]["sites"]) == 5
    model = model_from_checkpoint(ck)  # export needs nothing else
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    assert main(["evaluate", str(tmp_path / "e2e" / "student" / "best.pt"), "--data-root", str(tiny_images)]) == 0
    assert '"top1"' in capsys.readouterr().out
    # reuse the trained teacher instead of training another
    rc = main(["distill", "quick", f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=reuse", "epochs=1", *TINY,
               f"teacher.checkpoint={tmp_path / 'e2e' / 'teacher' / 'best.pt'}"])
    assert rc == 0 and not (tmp_path / "reuse" / "teacher").exists()


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path, capsys):
    rc = main(["distill", "quick", f"data.root={tmp_path / 'nope'}", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "nope" / "test") in err and "tar -xzf" in err and "data.root=" in err


def test_malformed_data_folder(tmp_path, capsys):
    (tmp_path / "d" / "test" / "only").mkdir(parents=True)
    rc = main(["distill", "quick", f"data.root={tmp_path / 'd'}", f"out_dir={tmp_path}"])
    assert rc == 2 and "one sub-folder per class" in capsys.readouterr().err


def test_corrupt_and_foreign_checkpoints_fail_clearly(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt or not a PyTorch file"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save(build_model("resnet18-4-11221", 10, 32).state_dict(), foreign)
    with pytest.raises(UserError, match="not a ReDistill checkpoint"):
        load_checkpoint(foreign)
    assert main(["evaluate", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("content", [b"hello\n", b""])
def test_any_non_checkpoint_file_is_one_line(tmp_path, capsys, content):
    """`echo hello > best.pt; redistill evaluate best.pt` raised KeyError: 101 inside torch.load."""
    p = tmp_path / "best.pt"
    p.write_bytes(content)
    assert main(["evaluate", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{p} is corrupt or not a PyTorch file" in err and "best.pt" in err


def test_checkpoint_missing_a_key_is_one_line(tmp_path):
    p = tmp_path / "best.pt"
    torch.save({"format": "redistill-checkpoint", "version": 1, "arch": "resnet18-4-11221"}, p)
    with pytest.raises(UserError, match=r"lacks role, method, .*model \(a damaged or hand-edited checkpoint\?\)"):
        load_checkpoint(p)


def test_checkpoint_with_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would run code on load is rejected, not executed."""
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"format": "redistill-checkpoint", "x": Evil()}, p)
    with pytest.raises(UserError, match="corrupt or not a PyTorch file"):
        load_checkpoint(p)


def test_checkpoint_roundtrip_keeps_metadata(tmp_path):
    m = build_model("resnet18-4-11221", 3, 32)
    p = save_checkpoint(make_payload(m, arch="resnet18-4-11221", role="student", method="student", num_classes=3,
                                     image_size=32, classes=["a", "b", "c"], mean=(0.5,) * 3, std=(0.25,) * 3,
                                     width_mult=1.0, plans=[], red_distance="cosine", config={}, epoch=1,
                                     history=[], best_val=0.0), tmp_path / "c.pt")
    assert not list(tmp_path.glob(".*.tmp"))
    ck = load_checkpoint(p)
    assert ck["classes"] == ["a", "b", "c"] and ck["std"] == [0.25] * 3
    torch.testing.assert_close(model_from_checkpoint(ck)(torch.ones(1, 3, 32, 32)), m.eval()(torch.ones(1, 3, 32, 32)))


def test_schedules_follow_their_definitions():
    cfg = load_config("quick", ["optim.name=sgd", "optim.lr=0.1", "optim.warmup_epochs=0", "optim.schedule=step",
                                "optim.milestones=[0.5,0.75]", "optim.gamma=0.2"])
    assert [round(lr_at(cfg, e, 8), 6) for e in (0, 3.9, 4, 6, 7.9)] == [0.1, 0.1, 0.02, 0.004, 0.004]
    cfg = load_config("quick", ["optim.lr=0.1", "optim.warmup_epochs=1", "optim.schedule=cosine"])
    assert lr_at(cfg, 0.5, 10) == pytest.approx(0.05, rel=1e-2)
    assert lr_at(cfg, 5, 10) == pytest.approx(0.05, rel=1e-6) and lr_at(cfg, 10, 10) == pytest.approx(0.0, abs=1e-9)


def test_cutmix_mixup_training_runs_with_soft_targets(tiny_images, tmp_path):
    rc = main(["distill", "quick", f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=mix", "epochs=1",
               "method=kd", "data.cutmix=0.2", "data.mixup=0.2", "data.augment=rrc_flip", "teacher.epochs=1", *TINY])
    assert rc == 0
    hist = load_checkpoint(tmp_path / "mix" / "student" / "last.pt")["history"]
    assert hist[0]["train_kd"] > 0 and hist[0]["train_loss"] > 0


def _finished_teacher(run_dir, cfg):
    """What a run whose teacher finished and whose student then failed leaves: config.yaml and teacher/summary.json."""
    import yaml

    (run_dir / "teacher").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (run_dir / "teacher" / "summary.json").write_text("{}")


@pytest.mark.parametrize("change, hint", [
    ("red.sites=[{student: features.0.0, where: out, teacher: features.2.block.1.0}]", True),
    ("method=kd", True),
    ("data.image_size=64", False),  # the teacher itself would differ
])
def test_resume_with_other_sites_says_the_teacher_can_be_reused(tmp_path, tiny_images, change, hint):
    from train.trainer import run_distill

    base = ["name=r", f"out_dir={tmp_path}", f"data.root={tiny_images}", "device=cpu"]
    _finished_teacher(tmp_path / "r", load_config("quick", base))
    with pytest.raises(UserError, match="--resume with a different") as e:
        run_distill(load_config("quick", [*base, change]), resume=True)
    reuse = f"teacher.checkpoint={tmp_path / 'r' / 'teacher' / 'best.pt'} name=NEW"
    assert (reuse in str(e.value)) == hint, str(e.value)
    (tmp_path / "r" / "teacher" / "summary.json").unlink()  # the teacher never finished: nothing to reuse
    with pytest.raises(UserError, match="--resume with a different") as e:
        run_distill(load_config("quick", [*base, change]), resume=True)
    assert "teacher.checkpoint=" not in str(e.value)


def test_site_check_leaves_the_training_seed_alone(tiny_images):
    """Planning on untrained networks must not shift the RNG: the student trained later starts from the same weights."""
    from train.trainer import check_networks

    cfg = load_config("quick", [f"data.root={tiny_images}"])
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    plans = check_networks(cfg, 4, None)
    assert len(plans) == 5 and torch.equal(torch.rand(3), expected)

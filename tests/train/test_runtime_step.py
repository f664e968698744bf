"""The distillation step with its speed changes: the folded teacher reads the same tensors, and each change
leaves one step's loss and gradients as they were (within float tolerance)."""

import copy

import pytest
import torch

from train.config import load_config
from train.models import build_model
from train.red import SitePlan
from train.step import TeacherTap, build_step, make_teacher_tap
from train.runtime import resolve_runtime
from train.tiny_conv import TinyMapConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _shake_batchnorm(model, seed=0):
    """Random BatchNorm statistics and affine parameters, so that folding is not the identity it is at init."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


#: taps of every kind a site can have: a conv's output (pre-BN, its fold must be skipped), a BN's input and
#: output, a whole block, a conv's input
TAPS = {
    "mobilenetv3_small-1-22121111211": [("features.2.block.1.0", "out"), ("features.4.block.1.0", "in"),
                                        ("features.4.block.1.1", "in"), ("features.9.block.1.1", "out"),
                                        ("features.9", "out"), ("features.0.0", "out")],
    "resnext18-1-21222": [("layer2.0", "in"), ("layer3.0", "out"), ("conv1", "out"), ("bn1", "in"),
                          ("layer4.0.conv1", "out")],
    "mobilenetv2-1-1222121": [("features.4.conv.1.0", "out"), ("features.7.conv.1.0", "in"),
                              ("features.14.conv.1.1", "out")],
}


@pytest.mark.parametrize("arch", sorted(TAPS))
def test_folded_teacher_gives_the_unfolded_features_and_logits(arch):
    torch.manual_seed(0)
    teacher = _shake_batchnorm(build_model(arch, 10, 32))
    plans = [SitePlan(f"s{i}", "out", name, where, 1.0) for i, (name, where) in enumerate(TAPS[arch])]
    plain = TeacherTap(copy.deepcopy(teacher), plans)
    for fmt in (torch.contiguous_format, torch.channels_last):
        folded = TeacherTap(copy.deepcopy(teacher), plans, fold=True, image_size=32, memory_format=fmt)
        assert folded.folded and not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.teacher.modules())
        x = torch.randn(4, 3, 32, 32)
        logits, feats = plain(x)
        f_logits, f_feats = folded(x.contiguous(memory_format=fmt))
        torch.testing.assert_close(f_logits, logits, rtol=1e-5, atol=1e-5)
        assert set(f_feats) == set(feats) == {p.key for p in plans}
        for k in feats:
            torch.testing.assert_close(f_feats[k], feats[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{arch} {k}: {m}")


@pytest.mark.parametrize("arch", sorted(TAPS))
def test_a_stopping_teacher_takes_the_same_tensors_and_skips_the_rest(arch):
    torch.manual_seed(0)
    teacher = _shake_batchnorm(build_model(arch, 10, 32))
    plans = [SitePlan(f"s{i}", "out", name, where, 1.0) for i, (name, where) in enumerate(TAPS[arch][:2])]
    ran = []
    modules = dict(teacher.named_modules())
    last = [n for n, m in teacher.named_modules() if isinstance(m, torch.nn.Linear)][-1]  # the classifier
    modules[last].register_forward_hook(lambda *a: ran.append(last))
    x = torch.randn(2, 3, 32, 32)
    logits, feats = TeacherTap(copy.deepcopy(teacher), plans)(x)
    stopping = TeacherTap(teacher, plans, stop=True)
    first, _ = stopping(x)  # the first pass runs whole, counting the taps
    torch.testing.assert_close(first, logits)
    ran.clear()
    out, s_feats = stopping(x)
    assert out is None and not ran and set(s_feats) == set(feats)
    for k in feats:
        torch.testing.assert_close(s_feats[k], feats[k], rtol=0, atol=0)
    torch.testing.assert_close(stopping.teacher(x), logits)  # the module called on its own runs whole


def test_a_tap_on_a_module_that_runs_twice_never_stops():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.act(self.conv(self.act(x))).mean((2, 3)))

    net = Twice().eval()
    plan = SitePlan("s", "out", "act", "out", 1.0)
    tap = TeacherTap(net, [plan], stop=True)
    x = torch.randn(2, 3, 8, 8)
    tap(x)
    out, feats = tap(x)
    assert not tap.stop and out is not None
    torch.testing.assert_close(feats[plan.key], torch.relu(net.conv(torch.relu(x))))  # the last call, as a whole pass


@pytest.mark.parametrize("method,stops", [("red", True), ("red_kd", False), ("kd", False), ("fitnet", False)])
def test_the_teacher_stops_only_when_no_loss_reads_its_output(method, stops):
    step = _step("mobilenetv3_small_x4", [f"method={method}"])
    tap = step.task.teacher
    assert tap.stop == stops
    r = step.run(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert torch.isfinite(r.loss)
    step.close()


def test_a_tapped_conv_keeps_its_batchnorm_apart():
    """Folding a tapped conv's BatchNorm into it would hand the tap the normalised tensor."""
    teacher = _shake_batchnorm(build_model("mobilenetv3_small-1-22121111211", 10, 32))
    plans = [SitePlan("s", "out", "features.2.block.1.0", "out", 1.0)]
    tap = TeacherTap(teacher, plans, fold=True, image_size=32)
    mods = dict(tap.teacher.named_modules())
    assert type(mods["features.2.block.1.1"]).__name__ == "ChannelAffine"
    assert isinstance(mods["features.4.block.1.1"], torch.nn.Identity)  # not tapped: folded into its conv


def test_the_run_keeps_every_configured_site_even_without_red_blocks():
    """FitNet/AT tap the configured sites with plans of their own: the run's tap keeps them all unfolded."""
    cfg = load_config("mobilenetv3_small_x4", ["data.image_size=32"])
    teacher = _shake_batchnorm(build_model(cfg.teacher.arch, 10, 32))
    tap = make_teacher_tap(cfg, teacher, [], resolve_runtime(cfg.runtime, torch.device("cpu")))
    mods = dict(tap.teacher.named_modules())
    for s in cfg.red.sites:
        assert isinstance(mods[s.teacher], torch.nn.Conv2d) and mods[s.teacher].bias is None, s.teacher


OFF = ["runtime.fold_teacher=false", "runtime.channels_last=false", "runtime.se_linear=false",
       "runtime.teacher_stop=false", "runtime.tiny_map_conv=false", "runtime.compile=false", "runtime.amp=none"]


def _step(preset, extra, teacher_state=None):
    torch.manual_seed(0)
    cfg = load_config(preset, ["data.image_size=32", "data.batch_size=8", "device=cpu", "runtime.threads=1",
                               "data.cutmix=0", "data.mixup=0", "optim.name=sgd", "optim.lr=0.05", *extra])
    teacher = build_model(cfg.teacher.arch, 10, 32)
    if teacher_state is not None:
        teacher.load_state_dict(teacher_state)
    step = build_step(cfg, num_classes=10, teacher=teacher.eval())
    return step


def _run(step, n=2):
    """Losses of ``n`` steps on seeded batches, and the weight change they made."""
    g = torch.Generator().manual_seed(1)
    w0 = {k: v.detach().clone() for k, v in step.model.state_dict().items()}
    losses = []
    for _ in range(n):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        torch.manual_seed(2)  # dropout
        losses.append(float(step.step(x, y, generator=torch.Generator().manual_seed(3))))
    step.close()
    return losses, {k: v.detach() - w0[k] for k, v in step.model.state_dict().items() if v.is_floating_point()}


def _same_updates(a, b, tol=1e-2):
    """Each tensor's change in ``a`` differs from its change in ``b`` by under ``tol`` of the change's size."""
    for k in b:
        scale = float(b[k].norm())
        assert float((a[k] - b[k]).norm()) <= tol * scale + 1e-6 * b[k].numel() ** 0.5, k


@pytest.mark.parametrize("preset", ["mobilenetv3_small_x4", "resnext18_x4"])
@pytest.mark.parametrize("change", ["runtime.fold_teacher=true", "runtime.channels_last=true",
                                    "runtime.se_linear=true", "runtime.teacher_stop=true",
                                    "runtime.tiny_map_conv=true", "all"])
def test_each_speed_change_keeps_the_step(preset, change):
    """One step's loss, and the weight change of two steps, as with every change off (float tolerance)."""
    teacher_state = _shake_batchnorm(build_model(load_config(preset).teacher.arch, 10, 32)).state_dict()
    base_losses, base_w = _run(_step(preset, OFF, teacher_state))
    on = [] if change == "all" else [*OFF, change]
    step = _step(preset, on, teacher_state)
    if change in ("all", "runtime.tiny_map_conv=true") and preset == "resnext18_x4":  # ends on 2 x 2 maps
        assert any(type(m) is TinyMapConv2d for m in step.model.modules())
    losses, w = _run(step)
    assert losses == pytest.approx(base_losses, rel=1e-4, abs=1e-5)
    _same_updates(w, base_w)


def test_build_step_exposes_what_a_benchmark_reads():
    step = _step("quick", [])
    assert step.plans and step.optimizer is not None and step.model.training
    assert step.runtime.channels_last and step.runtime.fold_teacher and step.task.teacher.folded
    assert step.model.features[3].block[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    r = step.run(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert r.loss.ndim == 0 and not r.loss.requires_grad and {"ce", "red"} <= set(r.parts)
    loss = step.step(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))  # what a benchmark times
    assert loss.ndim == 0 and not loss.requires_grad and float(loss) > 0
    step.close()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_runs_and_stays_close(amp):
    base, _ = _run(_step("quick", []), n=1)
    step = _step("quick", [f"runtime.amp={amp}"])
    assert (step.scaler is not None) == (amp == "fp16")
    low, _ = _run(step, n=1)
    assert low[0] == pytest.approx(base[0], rel=0.05)
    if amp == "fp16":
        assert set(step.extra_state()) == {"grad_scaler"}


def test_close_gives_the_thread_count_back():
    before = torch.get_num_threads()
    step = _step("quick", ["runtime.threads=2"])
    assert torch.get_num_threads() == 2
    step.close()
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_compiled_step_gives_the_eager_loss():
    """torch.compile (minutes on 2 CPU cores): the RED blocks' recorded outputs and the loss survive compilation."""
    eager, w_eager = _run(_step("quick", ["runtime.compile=false"]))
    compiled, w_comp = _run(_step("quick", ["runtime.compile=true"]))
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    _same_updates(w_comp, w_eager)


def test_a_failing_compile_falls_back_to_eager(monkeypatch, capsys):
    from torch._dynamo.exc import TorchDynamoException

    class Boom(TorchDynamoException):
        pass

    def compile_(net):
        def broken(*a, **k):
            raise Boom("no C++ compiler")
        return broken

    monkeypatch.setattr(torch, "compile", compile_)
    step = _step("quick", ["runtime.compile=true"])
    r = step.run(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert torch.isfinite(r.loss) and step.net is step.eager
    assert "torch.compile failed (Boom: no C++ compiler); the student runs eagerly" in capsys.readouterr().out
    step.close()


def test_a_compile_failing_in_the_backward_pass_falls_back_too(monkeypatch, capsys):
    """A backward compiled lazily (after a recompile) fails in loss.backward(), not in the forward pass."""
    from torch._dynamo.exc import TorchDynamoException

    class Boom(TorchDynamoException):
        pass

    def compile_(net):
        def lazily_broken(*a, **k):
            out = net(*a, **k)

            def fail(grad):
                raise Boom("backward compile failed")
            out.register_hook(fail)
            return out
        return lazily_broken

    monkeypatch.setattr(torch, "compile", compile_)
    step = _step("quick", ["runtime.compile=true"])
    r = step.run(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert torch.isfinite(r.loss) and step.net is step.eager
    assert any(p.grad is not None for p in step.model.parameters())
    assert "torch.compile failed (Boom: backward compile failed)" in capsys.readouterr().out
    step.close()

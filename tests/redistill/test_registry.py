"""Walk every registry: each entry must do its job, and each registry must have a check here."""

import importlib
import pkgutil

import numpy as np
import pytest
import torch

from redistill import registry
from redistill.errors import UserError

#: the packages whose modules fill registries; the device agent is standalone (standard library only)
PACKAGES = ("redistill", "train", "export", "bench", "deploy")
SKIP = ("deploy.agent",)


def _import_every_module():
    """Import every module of the packages, so no registry is missed and a module that fails to import fails here."""
    names = []
    for pkg in PACKAGES:
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            if not info.name.startswith(SKIP):
                importlib.import_module(info.name)
                names.append(info.name)
    return names


MODULES = _import_every_module()


def _check_architecture(name, fam):
    from train.models import build_model, example_inputs

    assert fam.name == name
    if fam.task == "denoise":  # epsilon has the input's shape
        net = build_model(fam.default, 0, 32, ch=16)
        assert net(*example_inputs(net, 32)).shape == (1, 3, 32, 32)
        return
    assert build_model(fam.default, 10, 64)(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def _check_schedule(name, fn):
    betas = fn(50, 1e-4, 0.02)
    assert betas.shape == (50,) and bool(((betas > 0) & (betas < 1)).all())


def _check_sampler(name, fn):
    from train.diffusion import Diffusion
    from train.models import build_model
    from train.sampling import sample

    net = build_model("unet-1-2", 0, 32, ch=16, ch_mult=[1, 2], attn=[], num_res_blocks=1)
    x = sample(net, Diffusion.make(timesteps=4), 2, name, steps=2, batch_size=2)
    assert x.shape == (2, 3, 32, 32) and bool(torch.isfinite(x).all())


def _check_distance(name, fn):
    y = torch.rand(2, 3, 4, 4)
    assert fn(y, y).abs().item() < 1e-5 and fn(y, -y).item() > 0


def _loss_inputs():
    from train.losses import LossInputs
    from train.red import SitePlan

    s, t = torch.randn(2, 3), torch.randn(2, 3)
    f = torch.rand(2, 2, 4, 4)
    return LossInputs(s, t, {"a:out": f}, {"a:out": f.flip(-1)}, [SitePlan("a", "out", "b", "out", 1.0)])


def _check_loss(name, loss):
    assert loss.name == name and torch.isfinite(loss.fn(_loss_inputs()))


def _check_method(name, method):
    from train.losses import DISTILL_LOSSES, total_loss

    assert method.name == name and method.label and method.marker
    losses = [DISTILL_LOSSES.get(n) for n in method.losses]
    assert method.needs_teacher == bool(losses) and not (method.teacher_only and losses)
    assert method.needs_sites == any(x.uses_sites for x in losses)
    ce = torch.tensor(2.0)
    total, parts = total_loss(name, ce, _loss_inputs(), 0.5, 0.5)
    assert set(parts) == {"ce", *method.losses} and torch.isfinite(total)
    if not losses:
        assert total is ce


def _check_dataset(name, fn, tmp_path):
    """Nothing is downloaded: a data set missing from disk is a one-line error naming where it was looked for."""
    with pytest.raises(UserError) as e:
        fn(str(tmp_path / "empty"), "test")
    assert "\n" not in str(e.value) and str(tmp_path / "empty") in str(e.value)


def _check_augmentation(name, fn):
    from train.data import build_transform

    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    x = build_transform(32, (0.5,) * 3, (0.25,) * 3, True, name)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    xb = fn.batched(img.expand(2, 3, 40, 48), 32, torch.Generator().manual_seed(0))  # the form run on the device
    assert xb.shape == (2, 3, 32, 32) and xb.dtype == torch.uint8


def _check_precision(name, precision):
    """Autocast in it on the CPU gives its dtype (float32 for none)."""
    from train.runtime import resolve_runtime
    from train.config import RuntimeConfig

    with resolve_runtime(RuntimeConfig(amp=name), torch.device("cpu")).autocast():
        out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert precision.name == name and out.dtype == (precision.dtype or torch.float32)


def _check_optimizer(name, fn):
    from train.config import RunConfig
    from train.optim import make_optimizer

    torch.manual_seed(0)
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.lr = name, 0.01
    net = torch.nn.Linear(4, 1)
    opt = make_optimizer(cfg, net)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def _check_lr_schedule(name, fn):
    from train.config import RunConfig
    from train.optim import lr_at

    cfg = RunConfig()
    cfg.optim.schedule, cfg.optim.lr, cfg.optim.warmup_epochs = name, 0.1, 0.0
    lrs = [lr_at(cfg, e, 10) for e in np.linspace(0, 10, 21)]
    assert lrs[0] == pytest.approx(0.1) and all(0 <= a <= 0.1 + 1e-12 for a in lrs) and lrs[-1] < lrs[0]


def _check_task(name, cls):
    """One training batch gives a finite loss with the task loss named, and validation gives a finite score."""
    from train.config import RunConfig
    from train.models import FAMILIES, build_model

    fam = next(f for f in FAMILIES.values() if f.task == name)
    cfg = RunConfig(method="student")
    cfg.diffusion.timesteps, cfg.data.eval_batch_size = 10, 4
    denoise = name == "denoise"
    net = build_model(fam.default, 0 if denoise else 4, 32, **({"ch": 16} if denoise else {}))
    task = cls(cfg, "student", None, [], {}, num_classes=4)
    task.attach(net)
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4)
    loss, parts, _ = task.batch_loss(net, x, y, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and parts[task.loss_name] == pytest.approx(loss.item())
    task.after_step(net)
    with torch.no_grad():
        figures, score = task.validate(task.eval_model(net), list(zip(x, y)), torch.device("cpu"))
    assert figures and np.isfinite(score)


def _check_target(name, t):
    """A target's fields are consistent, and pre-flight holds a graph to its opset limit and operator list."""
    from onnx import TensorProto, helper

    from export.onnx_export import MIN_OPSET
    from export.preflight import preflight
    from deploy.agent.backends import BACKENDS  # the agent must have the backend the bundle is made for
    from export.targets import PRECISIONS

    assert t.name == name and t.backend in BACKENDS and t.precision in PRECISIONS and t.runtime and t.ops_source
    assert MIN_OPSET <= t.max_opset and t.max_ir_version >= 7 and set(t.refused) <= set(PRECISIONS) - {t.precision}

    def graph(op, opset):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        node = helper.make_node(op, ["x", "x"], ["y"], name="n")
        g = helper.make_graph([node], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)

    assert preflight(graph("Add", t.max_opset), t)["target"] == name
    with pytest.raises(UserError, match=f"opset {t.max_opset + 1} is above {t.max_opset}"):
        preflight(graph("Add", t.max_opset + 1), t)
    if t.allowed_ops is not None:
        assert {"Conv", "Add", "Relu"} <= t.allowed_ops
        with pytest.raises(UserError, match="is not supported by"):
            preflight(graph("Mod", min(t.max_opset, 13)), t)


def _check_calibration(name, calibration):
    """Quantizing a small conv graph with this method gives positive, finite scales and zero points of 0."""
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import quantize_int8

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    fp32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    q = quantize_int8(fp32, rng.standard_normal((16, 3, 8, 8)).astype(np.float32), name)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for n in qs:
        assert np.all(inits[n.input[1]] > 0) and np.all(np.isfinite(inits[n.input[1]])) and not inits[n.input[2]].any()


def _check_recipe(name, recipe):
    """A recipe loads over a preset, sets every key it names and says where each comes from."""
    from train.config import flatten_config, load_config

    flat = flatten_config(load_config("quick", [f"recipe={name}"]).to_dict())
    assert recipe.name == name and recipe.sources and recipe.settings
    for key, value in recipe.settings:
        assert flat[key] == (list(value) if isinstance(value, tuple) else value), key


def _check_inplace_rule(name, rule):
    """The rule names inputs the node really has (the analysis may reuse one of them for the output)."""
    from onnx import helper

    for n_inputs in (1, 2):
        node = helper.make_node(name, [f"i{k}" for k in range(n_inputs)], ["y"])
        idx = rule(node)
        assert idx and all(0 <= k < n_inputs for k in idx), (name, n_inputs, idx)


def _check_placement(name, placement):
    """The placement's sites fit a pair of its task: every block's H x W equals its teacher tensor's."""
    from train.models import build_model
    from train.red import place_sites, plan_sites

    denoise = placement.task == "denoise"
    student, teacher, size, n, kw = (("unet-2-221", "unet-1-222", 32, 0, {"ch": 16}) if denoise else
                                     ("mobilenetv2-4-1221111", "mobilenetv2-1-1222121", 64, 10, {}))
    sites = place_sites(name, student, teacher, size)
    plans = plan_sites(build_model(student, n, size, **kw), build_model(teacher, n, size, **kw), sites, size, 1.0)
    assert plans and placement.what


CHECKS = {
    "architecture": _check_architecture,
    "RED site placement": _check_placement,
    "RED distance": _check_distance,
    "distillation loss": _check_loss,
    "method": _check_method,
    "data set": _check_dataset,
    "augmentation": _check_augmentation,
    "autocast precision": _check_precision,
    "optimizer": _check_optimizer,
    "learning-rate schedule": _check_lr_schedule,
    "noise schedule": _check_schedule,
    "sampler": _check_sampler,
    "task": _check_task,
    "export target": _check_target,
    "calibration method": _check_calibration,
    "in-place rule": _check_inplace_rule,
    "recipe": _check_recipe,
}


def test_the_walk_imports_the_stages():
    assert {"train.tasks", "train.optim", "export.targets", "export.calibration",
            "redistill.memory.analysis"} <= set(MODULES)


def test_every_registry_has_a_check():
    missing = sorted(set(registry.ALL) - set(CHECKS))
    assert not missing, f"registries without a check in tests/redistill/test_registry.py: {missing}"


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_every_registry_entry_does_its_job(kind, tmp_path):
    reg = registry.ALL[kind]
    assert reg.names(), f"registry {kind!r} is empty"
    check = CHECKS[kind]
    for name in reg.names():
        if kind == "data set":
            check(name, reg.get(name), tmp_path)
        else:
            check(name, reg.get(name))


def test_unknown_names_get_did_you_mean():
    for kind, reg in registry.ALL.items():
        name = reg.names()[0]
        with pytest.raises(UserError, match="Did you mean"):
            reg.get(name + "x")

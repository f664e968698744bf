"""Walk every registry: each entry must be usable, and each registry must have a check here."""

import importlib

import pytest
import torch

from redistill import registry
from redistill.errors import UserError

# importing the stages fills the registries
for mod in ("train.models", "train.red", "train.losses", "train.data", "train.diffusion", "train.sampling", "redistill.memory", "export.targets",
            "export.quantize"):
    importlib.import_module(mod)


def _check_architecture(name, fam):
    m = registry.ALL["architecture"].get(name)
    from train.models import build_model, example_inputs

    if m.task == "denoise":  # epsilon has the input's shape
        net = build_model(m.default, 0, 32, ch=16)
        assert net(*example_inputs(net, 32)).shape == (1, 3, 32, 32)
        return
    assert build_model(m.default, 10, 64)(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


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


def _check_loss(name, loss):
    from train.losses import LossInputs
    from train.red import SitePlan

    s, t = torch.randn(2, 3), torch.randn(2, 3)
    f = torch.rand(2, 2, 4, 4)
    b = LossInputs(s, t, {"a:out": f}, {"a:out": f.flip(-1)}, [SitePlan("a", "out", "b", "out", 1.0)])
    assert loss.name == name and torch.isfinite(loss.fn(b))


def _check_method(name, method):
    from train.losses import DISTILL_LOSSES

    assert method.name == name and method.label and method.marker
    for n in method.losses:
        assert DISTILL_LOSSES.get(n).name == n


def _check_dataset(name, fn):
    assert callable(fn)


CHECKS = {
    "architecture": _check_architecture,
    "RED distance": _check_distance,
    "distillation loss": _check_loss,
    "method": _check_method,
    "data set": _check_dataset,
    "noise schedule": _check_schedule,
    "sampler": _check_sampler,
}


def test_every_registry_entry_is_usable():
    assert registry.ALL, "no registries were created"
    for kind, reg in registry.ALL.items():
        check = CHECKS.get(kind)
        if check is None:
            # other stages' registries: every entry must at least resolve and be non-null
            for name in reg.names():
                assert reg.get(name) is not None
            continue
        for name in reg.names():
            check(name, reg.get(name))


def test_unknown_names_get_did_you_mean():
    for kind, reg in registry.ALL.items():
        name = reg.names()[0]
        with pytest.raises(UserError, match="Did you mean"):
            reg.get(name + "x")

"""DDPM/DDIM sampling on tiny U-Nets (ch=16, T=50) and the `redistill sample` command."""

import json

import numpy as np
import pytest
import torch

from redistill.cli import main
from redistill.errors import UserError
from train.diffusion import Diffusion
from train.models import build_model
from train.sampling import SAMPLERS, ddim_timesteps, load_denoiser, sample, save_grid

UNET_KW = {"ch": 16, "ch_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 1, "dropout": 0.0}
SCHEDULE = {"schedule": "linear", "timesteps": 50, "beta_start": 1e-4, "beta_end": 0.02}


def tiny_unet(num_classes=0, seed=0):
    torch.manual_seed(seed)
    return build_model("unet-1-222", num_classes, 32, **UNET_KW).eval()


def save_denoiser(path, num_classes=0, data_root=None):
    """A tiny denoiser checkpoint, as `redistill distill` writes one for a unet run."""
    from train.checkpoint import make_payload, save_checkpoint
    from train.config import RunConfig

    model = tiny_unet(num_classes)
    cfg = RunConfig().to_dict()
    if data_root is not None:
        cfg["data"]["root"] = str(data_root)
    payload = make_payload(
        model, arch="unet-1-222", role="teacher", method="teacher", num_classes=num_classes, image_size=32,
        classes=[f"c{i}" for i in range(10)], mean=(0.5,) * 3, std=(0.5,) * 3, width_mult=1.0, plans=[],
        red_distance="cosine", config=cfg, epoch=1, history=[], best_val=0.0, build_kwargs=UNET_KW,
        extra={"ema": model.state_dict(), "diffusion": SCHEDULE})
    save_checkpoint(payload, path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return tiny_unet(), Diffusion.make(**SCHEDULE)


def test_ddim_with_a_fixed_seed_is_deterministic(setup):
    model, diff = setup
    a = sample(model, diff, 8, "ddim", steps=10, seed=0, batch_size=8)
    b = sample(model, diff, 8, "ddim", steps=10, seed=0, batch_size=8)
    c = sample(model, diff, 8, "ddim", steps=10, seed=1, batch_size=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the noise of sample i depends only on (seed, i): another batch size changes only float rounding
    d = sample(model, diff, 8, "ddim", steps=10, seed=0, batch_size=3)
    assert torch.allclose(a, d, atol=1e-4)


@pytest.mark.parametrize("name,kw", [("ddpm", {}), ("ddpm", {"variance": "fixedsmall"}), ("ddim", {"steps": 5, "eta": 1.0})])
def test_samplers_return_clipped_images(setup, name, kw):
    model, _ = setup
    diff = Diffusion.make(**dict(SCHEDULE, timesteps=20))  # DDPM takes every step: keep T short
    x = sample(model, diff, 8, name, seed=3, batch_size=8, **kw)
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all()) and x.min() >= -1 and x.max() <= 1


def test_ddim_eta0_with_all_steps_and_no_clip_inverts_q_sample_for_a_perfect_denoiser():
    """With the true epsilon of a known x0, DDIM (eta 0) recovers x0 exactly: checks the update formula."""
    diff = Diffusion.make(**SCHEDULE)
    x0 = torch.rand(2, 3, 32, 32) * 1.6 - 0.8

    class Oracle(torch.nn.Module):
        num_classes = 0
        in_ch = 3

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t):
            ab = diff.alphas_cumprod[t.long()].float().view(-1, 1, 1, 1)
            return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    for name in ("ddim", "ddpm"):
        x = sample(Oracle(), diff, 2, name, steps=7, clip_denoised=False, batch_size=2)
        assert torch.allclose(x, x0, atol=1e-4), name


def test_guidance_runs_for_a_conditional_model():
    model, diff = tiny_unet(num_classes=10), Diffusion.make(**SCHEDULE)
    g = sample(model, diff, 4, "ddim", steps=4, guidance=2.0, labels=3, batch_size=4)
    u = sample(model, diff, 4, "ddim", steps=4, guidance=0.0, labels=3, batch_size=4)
    assert g.shape == (4, 3, 32, 32) and not torch.equal(g, u)
    with pytest.raises(UserError, match="labels"):
        sample(model, diff, 4, "ddim", steps=4, labels=[1, 2])
    with pytest.raises(UserError, match="class-conditional"):
        sample(tiny_unet(), diff, 2, "ddim", steps=2, guidance=1.0)


def test_unknown_sampler_and_bad_steps():
    with pytest.raises(UserError, match="Did you mean .*'ddim'"):
        SAMPLERS.get("ddmi")
    assert ddim_timesteps(50, 5) == [49, 37, 24, 12, 0]
    with pytest.raises(UserError, match="1 to 50"):
        ddim_timesteps(50, 51)


def test_save_grid_writes_a_png(tmp_path):
    from PIL import Image

    save_grid(torch.rand(6, 3, 32, 32) * 2 - 1, tmp_path / "g.png", nrow=3)
    with Image.open(tmp_path / "g.png") as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (3 * 34 + 2, 2 * 34 + 2)
    assert not list(tmp_path.glob(".*tmp"))


def test_sample_command_writes_grid_npz_and_settings(tmp_path, capsys):
    ck = save_denoiser(tmp_path / "best.pt")
    out = tmp_path / "out"
    rc = main(["sample", str(ck), "--steps", "3", "--n", "5", "--batch", "4", "--seed", "7", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "grid.png").is_file()
    with np.load(out / "samples.npz") as z:
        assert z["images"].shape == (5, 32, 32, 3) and z["images"].dtype == np.uint8
        settings = json.loads(str(z["settings"]))
    meta = json.loads((out / "sample.json").read_text())
    assert meta["sampler"] == "ddim" and meta["steps"] == 3 and meta["seed"] == 7 and meta["n"] == 5
    assert settings["checkpoint_sha256"] == meta["checkpoint_sha256"]
    model, diff, _ = load_denoiser(str(ck))
    again = sample(model, diff, 5, "ddim", steps=3, seed=7, batch_size=4)
    from train.sampling import to_uint8

    with np.load(out / "samples.npz") as z:
        assert np.array_equal(z["images"], to_uint8(again).numpy())


def test_sample_command_bad_input_is_one_line(tmp_path, capsys):
    from train.checkpoint import make_payload, save_checkpoint
    from train.config import RunConfig

    clf = build_model("mobilenetv3_small-2-22121111211", 4, 32, width_mult=0.25)
    save_checkpoint(make_payload(clf, arch="mobilenetv3_small-2-22121111211", role="teacher", method="teacher",
                                 num_classes=4, image_size=32, classes=list("abcd"), mean=(0.5,) * 3, std=(0.5,) * 3,
                                 width_mult=0.25, plans=[], red_distance="cosine", config=RunConfig().to_dict(),
                                 epoch=1, history=[], best_val=0.0), tmp_path / "clf.pt")
    assert main(["sample", str(tmp_path / "clf.pt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a classifier" in err and "denoiser checkpoint" in err
    ck = save_denoiser(tmp_path / "d.pt")
    assert main(["sample", str(ck), "--sampler", "ddmi", "--out", str(tmp_path / "o")]) == 2
    assert "unknown sampler 'ddmi'. Did you mean" in capsys.readouterr().err
    assert main(["sample", str(ck), "--label", "3", "--out", str(tmp_path / "o")]) == 2
    assert "unconditional" in capsys.readouterr().err

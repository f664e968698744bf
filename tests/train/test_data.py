"""Decoding (Pillow, no deprecated torchvision decoder) and the batched on-device augmentations: the same
pixels as the per-image transforms for the same parameters, and parameters drawn from the same distribution."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from redistill.errors import UserError
from train import gpu_data
from train.config import load_config
from train.data import AUGMENTS, RRC_RATIO, RRC_SCALE, decode_rgb, device_batches, load_data, one_tensor


def test_decoder_gives_rgb_uint8_for_any_mode(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "j.jpg", quality=95)
    a = decode_rgb(tmp_path / "a.png")
    assert a.dtype == torch.uint8 and a.shape == (3, 5, 7) and torch.equal(a, torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(decode_rgb(tmp_path / "g.png"), torch.from_numpy(rgb[..., 0]).expand(3, 5, 7))
    assert torch.equal(decode_rgb(tmp_path / "rgba.png"), a)
    assert decode_rgb(tmp_path / "j.jpg").shape == (3, 5, 7)


@pytest.mark.parametrize("content", [b"not an image", b"\xff\xd8\xff\xe0" + b"\0" * 20])
def test_a_bad_image_is_one_line(tmp_path, content):
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(UserError, match="cannot decode image") as e:
        decode_rgb(p)
    assert "\n" not in str(e.value) and "remove or replace" in str(e.value)


def test_loading_an_image_folder_warns_nothing(tiny_images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_data(load_config("quick", [f"data.root={tiny_images}"]).data)
    assert one_tensor(data.train) and data.train.set.images.dtype == torch.uint8


def _batch(n=6, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size,src", [(32, 32), (32, 48), (64, 32)])
def test_resize_and_none_match_the_per_image_transform(size, src):
    x = _batch(h=src, w=src)
    per_image = v2.Compose(AUGMENTS.get("none").per_image(size))
    got = AUGMENTS.get("none").batched(x, size, torch.Generator())
    assert torch.equal(got, torch.stack([per_image(img) for img in x]))


def test_pad_crop_flip_matches_torchvision_for_the_same_offsets():
    x = _batch(n=8, h=16, w=16)
    pad = 2
    top, left = torch.tensor([0, 1, 2, 3, 4, 0, 4, 2]), torch.tensor([4, 3, 2, 1, 0, 0, 4, 1])
    flip = torch.tensor([True, False, True, False, True, False, False, True])
    got = gpu_data.pad_crop_flip(x, pad, top, left, flip)
    for i in range(len(x)):
        ref = TF.crop(TF.pad(x[i], [pad], padding_mode="reflect"), int(top[i]), int(left[i]), 16, 16)
        assert torch.equal(got[i], TF.horizontal_flip(ref) if flip[i] else ref), i


def test_resized_crop_flip_matches_torchvision_for_the_same_boxes():
    x = _batch(n=6, h=24, w=24)
    top, left = torch.tensor([0, 3, 10, 5, 0, 2]), torch.tensor([0, 7, 2, 5, 0, 1])
    h, w = torch.tensor([24, 12, 9, 17, 20, 22]), torch.tensor([24, 15, 14, 11, 24, 21])
    flip = torch.tensor([False, True, False, True, True, False])
    for size in (32, 16):  # upsampling together; boxes larger than the output resized one by one, antialiased
        got = gpu_data.resized_crop_flip(x, top, left, h, w, size, flip)
        for i in range(len(x)):
            ref = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [size, size], antialias=True)
            ref = TF.horizontal_flip(ref) if flip[i] else ref
            assert (got[i].int() - ref.int()).abs().max() <= 1, (size, i)


def test_batched_crops_draw_the_per_image_distribution():
    torch.manual_seed(0)
    n, size, pad = 6000, 32, 4
    top, left = gpu_data.crop_params(n, size, pad, torch.Generator().manual_seed(0))
    counts = torch.bincount(top, minlength=2 * pad + 1).float()
    assert len(counts) == 2 * pad + 1 and (counts / (n / (2 * pad + 1)) - 1).abs().max() < 0.15
    assert abs(float(gpu_data.flips(n, torch.Generator().manual_seed(1)).float().mean()) - 0.5) < 0.03
    # RandomResizedCrop: area and aspect ratio of the boxes, against torchvision's own sampler
    ours = torch.stack(gpu_data.rrc_params(n, 24, 40, RRC_SCALE, RRC_RATIO, torch.Generator().manual_seed(2)), 1)
    rrc = v2.RandomResizedCrop(16, scale=RRC_SCALE, ratio=RRC_RATIO)
    img = torch.zeros(3, 24, 40, dtype=torch.uint8)
    theirs = torch.tensor([[p["top"], p["left"], p["height"], p["width"]]
                           for p in (rrc.make_params([img]) for _ in range(n))])
    for b in (ours, theirs):
        assert bool(((b[:, 0] + b[:, 2] <= 24) & (b[:, 1] + b[:, 3] <= 40) & (b >= 0).all(1)).all())
    for f in (lambda b: b[:, 2] * b[:, 3] / (24 * 40), lambda b: b[:, 3] / b[:, 2], lambda b: b[:, 0] + b[:, 2] / 2):
        q = torch.tensor([0.1, 0.5, 0.9])
        a, t = torch.quantile(f(ours).double(), q.double()), torch.quantile(f(theirs).double(), q.double())
        assert torch.allclose(a, t, rtol=0.06, atol=0.3), (a, t)


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_every_batched_augmentation_gives_uint8_at_the_size_and_is_seeded(name):
    x = _batch(n=5, h=40, w=48)
    a = AUGMENTS.get(name).batched(x, 32, torch.Generator().manual_seed(3))
    b = AUGMENTS.get(name).batched(x, 32, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 32, 32) and torch.equal(a, b)


def test_device_batches_give_the_per_image_pixels_and_the_same_step_loss(tiny_images):
    """augment none: batches made on the device are the per-image DataLoader's, bit for bit, and one training
    step on them gives the same loss."""
    from train.step import build_step

    cfg = load_config("quick", [f"data.root={tiny_images}", "data.augment=none", "data.batch_size=8", "device=cpu",
                                "runtime.threads=1"])
    data = load_data(cfg.data)
    order = torch.arange(len(data.train))
    ours = list(device_batches(data, "none", 32, 8, torch.device("cpu"), torch.channels_last)
                .epoch(order, torch.Generator()))
    theirs = list(DataLoader(data.train, batch_size=8, shuffle=False))
    assert len(ours) == len(theirs)
    for (x, y), (x0, y0) in zip(ours, theirs):
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert x.is_contiguous(memory_format=torch.channels_last)
    losses = []
    for x, y in (ours[0], theirs[0]):
        torch.manual_seed(0)
        step = build_step(cfg, num_classes=len(data.classes))
        torch.manual_seed(1)
        losses.append(float(step.step(x, y)))
        step.close()
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)

"""Data sets: an image-folder tree (the CIFAR-10 archive), or torchvision's CIFAR10/STL10 already on disk.

Images are decoded once (Pillow) into one uint8 tensor when they share a size, so that an epoch spends its
time training, not decoding JPEGs; training batches are then augmented whole on the training device
(``train.gpu_data``), or per image in a DataLoader when the sizes differ. Nothing here downloads anything.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from redistill.errors import UserError
from redistill.registry import Registry
from train import gpu_data
from train.runtime import cpu_cores

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

#: data sets by name (``data.name``): ``fn(root, split) -> ImageSet``, reading from disk only
DATASETS: Registry[Callable[[str, str], "ImageSet"]] = Registry("data set")


@dataclass
class ImageSet:
    """Decoded images (N x 3 x H x W uint8, or a list of per-image tensors) with labels and class names."""

    images: object
    labels: torch.Tensor
    classes: List[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: Sequence[int]) -> "ImageSet":
        idx_t = torch.as_tensor(list(idx), dtype=torch.long)
        imgs = self.images[idx_t] if torch.is_tensor(self.images) else [self.images[i] for i in idx_t.tolist()]
        return ImageSet(imgs, self.labels[idx_t], self.classes, self.source)


def _hint(root: Path) -> str:
    return (
        f"unpack the CIFAR-10 archive there (mkdir -p {root} && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C {root}) "
        "or point data.root=DIR at a folder holding train/<class>/ and test/<class>/"
    )


@DATASETS.register("imagefolder")
def load_imagefolder(root: str, split: str) -> ImageSet:
    """Read ``root/split/<class>/*.jpg`` (one folder per class) and decode every image."""
    base = Path(root).expanduser()
    folder = base / split
    if not folder.is_dir():
        raise UserError(f"no {split!r} image folder at {folder.resolve()}: {_hint(base)}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"{folder.resolve()} must hold one sub-folder per class (found {len(classes)}): {_hint(base)}")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not files:
            raise UserError(f"class folder {(folder / c).resolve()} holds no images ({', '.join(IMG_EXTENSIONS)})")
        paths += files
        labels += [i] * len(files)
    with ThreadPoolExecutor(max_workers=cpu_cores()) as pool:  # Pillow decodes without the GIL
        images = list(pool.map(decode_rgb, paths, chunksize=256))
    if len({tuple(t.shape) for t in images}) == 1:
        images = torch.stack(images)
    return ImageSet(images, torch.tensor(labels), classes, f"imagefolder:{folder.resolve()}")


def decode_rgb(path: Path) -> torch.Tensor:
    """One image file as a 3 x H x W uint8 tensor (Pillow: grey, palette, CMYK and alpha images become RGB).

    Pillow, not ``torchvision.io.decode_image``, which is deprecated since torchvision 0.29.
    """
    try:
        with Image.open(path) as im:
            arr = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError; truncated files too
        raise UserError(f"cannot decode image {path}: {e}; remove or replace the file") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


def _torchvision_set(cls_name: str, root: str, split: str) -> ImageSet:
    import torchvision.datasets as tvd

    try:
        if cls_name == "CIFAR10":
            ds = tvd.CIFAR10(root, train=(split == "train"), download=False)
            images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
            labels = torch.tensor(ds.targets)
        else:
            ds = tvd.STL10(root, split=split, download=False)
            images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype("int64"))
    except RuntimeError as e:
        raise UserError(
            f"torchvision {cls_name} not found under {Path(root).resolve()} ({e}); nothing is downloaded here: "
            "copy the data set there, or use data.name=imagefolder with the CIFAR-10 archive"
        ) from None
    return ImageSet(images, labels, list(ds.classes), f"torchvision.{cls_name}:{Path(root).resolve()}")


@DATASETS.register("cifar10")
def load_cifar10(root: str, split: str) -> ImageSet:
    return _torchvision_set("CIFAR10", root, split)


@DATASETS.register("stl10")
def load_stl10(root: str, split: str) -> ImageSet:
    return _torchvision_set("STL10", root, split)


def balanced_indices(labels: torch.Tensor, n: int) -> List[int]:
    """The first ``n`` indices taken round-robin over classes, so a subset keeps the class balance."""
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(int(labels.max()) + 1)]
    out: List[int] = []
    k = 0
    while len(out) < n and any(k < len(p) for p in per_class):
        out += [p[k] for p in per_class if k < len(p)]
        k += 1
    return sorted(out[:n])


def split_train_val(labels: torch.Tensor, fraction: float) -> Tuple[List[int], List[int]]:
    """A fixed, stratified hold-out (seed 0, independent of the run's seed) for picking the best epoch."""
    if fraction <= 0:
        return list(range(len(labels))), []
    g = torch.Generator().manual_seed(0)
    train, val = [], []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        k = max(1, int(round(len(idx) * fraction)))
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def channel_stats(images) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] over (up to 10,000 of) the training images."""
    if not torch.is_tensor(images):
        return IMAGENET_MEAN, IMAGENET_STD
    step = max(1, len(images) // 10000)
    x = images[::step].float().div_(255)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


@dataclass(frozen=True)
class Augment:
    """A training augmentation in both forms: ``per_image(image_size) -> [v2 transforms]`` for one uint8 image
    (a DataLoader), and ``batched(uint8 batch, image_size, generator) -> uint8 batch`` on the training device,
    drawing its parameters from the same distribution. Both also bring images to ``image_size``."""

    per_image: Callable[[int], list]
    batched: gpu_data.BatchedAugment


#: training augmentations by name (``data.augment``); evaluation only resizes
AUGMENTS: Registry[Augment] = Registry("augmentation")


def register_augment(name: str, batched: gpu_data.BatchedAugment):
    """Decorator: register ``per_image(image_size)`` with its ``batched`` form as augmentation ``name``."""

    def deco(per_image):
        AUGMENTS.register(name)(Augment(per_image, batched))
        return per_image

    return deco


def _resize(image_size: int):
    return v2.Resize((image_size, image_size), antialias=True)


def _crop_flip_batched(x, size, gen):
    x = gpu_data.resize_batch(x, size)
    top, left = gpu_data.crop_params(len(x), size, size // 8, gen)
    return gpu_data.pad_crop_flip(x, size // 8, top, left, gpu_data.flips(len(x), gen))


@register_augment("crop_flip", _crop_flip_batched)
def _crop_flip(image_size: int) -> list:
    """Resize, pad by 1/8 (reflect) and crop back, horizontal flip: the CIFAR recipe."""
    return [_resize(image_size), v2.RandomCrop(image_size, padding=image_size // 8, padding_mode="reflect"),
            v2.RandomHorizontalFlip()]


RRC_SCALE, RRC_RATIO = (0.35, 1.0), (3 / 4, 4 / 3)


def _rrc_flip_batched(x, size, gen):
    top, left, h, w = gpu_data.rrc_params(len(x), x.shape[-2], x.shape[-1], RRC_SCALE, RRC_RATIO, gen)
    return gpu_data.resized_crop_flip(x, top, left, h, w, size, gpu_data.flips(len(x), gen))


@register_augment("rrc_flip", _rrc_flip_batched)
def _rrc_flip(image_size: int) -> list:
    """RandomResizedCrop (35-100 % of the area), horizontal flip: the paper's STL10 recipe."""
    return [v2.RandomResizedCrop(image_size, scale=RRC_SCALE, ratio=RRC_RATIO, antialias=True),
            v2.RandomHorizontalFlip()]


@register_augment("flip", lambda x, size, gen: gpu_data.flip_batch(gpu_data.resize_batch(x, size),
                                                                  gpu_data.flips(len(x), gen)))
def _flip(image_size: int) -> list:
    return [_resize(image_size), v2.RandomHorizontalFlip()]


@register_augment("none", lambda x, size, gen: gpu_data.resize_batch(x, size))
def _none(image_size: int) -> list:
    return [_resize(image_size)]


def build_transform(image_size: int, mean, std, train: bool, augment: str) -> Callable:
    """uint8 image -> normalised float tensor; ``augment`` (an ``AUGMENTS`` name) applies in training only."""
    ops = AUGMENTS.get(augment).per_image(image_size) if train else [_resize(image_size)]
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


class TransformedImages(Dataset):
    def __init__(self, images: ImageSet, transform: Callable):
        self.set, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int):
        return self.transform(self.set.images[i]), int(self.set.labels[i])


@dataclass
class DataBundle:
    train: Dataset
    val: Optional[Dataset]
    test: Dataset
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    source: str


def load_data(cfg, mean=None, std=None, need_train: bool = True) -> DataBundle:
    """Build train/val/test data sets from a ``DataConfig``; ``mean``/``std`` default to the train set's own."""
    loader = DATASETS.get(cfg.name)
    test = loader(cfg.root, "test")
    if cfg.test_subset:
        test = test.subset(balanced_indices(test.labels, cfg.test_subset))
    train_set = val_set = None
    if need_train:
        full = loader(cfg.root, "train")
        if full.classes != test.classes:
            raise UserError(f"train and test class folders differ under {cfg.root}: {full.classes} vs {test.classes}")
        if cfg.train_subset:
            full = full.subset(balanced_indices(full.labels, cfg.train_subset))
        tr_idx, va_idx = split_train_val(full.labels, cfg.val_fraction)
        train_set, val_set = full.subset(tr_idx), (full.subset(va_idx) if va_idx else None)
        if mean is None:
            mean, std = channel_stats(train_set.images)
    elif mean is None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    ev = build_transform(cfg.image_size, mean, std, False, cfg.augment)
    return DataBundle(
        train=TransformedImages(train_set, build_transform(cfg.image_size, mean, std, True, cfg.augment)) if train_set else None,
        val=TransformedImages(val_set, ev) if val_set is not None else None,
        test=TransformedImages(test, ev),
        classes=test.classes,
        mean=tuple(mean),
        std=tuple(std),
        source=test.source,
    )


def one_tensor(dataset: Optional[Dataset]) -> bool:
    """Whether a training split's images are one uint8 tensor (one size), as batches augmented on a device need."""
    return isinstance(dataset, TransformedImages) and torch.is_tensor(dataset.set.images)


def device_batches(data: DataBundle, augment: str, image_size: int, batch_size: int, device: torch.device,
                   memory_format: torch.memory_format = torch.contiguous_format) -> gpu_data.DeviceBatches:
    """The training split as batches augmented on ``device`` by ``augment``'s batched form, normalised by the
    bundle's mean and std (``DeviceBatches.epoch`` gives one epoch)."""
    s = data.train.set
    return gpu_data.DeviceBatches(s.images, s.labels, AUGMENTS.get(augment).batched, image_size, data.mean,
                                  data.std, batch_size, device, memory_format)

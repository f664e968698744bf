"""Sample quality without downloading anything.

* CFD, the classifier-feature Frechet distance: the Frechet distance between
  Gaussians fitted to the penultimate-layer features (the input of the last
  Linear) of the project's own CIFAR-10 classifier, on generated and real test
  images. It is *not* FID: the features come from a small classifier trained
  here, not from the Inception-v3 every published FID uses, so CFD values are
  only comparable with CFD values from the same classifier checkpoint.
* Precision and recall (Kynkaenniemi et al. 2019, k-NN radii) on the same features.
* FID, only when the FID Inception weights are on disk (``inception_weights=PATH``):
  torchmetrics' ``FrechetInceptionDistance`` (torch-fidelity's Inception-v3, 2048-d
  pool features at 299 px) given that local file. Nothing is ever downloaded.

Reference statistics of the real images are cached in a .npz keyed by the
feature network's sha256, the image count, the seed and the data set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from redistill.errors import UserError
from redistill.io import atomic_write, sha256_file
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.config import DataConfig
from train.data import load_data

CFD_NAME = "classifier-feature Frechet distance (CFD)"


def last_linear(model: nn.Module) -> Tuple[str, nn.Linear]:
    """The final ``nn.Linear`` in the module tree (the classifier's output layer)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UserError(f"{type(model).__name__} has no nn.Linear layer to take penultimate features from")
    return found[-1]


class _Hooked:
    """Runs a network batch by batch and collects the input of one Linear layer as features."""

    def __init__(self, model: nn.Module, layer: nn.Linear, device):
        self.model, self.layer, self.device = model.eval().to(device), layer, torch.device(device)
        self.dim = layer.in_features

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """[N, 3, H, W] images in [-1, 1] -> float64 features [N, D]."""
        grabbed = []
        h = self.layer.register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0].flatten(1).double().cpu()))
        try:
            for s in range(0, len(images), batch_size):
                self.model(self._prepare(images[s:s + batch_size].to(self.device).float()))
        finally:
            h.remove()
        if not grabbed:
            return np.zeros((0, self.dim))
        return torch.cat(grabbed).numpy()


class ClassifierFeatures(_Hooked):
    """Penultimate-layer features of a ReDistill classifier checkpoint (input of its last Linear)."""

    def __init__(self, checkpoint, device="cpu"):
        self.path = Path(checkpoint)
        ck = load_checkpoint(self.path)
        if ck.get("task", "classify") != "classify":
            raise UserError(f"{self.path} is a {ck.get('task')} checkpoint ({ck.get('arch')}); --classifier needs a "
                            "classifier checkpoint written by redistill distill (e.g. runs/quick/teacher/best.pt)")
        self.arch, self.image_size = ck["arch"], int(ck["image_size"])
        self.data_config = dict(ck.get("config", {}).get("data", {}))  # where the classifier's images came from
        self.mean = torch.tensor(ck["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(ck["std"], dtype=torch.float32).view(1, -1, 1, 1)
        model = model_from_checkpoint(ck)
        _, layer = last_linear(model)
        super().__init__(model, layer, device)
        self.sha256 = sha256_file(self.path)
        self.name = f"{CFD_NAME} on {self.arch} {self.path}"

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        x01 = (x + 1) / 2
        return (x01 - self.mean.to(x.device)) / self.std.to(x.device)


#: what the FID weights file must be: the 1008-class Inception-v3 of TensorFlow's FID, as torch-fidelity converts it
FID_WEIGHTS = ("torch-fidelity's weights-inception-2015-12-05-6726825d.pth or pytorch-fid's "
               "pt_inception-2015-12-05-6726825d.pth")


class InceptionFID:
    """torchmetrics' ``FrechetInceptionDistance`` on a local FID Inception weights file (never a download).

    The file is read once with ``weights_only=True`` before torch-fidelity loads it, so a file that is not
    a plain state dict is refused instead of unpickled. Images go in as [-1, 1] floats and are scored as
    uint8 pixels, resized to 299 px the way TensorFlow's FID does (torchmetrics ``antialias=False``).
    """

    def __init__(self, weights, device="cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.path = Path(weights)
        if not self.path.is_file():
            raise UserError(f"--inception-weights {self.path} not found: give a local copy of {FID_WEIGHTS} "
                            "(nothing is downloaded)")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise UserError(f"--inception-weights {self.path} is not a loadable PyTorch state_dict ({type(e).__name__})") from None
        fc = state.get("fc.weight") if isinstance(state, dict) else None
        if fc is None or tuple(fc.shape) != (1008, 2048):
            raise UserError(f"--inception-weights {self.path} is not an Inception-v3 state_dict of the FID network "
                            f"(fc.weight {tuple(fc.shape) if fc is not None else 'missing'}, want (1008, 2048)): "
                            f"give {FID_WEIGHTS}")
        try:
            self.metric = FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=False,
                                                   feature_extractor_weights_path=str(self.path), antialias=False)
        except RuntimeError as e:
            raise UserError(f"--inception-weights {self.path} does not fit the FID Inception-v3 "
                            f"({str(e).splitlines()[0]}): give {FID_WEIGHTS}") from None
        self.metric = self.metric.to(device)
        self.device = torch.device(device)
        self.sha256 = sha256_file(self.path)
        self.name = f"FID (torchmetrics FrechetInceptionDistance, Inception-v3 pool3, 2048-d, 299 px) {self.path}"

    @torch.inference_mode()
    def update(self, images: torch.Tensor, real: bool, batch_size: int = 64) -> None:
        """Add [N, 3, H, W] images in [-1, 1] to the real or the generated statistics."""
        for s in range(0, len(images), batch_size):
            x = ((images[s:s + batch_size].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            self.metric.update(x.to(self.device), real=real)

    def real_state(self) -> Dict[str, np.ndarray]:
        m = self.metric
        return {"sum": m.real_features_sum.cpu().numpy(), "cov_sum": m.real_features_cov_sum.cpu().numpy(),
                "n": np.array(int(m.real_features_num_samples))}

    def set_real_state(self, state: Dict[str, np.ndarray]) -> None:
        m = self.metric
        m.real_features_sum = torch.as_tensor(state["sum"], dtype=torch.float64, device=self.device)
        m.real_features_cov_sum = torch.as_tensor(state["cov_sum"], dtype=torch.float64, device=self.device)
        m.real_features_num_samples = torch.as_tensor(int(state["n"]), device=self.device)

    def compute(self) -> float:
        return float(self.metric.compute())


def feature_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of [N, D] features, float64."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) < 2:
        raise UserError(f"need at least 2 images for feature statistics, got {len(f)}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(s1 s2) = tr sqrt(s1^1/2 s2 s1^1/2), the latter symmetric PSD (eigenvalues, no complex sqrtm)."""
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2): FID's formula; scipy's sqrtm when installed, else eigh.

    As pytorch-fid does, ``eps`` is added to the diagonals when the product's square root is not finite.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrtm_scipy(s1, s2, eps)
    if tr_covmean is None:
        tr_covmean = _trace_sqrt_product(s1, s2)
        if not np.isfinite(tr_covmean):
            off = np.eye(len(s1)) * eps
            tr_covmean = _trace_sqrt_product(s1 + off, s2 + off)
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def _trace_sqrtm_scipy(s1: np.ndarray, s2: np.ndarray, eps: float) -> Optional[float]:
    try:
        from scipy import linalg
    except ImportError:
        return None
    covmean = linalg.sqrtm(s1.dot(s2))
    if isinstance(covmean, tuple):  # old scipy returned (sqrtm, errest) with disp=False
        covmean = covmean[0]
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            return None  # numerically bad: let the eigenvalue route answer
        covmean = covmean.real
    return float(np.trace(covmean))


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    out = []
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s:s + chunk], x)
        out.append(d.kthvalue(min(k + 1, len(x)), dim=1).values)  # +1: the point itself at distance 0
    return torch.cat(out)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = []
    for s in range(0, len(queries), chunk):
        d = torch.cdist(queries[s:s + chunk], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> Dict[str, float]:
    """Kynkaanniemi et al.'s improved precision (fake inside the real k-NN manifold) and recall (the converse)."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if len(r) <= k or len(f) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} real and generated images "
                        f"(got {len(r)} and {len(f)})")
    precision = _coverage(f, r, _knn_radii(r, k, chunk), chunk)
    recall = _coverage(r, f, _knn_radii(f, k, chunk), chunk)
    return {"precision": precision, "recall": recall, "k": k}


def balanced_seeded_indices(labels: torch.Tensor, n: int, seed: int = 0) -> list:
    """``n`` indices, class-balanced (round-robin over classes), each class shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    per_class = []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        per_class.append(idx[torch.randperm(len(idx), generator=g)].tolist())
    out, k = [], 0
    while len(out) < n and any(k < len(p) for p in per_class):
        out += [p[k] for p in per_class if k < len(p)]
        k += 1
    return sorted(out[:n])


def real_images(data_root: str, n: int, image_size: int = 32, data_name: str = "imagefolder", seed: int = 0,
                split: str = "test") -> Tuple[torch.Tensor, str]:
    """A seeded, class-balanced subset of ``n`` real images in [-1, 1] ([n, 3, S, S]) and the data set's name."""
    data = load_data(DataConfig(name=data_name, root=str(data_root), image_size=image_size),
                     mean=(0.5,) * 3, std=(0.5,) * 3, need_train=False)
    ds = data.test
    idx = balanced_seeded_indices(ds.set.labels, n, seed)
    return torch.stack([ds[i][0] for i in idx]), data.source


def _cached(prefix: str, key: str, n: int, seed: int, image_size: int, data_name: str, data_root: str, cache_dir,
            compute: Callable[[], Dict[str, np.ndarray]]) -> Tuple[Dict[str, np.ndarray], Optional[str], bool]:
    """``compute()``'s arrays, kept in ``cache_dir`` as a .npz keyed by the feature network ``key`` and the real set.

    Returns (arrays, cache file or None, whether they came from the cache).
    """
    ident = json.dumps({"key": key, "n": n, "seed": seed, "size": image_size, "data": [data_name, str(Path(data_root).resolve())]},
                       sort_keys=True)
    if cache_dir is None:
        return compute(), None, False
    tag = hashlib.sha256(ident.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{prefix}-{key[:16]}-n{n}-s{seed}-{tag}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["ident"]) == ident:
                    return {k: z[k] for k in z.files if k != "ident"}, str(path), True
        except (OSError, KeyError, ValueError):
            pass  # unreadable cache: recompute and overwrite
    arrays = compute()
    atomic_write(path, lambda f: np.savez(f, ident=np.array(ident), **arrays))
    return arrays, str(path), False


def reference_features(extractor: Callable[[torch.Tensor], np.ndarray], key: str, data_root: str, n: int,
                       image_size: int = 32, data_name: str = "imagefolder", seed: int = 0,
                       cache_dir=None) -> Dict[str, Any]:
    """Features, mean and covariance of ``n`` real test images, cached in ``cache_dir`` as a .npz.

    ``key`` names the feature network (its sha256); the cache file is keyed by it, the image count, the seed,
    the image size and the data folder.
    """
    def compute():
        images, source = real_images(data_root, n, image_size, data_name, seed)
        feats = extractor(images).astype(np.float32)  # what the cache holds, so cached == fresh
        mu, sigma = feature_stats(feats)
        return {"features": feats, "mu": mu, "sigma": sigma, "source": np.array(source)}

    z, path, cached = _cached("quality-ref", key, n, seed, image_size, data_name, data_root, cache_dir, compute)
    feats = z["features"].astype(np.float64)
    return {"features": feats, "mu": z["mu"], "sigma": z["sigma"], "n": len(feats), "source": str(z["source"]),
            "cache": path, "cached": cached}


def inception_fid(fake: torch.Tensor, weights, data_root: str, *, real: int, data_name: str, seed: int, cache_dir,
                  device="cpu", batch_size: int = 64) -> Dict[str, Any]:
    """FID of ``fake`` against ``real`` real test images by torchmetrics on local weights; real statistics cached."""
    fid = InceptionFID(weights, device)
    size = int(fake.shape[-1])

    def compute():
        images, _ = real_images(data_root, real, size, data_name, seed)
        fid.update(images, real=True, batch_size=batch_size)
        return fid.real_state()

    state, path, _ = _cached("fid-ref", fid.sha256, real, seed, size, data_name, data_root, cache_dir, compute)
    fid.set_real_state(state)
    fid.update(fake, real=False, batch_size=batch_size)
    return {"fid": fid.compute(), "fid_name": fid.name, "fid_reference_cache": path,
            "inception": {"weights": str(fid.path), "sha256": fid.sha256,
                          "variant": "torch-fidelity FID Inception through torchmetrics FrechetInceptionDistance"}}


def evaluate_quality(fake: torch.Tensor, classifier, data_root: str, *, real: int = 10000, data_name: str = "imagefolder",
                     seed: int = 0, k: int = 3, inception_weights=None, cache_dir=None, device="cpu",
                     batch_size: int = 256) -> Dict[str, Any]:
    """CFD, precision and recall of ``fake`` ([N, 3, H, W] in [-1, 1]) against real test images; FID with weights.

    ``classifier``: a classifier checkpoint path or a ``ClassifierFeatures``. Reference statistics are cached
    in ``cache_dir`` (default: beside the classifier checkpoint).
    """
    fx = classifier if isinstance(classifier, ClassifierFeatures) else ClassifierFeatures(classifier, device)
    size = int(fake.shape[-1])
    cache = Path(cache_dir) if cache_dir is not None else fx.path.parent
    ref = reference_features(fx, fx.sha256, data_root, real, size, data_name, seed, cache)
    feats = fx(fake, batch_size)
    mu, sigma = feature_stats(feats)
    pr = precision_recall(ref["features"], feats, k)
    out: Dict[str, Any] = {
        "cfd": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "cfd_name": fx.name,
        "classifier": {"arch": fx.arch, "checkpoint": str(fx.path), "sha256": fx.sha256, "feature_dim": fx.dim},
        "precision": pr["precision"], "recall": pr["recall"], "k": k,
        "n_generated": int(len(fake)), "n_real": ref["n"], "real_source": ref["source"], "real_seed": seed,
        "reference_cache": ref["cache"],
    }
    if inception_weights:
        out.update(inception_fid(fake, inception_weights, data_root, real=real, data_name=data_name, seed=seed,
                                 cache_dir=cache, device=device, batch_size=min(batch_size, 64)))
    return out


def format_report(r: Dict[str, Any]) -> str:
    """The human-readable lines of an ``evaluate_quality`` result."""
    lines = [f"{r['cfd_name']}: {r['cfd']:.4f}",
             f"precision {r['precision']:.4f}, recall {r['recall']:.4f} (k={r['k']}, same classifier features)",
             f"{r['n_generated']} generated vs {r['n_real']} real images ({r['real_source']}, seed {r['real_seed']})"]
    if "fid" in r:
        lines.insert(1, f"{r['fid_name']}: {r['fid']:.4f}")
    else:
        lines.append("FID: not computed (no --inception-weights; nothing is downloaded)")
    return "\n".join(lines)

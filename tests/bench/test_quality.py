"""Sample-quality metrics: Frechet distance, k-NN precision/recall, classifier and Inception features, `redistill quality`."""

import json

import numpy as np
import pytest
import torch

from bench.quality import (ClassifierFeatures, InceptionFID, balanced_seeded_indices, evaluate_quality, feature_stats,
                           frechet_distance, last_linear, precision_recall, reference_features)
from redistill.cli import main
from redistill.errors import UserError

CLF_ARCH = "mobilenetv3_small-2-22121111211"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def classifier_ck(tmp_path_factory, tiny_images):
    """A tiny (untrained) 4-class classifier checkpoint whose config points at the tiny image folder."""
    from train.checkpoint import make_payload, save_checkpoint
    from train.config import RunConfig
    from train.models import build_model

    torch.manual_seed(0)
    model = build_model(CLF_ARCH, 4, 32, width_mult=0.25).eval()
    cfg = RunConfig().to_dict()
    cfg["data"]["root"] = str(tiny_images)
    path = tmp_path_factory.mktemp("clf") / "best.pt"
    save_checkpoint(make_payload(model, arch=CLF_ARCH, role="teacher", method="teacher", num_classes=4, image_size=32,
                                 classes=["cat", "dog", "ship", "truck"], mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
                                 width_mult=0.25, plans=[], red_distance="cosine", config=cfg, epoch=1, history=[],
                                 best_val=0.0), path)
    return path


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    mu, sigma = feature_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # 1-D Gaussians: (m1 - m2)^2 + s1 + s2 - 2 sqrt(s1 s2), s the variances
    m1, s1, m2, s2 = 0.3, 2.0, -1.1, 0.5
    want = (m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)
    assert frechet_distance([m1], [[s1]], [m2], [[s2]]) == pytest.approx(want, rel=1e-9)
    # commuting (diagonal) covariances: sum over dimensions of the 1-D formula
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = 1.0 + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    assert frechet_distance(np.zeros(3), np.diag(d1), np.array([1.0, 0, 0]), np.diag(d2)) == pytest.approx(want, rel=1e-9)
    # a full, non-diagonal covariance S against c^2 S: the square root is c S, so the distance is |dmu|^2 + (1 - c)^2 tr S
    c, shift = 1.7, np.array([0.5, -1.0, 0.0, 2.0, 0.3, -0.2])
    want = shift @ shift + (1 - c) ** 2 * np.trace(sigma)
    assert frechet_distance(mu, sigma, mu + shift, c * c * sigma) == pytest.approx(want, rel=1e-9)
    # a general case against the defining formula: tr (S1 S2)^1/2 is the sum of the square roots of S1 S2's eigenvalues
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.2
    mu2, sigma2 = feature_stats(b)
    root = np.sqrt(np.clip(np.linalg.eigvals(sigma @ sigma2).real, 0, None)).sum()
    want = (mu - mu2) @ (mu - mu2) + np.trace(sigma) + np.trace(sigma2) - 2 * root
    assert frechet_distance(mu, sigma, mu2, sigma2) == pytest.approx(want, rel=1e-9)
    few = rng.normal(size=(3, 6))  # rank-2 covariance
    assert np.isfinite(frechet_distance(*feature_stats(few), mu, sigma))


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(40, 8))
    assert precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = real + 100.0
    pr = precision_recall(real, far)
    assert pr["precision"] == 0.0 and pr["recall"] == 0.0
    # a collapsed generator: precise (inside the real manifold) but with low recall
    collapsed = real[0] + 1e-3 * rng.normal(size=(8, 8))
    pr = precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] == pytest.approx(1 / 40)


def test_balanced_seeded_indices():
    labels = torch.tensor([0, 1, 2, 3] * 5)
    a = balanced_seeded_indices(labels, 8, seed=0)
    assert a == balanced_seeded_indices(labels, 8, seed=0) and len(a) == 8
    assert sorted(labels[a].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert a != balanced_seeded_indices(labels, 8, seed=1)


def test_classifier_features_are_the_last_linear_inputs(classifier_ck):
    fx = ClassifierFeatures(classifier_ck)
    name, layer = last_linear(fx.model)
    assert name == "classifier.3" and fx.dim == layer.in_features
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    f = fx(x, batch_size=2)
    assert f.shape == (5, fx.dim) and f.dtype == np.float64
    assert np.allclose(fx(x[:2]), f[:2], atol=1e-5)
    assert fx(torch.rand(3, 3, 48, 48) * 2 - 1).shape == (3, fx.dim)  # other sizes are resized
    assert "classifier-feature Frechet distance (CFD)" in fx.name and CLF_ARCH in fx.name and "FID" not in fx.name


def test_reference_statistics_are_cached(classifier_ck, tiny_images, tmp_path):
    fx = ClassifierFeatures(classifier_ck)
    first = reference_features(fx, fx.sha256, str(tiny_images), 8, cache_dir=tmp_path)
    again = reference_features(fx, fx.sha256, str(tiny_images), 8, cache_dir=tmp_path)
    assert not first["cached"] and again["cached"] and first["cache"] == again["cache"]
    assert np.array_equal(first["features"], again["features"]) and np.array_equal(first["sigma"], again["sigma"])
    assert len(list(tmp_path.glob("*.npz"))) == 1
    reference_features(fx, fx.sha256, str(tiny_images), 12, cache_dir=tmp_path)  # another count: another file
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_evaluate_quality_real_against_real_is_perfect(classifier_ck, tiny_images, tmp_path):
    from bench.quality import real_images

    imgs, _ = real_images(str(tiny_images), 16)
    assert imgs.shape == (16, 3, 32, 32) and imgs.min() >= -1 and imgs.max() <= 1
    r = evaluate_quality(imgs, classifier_ck, str(tiny_images), real=16, cache_dir=tmp_path)
    assert r["cfd"] == pytest.approx(0.0, abs=1e-3) and r["precision"] == 1.0 and r["recall"] == 1.0
    assert "fid" not in r and r["n_real"] == 16
    noise = torch.rand(16, 3, 32, 32) * 2 - 1
    r2 = evaluate_quality(noise, classifier_ck, str(tiny_images), real=16, cache_dir=tmp_path)
    assert r2["cfd"] > r["cfd"]


def test_classifier_must_be_a_classifier(tmp_path):
    from tests.train.test_sampling import save_denoiser

    ck = save_denoiser(tmp_path / "d.pt")
    with pytest.raises(UserError, match="needs a classifier checkpoint"):
        ClassifierFeatures(ck)


def _random_fid_inception(path):
    """A random Inception-v3 with the FID network's 1008 classes, its BatchNorm statistics set on one batch
    so that its features are of order one; saved as a plain state dict, like the real weights file."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics = this batch's
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to download weights fails the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


def test_fid_is_torchmetrics_on_local_weights(tmp_path, offline):
    w = _random_fid_inception(tmp_path / "pt_inception.pth")
    fid = InceptionFID(w)
    assert fid.name.startswith("FID (torchmetrics FrechetInceptionDistance") and len(fid.sha256) == 64
    g = torch.Generator().manual_seed(0)
    a = torch.rand(12, 3, 32, 32, generator=g) * 2 - 1
    b = (torch.rand(12, 3, 32, 32, generator=g) * 2 - 1) * 0.5 + 0.3
    fid.update(a, real=True, batch_size=5)
    fid.update(b, real=False)
    got = fid.compute()
    # the same distance from the Inception features by the closed form: the library scores what it should
    feats = [fid.metric.inception(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)).double().numpy() for x in (a, b)]
    assert np.abs(feats[0]).mean() > 1e-3  # features of order one, so the comparison means something
    assert got == pytest.approx(frechet_distance(*feature_stats(feats[1]), *feature_stats(feats[0])), rel=1e-3)
    # the real statistics survive a cache round trip, and a set against itself scores about zero
    state = fid.real_state()
    again = InceptionFID(w)
    again.set_real_state(state)
    again.update(a, real=False)
    assert abs(again.compute()) < 1e-3 * got


def test_fid_weights_are_checked_before_use(tmp_path, offline):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="not an Inception-v3 state_dict of the FID network"):
        InceptionFID(tmp_path / "bad.pth")
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / "imagenet.pth")  # torchvision's ImageNet head
    with pytest.raises(UserError, match=r"want \(1008, 2048\)"):
        InceptionFID(tmp_path / "imagenet.pth")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    with pytest.raises(UserError, match="does not fit the FID Inception-v3"):
        InceptionFID(tmp_path / "partial.pth")
    (tmp_path / "pickle.pth").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="not a loadable PyTorch state_dict"):
        InceptionFID(tmp_path / "pickle.pth")
    with pytest.raises(UserError, match="nothing is downloaded"):
        InceptionFID(tmp_path / "missing.pth")


def test_quality_command_on_samples_and_on_a_checkpoint(classifier_ck, tiny_images, tmp_path, capsys):
    from tests.train.test_sampling import save_denoiser

    ck = save_denoiser(tmp_path / "best.pt", data_root=tiny_images)
    out = tmp_path / "s"
    assert main(["sample", str(ck), "--steps", "2", "--n", "8", "--out", str(out)]) == 0
    q = tmp_path / "q.json"
    rc = main(["quality", str(out / "samples.npz"), "--classifier", str(classifier_ck), "--real", "16",
               "--cache", str(tmp_path / "cache"), "--json", str(q)])
    text = capsys.readouterr().out
    assert rc == 0 and "classifier-feature Frechet distance (CFD) on " + CLF_ARCH in text and "FID: not computed" in text
    r = json.loads(q.read_text())
    assert {"cfd", "precision", "recall", "cfd_name", "classifier", "samples"} <= set(r) and "fid" not in r
    assert r["n_generated"] == 8 and r["n_real"] == 16 and r["samples"]["sampler"] == "ddim"
    # straight from the checkpoint: the same samples, so the same numbers
    q2 = tmp_path / "q2.json"
    assert main(["quality", str(ck), "--steps", "2", "--n", "8", "--classifier", str(classifier_ck), "--real", "16",
                 "--cache", str(tmp_path / "cache"), "--json", str(q2)]) == 0
    assert json.loads(q2.read_text())["cfd"] == pytest.approx(r["cfd"], rel=1e-6)


@pytest.mark.slow
def test_quality_command_with_inception_weights(classifier_ck, tiny_images, tmp_path, offline):
    from tests.train.test_sampling import save_denoiser

    ck = save_denoiser(tmp_path / "best.pt", data_root=tiny_images)
    w = _random_fid_inception(tmp_path / "pt_inception.pth")
    q, q2 = tmp_path / "q.json", tmp_path / "q2.json"
    args = ["quality", str(ck), "--steps", "2", "--n", "8", "--classifier", str(classifier_ck), "--real", "8",
            "--inception-weights", str(w), "--cache", str(tmp_path / "cache")]
    assert main(args + ["--json", str(q)]) == 0
    r = json.loads(q.read_text())
    assert r["fid"] > 0 and "torchmetrics" in r["fid_name"] and r["inception"]["sha256"]
    assert main(args + ["--json", str(q2)]) == 0  # the real statistics from the cache: the same FID
    assert json.loads(q2.read_text())["fid"] == pytest.approx(r["fid"], rel=1e-6)
    assert len(list((tmp_path / "cache").glob("fid-ref-*.npz"))) == 1

"""Quantization-aware fine-tuning: its loss and seeded loop, and an export that misses its goal tries it, judges it
against the original FP32 graph and records it."""

import pytest
import torch

from export.pipeline import ExportOptions, run_export
from export.qat import QATSettings, kl_from, train_kl
from redistill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_is_zero_for_the_same_outputs_and_positive_otherwise():
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    assert float(kl_from(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_from(x, x.flip(1))) > 0.1


def _fit(seed):
    """``train_kl`` moving a linear layer towards another's outputs; its KL curve and weights."""
    torch.manual_seed(0)
    reference, model = torch.nn.Linear(12, 10), torch.nn.Linear(12, 10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 3, 2, 2, generator=g)
    flat = lambda m: torch.nn.Sequential(torch.nn.Flatten(), m)
    train = torch.utils.data.TensorDataset(x, torch.zeros(128, dtype=torch.long))
    said = []
    curve, images, _ = train_kl(flat(model), flat(reference).requires_grad_(False), list(model.parameters()), train,
                                QATSettings(epochs=3, lr=0.5, batch=32, seed=seed), said.append)
    return curve, images, model.weight.detach().clone(), said


def test_the_loop_lowers_the_kl_is_seeded_and_reports_each_epoch():
    curve, images, w, said = _fit(0)
    assert len(curve) == 3 and curve[-1] < curve[0] and images == 3 * 128
    assert sum("QAT epoch" in s for s in said) == 3
    again, _, w_again, _ = _fit(0)
    assert again == curve and torch.equal(w, w_again)
    other, _, w_other, _ = _fit(1)  # another seed shuffles and flips differently
    assert not torch.equal(w, w_other)


def test_an_export_that_misses_its_goal_tries_qat_and_records_it(checkpoint, tmp_path, monkeypatch):
    """The goal cannot be met (every score misses): the export fine-tunes, searches again against the original FP32
    graph, keeps the closer INT8 graph and says which in the manifest; the FP32 side of the test drop is unchanged."""
    import export.int8_search as search

    monkeypatch.setattr(search.Score, "meets", lambda self, max_drop: False)
    opts = dict(target="orin-int8", calib_method="minmax", calib_images=16, int8_max_float_nodes=0, int8_refine_scales=False, verify_images=16,
                quiet=True)
    _, plain = run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "ptq"), **opts))
    path, m = run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "qat"), int8_qat_epochs=1, **opts))
    qat = m["quantization"]["qat"]
    assert plain["quantization"]["qat"] is None
    assert qat["settings"]["epochs"] == 1 and isinstance(qat["chosen"], bool)
    assert {"validation_ptq", "validation_qat", "kl_before", "kl_after"} <= set(qat)
    assert qat["validation_ptq"].items() <= plain["quantization"]["search"]["validation"].items()
    assert m["accuracy"]["fp32_top1"] == plain["accuracy"]["fp32_top1"]
    chosen = qat["validation_qat"] if qat["chosen"] else qat["validation_ptq"]
    assert m["quantization"]["search"]["validation"]["agreement"] == chosen["agreement"]


def test_qat_options_are_checked_before_any_work(checkpoint, denoiser_checkpoint, tmp_path):
    with pytest.raises(UserError, match="--int8-qat-epochs must be 0"):
        run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "a"), target="orin-int8", int8_qat_epochs=-1))
    with pytest.raises(UserError, match="--int8-qat-epochs applies to classifiers"):
        run_export(ExportOptions(str(denoiser_checkpoint), out=str(tmp_path / "b"), target="orin-int8",
                                 int8_qat_epochs=1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

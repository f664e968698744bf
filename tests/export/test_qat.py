"""Quantization-aware fine-tuning: the fake rounding models onnxruntime's INT8 graph, fine-tuning moves the rounded
network towards FP32, and an export that misses its goal tries it, judges it against the original FP32 graph and
records it."""

import copy

import numpy as np
import pytest
import torch

from export.onnx_export import export_onnx
from export.pipeline import ExportOptions, load_sets, run_export
from export.qat import FakeQuant, QATSettings, finetune, observe, unwrap, wrap
from export.quantize import quantize_int8
from export.verify import run, session, take
from redistill.errors import UserError
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.fold import fold_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folded_and_sets(checkpoint):
    ck = load_checkpoint(checkpoint)
    folded = fold_batchnorm(model_from_checkpoint(ck), 32).eval()
    _, int8 = load_sets(ck, ExportOptions(str(checkpoint), target="orin-int8"), need_calib=True)
    return folded, int8


def test_fake_rounding_of_a_conv_chain_is_onnxruntimes():
    """Convs and a linear layer only, where every tensor onnxruntime quantizes is a wrapped layer's input or output:
    the fake-quantized network's logits are far closer to the INT8 graph's than FP32's are (same ranges, scales
    and rounding)."""
    net = _conv_net()
    x = torch.randn(32, 3, 16, 16).numpy()
    q_logits = run(session(quantize_int8(export_onnx(net, 16), x, "minmax")), x)
    fq = copy.deepcopy(net)
    layers = wrap(fq)
    assert len(layers) == 3 and all(isinstance(m, FakeQuant) for m in layers)
    observe(layers, fq, x)
    with torch.no_grad():
        fq_logits, fp32_logits = fq(torch.from_numpy(x)).numpy(), net(torch.from_numpy(x)).numpy()
    assert np.abs(fq_logits - q_logits).mean() < 0.5 * np.abs(fp32_logits - q_logits).mean()


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()


def test_finetuning_brings_the_rounded_network_towards_fp32_and_unwraps():
    net = _conv_net()
    with torch.no_grad():  # coarse weights, so that rounding costs something to learn away
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 3, 16, 16, generator=g)
    train = torch.utils.data.TensorDataset(x, torch.zeros(256, dtype=torch.long))
    before = copy.deepcopy(net.state_dict())
    model, rec = finetune(net, train, x[:64].numpy(), x[:64].numpy(), QATSettings(epochs=4, lr=0.01, batch=32))
    assert rec["kl_after"] < rec["kl_before"] and len(rec["train_kl_per_epoch"]) == 4
    assert rec["images_trained"] == 4 * 256 and rec["layers"] == 3
    assert not any(isinstance(m, FakeQuant) for m in model.modules())
    assert model.state_dict().keys() == net.state_dict().keys()
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the copy was trained
    for k, v in before.items():  # the original was not
        assert torch.equal(net.state_dict()[k], v)


def test_a_real_student_fine_tunes_and_exports(folded_and_sets):
    folded, int8 = folded_and_sets
    calib, _ = take(int8.calib, 16)
    model, rec = finetune(folded, int8.calib, calib, calib, QATSettings(epochs=1, batch=16))
    assert rec["layers"] == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in folded.modules())
    export_onnx(model, 32)  # the fine-tuned network exports as the original does


def test_unwrap_gives_back_the_same_modules():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(1, 3, 8, 8))
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(wrap(net)) == 2
    unwrap(net)
    assert [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))] == convs


def test_an_export_that_misses_its_goal_tries_qat_and_records_it(checkpoint, tmp_path, monkeypatch):
    """The goal cannot be met (every score misses): the export fine-tunes, searches again against the original FP32
    graph, keeps the closer INT8 graph and says which in the manifest; the FP32 side of the test drop is unchanged."""
    import export.int8_search as search

    monkeypatch.setattr(search.Score, "meets", lambda self, max_drop: False)
    opts = dict(target="orin-int8", calib_method="minmax", calib_images=16, int8_max_float_nodes=0, verify_images=16,
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

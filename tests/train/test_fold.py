import pytest
import torch

from tests.export.conftest import image_root, make_student  # noqa: F401  (the export tests' tiny data and student)
from train.fold import ChannelAffine, fold_batchnorm
from train.red import REDBlock


def _bn_count(model):
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_fold_removes_every_batchnorm_and_keeps_outputs(image_root, make_student):
    _, model, plans = make_student("quick", image_root, steps=1)
    assert _bn_count(model) > 0
    folded = fold_batchnorm(model, 32)
    assert _bn_count(folded) == 0
    assert _bn_count(model) > 0, "the original must be left untouched"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), folded(x), atol=1e-4)
    # RED blocks stay (they are part of the deployed student), their BNs folded into gate/encode convs
    blocks = [m for m in folded.modules() if isinstance(m, REDBlock)]
    assert len(blocks) == 5
    assert all(b.record is False and b.last is None for b in blocks)
    # a BN behind a RED block placed on a conv's output (the stem's, at least) becomes a per-channel affine
    stats = folded.fold_stats
    assert 1 <= stats["as_affine"] <= len(plans)
    assert stats["as_affine"] == sum(isinstance(m, ChannelAffine) for m in folded.modules())
    assert stats["into_conv"] + stats["as_affine"] == _bn_count(model)


@pytest.mark.parametrize("preset", ["resnext18_x4", "mobilenetv2_x4"])
def test_fold_other_families(image_root, make_student, preset):
    _, model, _ = make_student(preset, image_root, steps=0)
    folded = fold_batchnorm(model, 32)
    assert _bn_count(folded) == 0
    assert folded.fold_stats["into_conv"] > 0


def test_fold_strips_hooks(image_root, make_student):
    _, model, _ = make_student("quick", image_root, steps=0)
    model.features[1].register_forward_hook(lambda *a: None)
    folded = fold_batchnorm(model, 32)
    assert not any(m._forward_hooks for m in folded.modules())

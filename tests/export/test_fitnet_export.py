"""A FitNet student exports exactly as a plain student: its regressors are training-only and stay out of the graph."""

import torch

from redistill.cli import main
from export.onnx_export import export_onnx
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.fold import fold_batchnorm
from train.hints import REGRESSOR_KEY
from train.models import build_model

TINY = ["data.batch_size=8", "data.eval_batch_size=16", "data.val_fraction=0.1", "epochs=1"]


def _graph(model):
    proto = export_onnx(fold_batchnorm(model, 32), 32)
    return [n.op_type for n in proto.graph.node], sorted(tuple(i.dims) for i in proto.graph.initializer)


def test_fitnet_student_exports_the_plain_students_graph(tiny_images, tmp_path):
    common = ["quick", f"data.root={tiny_images}", f"out_dir={tmp_path}", *TINY]
    assert main(["distill", *common, "method=teacher", "name=t"]) == 0
    assert main(["distill", *common, "method=fitnet", "name=f", f"teacher.checkpoint={tmp_path}/t/teacher/best.pt"]) == 0
    ck = load_checkpoint(tmp_path / "f" / "student" / "best.pt")
    plain = build_model(ck["arch"], ck["num_classes"], 32).eval()
    with torch.no_grad():  # distinct values everywhere, as trained weights have (equal constants export as Identity)
        for t in plain.state_dict().values():
            if t.is_floating_point():
                t.add_(1e-3 * torch.rand_like(t))
    assert REGRESSOR_KEY in ck and not ck["red"]["sites"]
    assert ck["model"].keys() == plain.state_dict().keys()
    assert _graph(model_from_checkpoint(ck)) == _graph(plain)

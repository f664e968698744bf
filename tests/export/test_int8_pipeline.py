"""`redistill export` at an INT8 target: the validation split the choices are made on, the nodes kept in float in
the bundle and its manifest, and the refusals that come before any work."""

import json

import onnx
import pytest
import torch

from export import refine
from export.bundle import verify_bundle
from export.calibration import CALIBRATION, auto_methods
from export.pipeline import ExportOptions, Int8Data, load_sets, run_export
from export.quantize import float_nodes, quantized_nodes
from export.verify import take
from redistill.cli import main
from redistill.errors import UserError
from train.config import DataConfig
from train.data import balanced_indices, load_data


def _ck_with(checkpoint, tmp_path, **data):
    """The fixture checkpoint with its recorded data config changed (as if trained so)."""
    from train.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(checkpoint)
    ck["config"]["data"].update(data)
    return save_checkpoint(ck, tmp_path / "ck" / "best.pt")


def test_validation_is_the_runs_held_out_split(checkpoint, image_root):
    ck = torch.load(checkpoint, weights_only=True)
    data, int8 = load_sets(ck, ExportOptions(str(checkpoint), target="orin-int8"), need_calib=True)
    assert isinstance(int8, Int8Data) and int8.val_fraction == 0.05
    # exactly the images training held out (train.data.load_data with the run's data config)
    run = load_data(DataConfig(root=str(image_root), val_fraction=0.05), mean=ck["mean"], std=ck["std"])
    assert torch.equal(int8.val.set.images, run.val.set.images) and torch.equal(int8.val.set.labels, run.val.set.labels)
    assert torch.equal(int8.calib.set.images, run.train.set.images)
    # calibration images come from the training part only; neither part touches the test split
    assert not set(int8.train_index) & set(int8.val_index) and len(int8.val_index) == 10
    calib_pos = [int8.train_index[i] for i in balanced_indices(int8.calib.set.labels, 16)]
    assert not set(calib_pos) & set(int8.val_index)
    assert int8.calib.set.source.endswith("/train") and data.test.set.source.endswith("/test")
    flat = lambda imgs: {bytes(t.contiguous().numpy()) for t in imgs}  # noqa: E731
    assert not flat(int8.val.set.images) & flat(data.test.set.images)
    assert not flat(int8.calib.set.images) & flat(int8.val.set.images)
    # the validation images are transformed as the test images are
    x, _ = take(int8.val, 2)
    assert x.shape == (2, 3, 32, 32) and abs(float(x.mean())) < 3


def test_search_keeps_nodes_float_in_bundle_and_manifest(checkpoint, tmp_path, monkeypatch):
    """With a validation score that falls once any node leaves INT8 (the real one is too coarse on 10 images to
    decide), the export keeps the first unit in float: the graph, the manifest and the report page agree."""
    import export.int8_search as search

    real = search.validate
    seen = {}

    def validate(q, images, labels, ref):
        s = real(q, images, labels, ref)
        n = len(quantized_nodes(q))
        whole = n == seen.setdefault("all", n)
        s.drop, s.agreement, s.se = (2.0, 0.5, 0.0) if whole else (0.25, 0.9, 0.0)
        return s

    monkeypatch.setattr(search, "validate", validate)
    out = tmp_path / "int8"
    path, m = run_export(ExportOptions(str(checkpoint), out=str(out), target="orin-int8", calib_method="minmax",
                                       calib_images=16, int8_max_float_nodes=3, int8_refine_scales=False, verify_images=8,
                                       quiet=True))
    m = verify_bundle(path)
    q = m["quantization"]
    nodes = q["float_nodes"]
    assert nodes and len(nodes) <= 3 and nodes == q["search"]["chosen"]["float_nodes"]
    assert [n for u in q["float_units"] for n in u["nodes"]] == nodes
    u = q["float_units"][0]
    assert u["rank"] == 1 and (u["val_drop_before"], u["val_drop_after"], u["agreement_after"]) == (2.0, 0.25, 0.9)
    assert "rank 1 of" in u["why"]
    assert q["search"]["goal_met"] and q["search"]["trace"][-1]["chosen"]
    proto = onnx.load(str(path / "model.onnx"))
    assert all(float_nodes(proto, nodes).values())
    assert not set(nodes) & set(quantized_nodes(proto)), "no DequantizeLinear feeds a node kept in float"
    assert m["preflight"]["int8"]["passed"] and m["preflight"]["int8"]["op_counts"]["QuantizeLinear"] > 10
    a = m["accuracy"]
    assert a["validation"]["drop"] == 0.25 and a["validation"]["goal_met"] and a["images"] == 30
    assert a["drop"] == pytest.approx(a["fp32_top1"] - a["int8_top1"]) and a["goal_max_drop"] == 0.5
    json.dumps(m, allow_nan=False)
    from bench.export_report import write_report

    fp32, _ = run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "fp32"), verify_images=8, quiet=True))
    r = write_report(fp32, path, tmp_path / "report", runs=2, warmup=0)
    md = (tmp_path / "report.md").read_text()
    assert r["float_units"] == q["float_units"] and "## INT8 choices (made on validation" in md
    assert f"`{nodes[0]}`" in md and "| minmax | 16 |" in md and "+2.00 -> +0.25" in md


def test_auto_tries_every_method_on_validation(checkpoint, tmp_path):
    path, m = run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "b"), target="cpu-int8", calib_images=16,
                                       int8_max_float_nodes=0, int8_refine_scales=False, verify_images=4, eval_subset=10, quiet=True))
    s = m["quantization"]["search"]
    calib = [t for t in s["trace"] if t["step"] == "calibration"]
    tried = {t["method"] for t in calib} | {f["method"] for f in s["failed"]}
    assert tried == set(CALIBRATION) and sum(t["chosen"] for t in calib) == 1
    chosen = next(t for t in calib if t["chosen"])
    assert chosen["agreement"] == max(t["agreement"] for t in calib)
    assert m["quantization"]["calibration"] == {**m["quantization"]["calibration"], "method": chosen["method"],
                                               "images": 16, "chosen_on": "validation", "split": "train"}


def test_refined_scales_are_tried_when_the_goal_is_missed_and_recorded(checkpoint, tmp_path, monkeypatch):
    """The default export refines the activation scales when the goal is missed (every graph scored with a drop of
    2 points here; agreement as measured): the trace, the record and the calibration say whether it was kept, and
    the bundle verifies either way."""
    import export.int8_search as search

    real = search.validate

    def validate(*a):
        s = real(*a)
        s.drop, s.se = 2.0, 0.0
        return s

    monkeypatch.setattr(search, "validate", validate)
    path, m = run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "b"), target="orin-int8",
                                       calib_method="minmax", calib_images=16,
                                       int8_max_float_nodes=0, verify_images=4, eval_subset=10, quiet=True))
    verify_bundle(path)
    s = m["quantization"]["search"]
    assert [t["step"] for t in s["trace"]] == ["calibration", "refine scales"]
    r = s["refine_scales"]
    assert r["kept"] == s["trace"][1]["chosen"] == s["chosen"]["scales_refined"]
    assert m["quantization"]["calibration"]["scales_refined"] == r["kept"]
    assert r["images"] == 16 and r["changed"] == len(r["factors"]) and set(r["factors"].values()) <= set(refine.FACTORS)
    proto = onnx.load(str(path / "model.onnx"))
    assert [n.op_type for n in proto.graph.node if proto.graph.output[0].name in n.output] == ["Gemm"]


def _no_work(monkeypatch):
    import export.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("the export started its work before refusing")

    monkeypatch.setattr(pipeline, "fold_batchnorm", boom)


def test_a_run_without_held_out_images_is_refused_unless_nothing_is_chosen(checkpoint, tmp_path, monkeypatch):
    ck = _ck_with(checkpoint, tmp_path, val_fraction=0.0)
    with monkeypatch.context() as mp:
        _no_work(mp)
        with pytest.raises(UserError, match=r"records no held-out validation images .*never on the test split.*"
                                            r"--calib-method minmax --calib-images 256 --int8-max-float-nodes 0 --no-int8-refine-scales") as e:
            run_export(ExportOptions(str(ck), out=str(tmp_path / "b"), target="orin-int8", quiet=True))
        assert "\n" not in str(e.value)
    _, m = run_export(ExportOptions(str(ck), out=str(tmp_path / "b"), target="orin-int8", calib_method="minmax",
                                    calib_images=8, int8_max_float_nodes=0, int8_refine_scales=False, verify_images=4, eval_subset=10, quiet=True))
    assert m["quantization"]["search"] is None and m["accuracy"]["validation"] is None
    assert m["quantization"]["calibration"]["images"] == 8  # from all 40 training images: none was held out


@pytest.mark.parametrize("args, match", [
    (["--calib-images", "0"], r"--calib-images '0': give auto or a positive count"),
    (["--calib-images", "many"], r"--calib-images 'many': give auto or a positive count"),
    (["--calib-method", "entropi"], r"unknown calibration method 'entropi'. Did you mean 'entropy'"),
    (["--int8-max-drop", "half"], r"--int8-max-drop 'half': give a number of top-1 points"),
    (["--int8-max-drop", "-1"], r"--int8-max-drop must be a number of top-1 points >= 0"),
    (["--int8-max-drop", "nan"], r"--int8-max-drop must be a number of top-1 points >= 0"),
    (["--int8-max-float-nodes", "-2"], r"--int8-max-float-nodes '-2': give 0 or a positive count"),
    (["--int8-val-images", "x"], r"--int8-val-images 'x': give 0 or a positive count"),
])
def test_bad_int8_options_are_one_line_before_any_work(args, match, tmp_path, capsys):
    # the checkpoint does not exist: an option refused first never gets as far as looking for it
    assert main(["export", str(tmp_path / "nope.pt"), "--target", "orin-int8", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not found" not in err
    import re

    assert re.search(match, err), err


def test_int8_defaults_match_the_help():
    import export.cli as cli
    import export.pipeline as pipeline

    assert (cli.INT8_GOAL_MAX_DROP, cli.INT8_MAX_FLOAT_NODES) == (pipeline.INT8_GOAL_MAX_DROP,
                                                                 pipeline.INT8_MAX_FLOAT_NODES)
    o = ExportOptions("x.pt")
    assert (o.calib_method, o.calib_images, o.int8_max_drop) == ("auto", 0, 0.5)


@pytest.mark.slow
def test_cli_int8_export_with_every_default(checkpoint, tmp_path, capsys):
    """`redistill export CK --target orin-int8` as a user types it: calibration and float nodes chosen on the
    validation split, the test drop reported once at the end."""
    out = tmp_path / "b"
    assert main(["export", str(checkpoint), "--target", "orin-int8", "--out", str(out), "--verify-images", "4"]) == 0
    said = capsys.readouterr().out
    assert said.index("INT8: choosing on 10 validation images") < said.index("on the test split")
    m = verify_bundle(out)
    assert m["quantization"]["search"]["candidates"] == {"methods": auto_methods(), "calib_images": [30]}
    assert all(float_nodes(onnx.load(str(out / "model.onnx")), m["quantization"]["float_nodes"]).values())

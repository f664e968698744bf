import json
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image
import torch

from export.bundle import read_manifest, verify_bundle
from export.pipeline import ExportOptions, run_export
from export.verify import run, session
from redistill.errors import UserError

KEYS = {"name", "created", "model", "input", "output", "preprocess", "precision", "target", "backend", "onnx",
        "reference", "versions", "verification", "accuracy", "memory", "schema", "schema_version", "files"}


def test_fp32_bundle(bundles):
    fp32, _ = bundles
    m = verify_bundle(fp32)
    assert KEYS <= set(m)
    assert m["precision"] == "fp32" and m["target"] == "tx2" and m["backend"] == "tensorrt"
    assert m["input"] == {"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32", "layout": "NCHW", "dynamic_batch": False}
    assert m["output"]["shape"] == [1, 10] and m["model"]["classes"][0] == "airplane"
    assert m["onnx"]["opset"] == 13 and m["onnx"]["ir_version"] == 7
    assert set(m["files"]) == {"model.onnx", "reference/inputs.npy", "reference/outputs.npy"}
    v = m["verification"]["fp32"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["top1_identical"] == v["images"] == 16
    assert m["accuracy"]["images"] == 30 and 0 <= m["accuracy"]["fp32_top1"] <= 100
    assert m["preprocess"]["scale"] == pytest.approx(1 / 255)
    proto = onnx.load(str(fp32 / "model.onnx"))
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert proto.graph.input[0].name == "input"
    # the reference pair is what the device will check: re-running model.onnx reproduces it
    x, y = np.load(fp32 / "reference/inputs.npy"), np.load(fp32 / "reference/outputs.npy")
    assert x.dtype == y.dtype == np.float32 and x.shape == (8, 3, 32, 32) and y.shape == (8, 10)
    assert np.abs(run(session(proto), x) - y).max() <= m["reference"]["atol"]
    json.dumps(m, allow_nan=False)  # strict JSON for the stdlib-only device agent


def test_int8_bundle(bundles):
    _, int8 = bundles
    m = verify_bundle(int8)
    assert m["precision"] == "int8" and m["target"] == "orin-int8" and m["backend"] == "tensorrt"
    assert m["preflight"]["int8"]["target"] == "orin-int8" and "INT8 flag" in m["target_note"]
    a = m["accuracy"]
    assert {"fp32_top1", "int8_top1", "drop", "goal_met"} <= set(a)
    assert a["drop"] == pytest.approx(a["fp32_top1"] - a["int8_top1"])
    assert m["quantization"]["format"] == "QDQ" and m["quantization"]["calibration"]["images"] == 16
    assert m["quantization"]["calibration"]["chosen_on"] == "given" and m["quantization"]["float_nodes"] == []
    v = a["validation"]  # measured on the run's held-out images (1 per class here), the test split once after
    assert v["images"] == 10 and v["drop"] == pytest.approx(v["fp32_top1"] - v["int8_top1"]) and a["images"] == 30
    assert [t["step"] for t in m["quantization"]["search"]["trace"]] == ["calibration"]
    proto = onnx.load(str(int8 / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    x, y = np.load(int8 / "reference/inputs.npy"), np.load(int8 / "reference/outputs.npy")
    assert np.abs(run(session(proto), x) - y).max() <= 1e-5  # ORT is deterministic on one machine
    json.dumps(m, allow_nan=False)


def test_tampered_bundle_is_detected(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles[0], copy)
    verify_bundle(copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="model.onnx does not match its sha256"):
        verify_bundle(copy)


def test_tx2_int8_refused_before_any_work(checkpoint, tmp_path):
    with pytest.raises(UserError, match=r"--target tx2-int8 is refused: .*TX2.*FP16.*--target cpu-int8"):
        run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "b"), target="tx2-int8", quiet=True))
    assert not (tmp_path / "b").exists()


def test_opset_above_13_refused_for_trt(checkpoint, tmp_path):
    with pytest.raises(UserError, match=r"--opset 17 is refused for --target tx2: TensorRT 8.2.*opset 13"):
        run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "b"), opset=17, quiet=True))


@pytest.mark.parametrize("content, match", [
    (b"not a zip at all", "corrupt or not a PyTorch file"),
    (b"hello\n", "corrupt or not a PyTorch file"),  # `echo hello > best.pt`: a KeyError inside torch.load
    (b"", "corrupt or not a PyTorch file"),
    (None, "not a ReDistill checkpoint"),
])
def test_corrupt_or_foreign_checkpoint(tmp_path, content, match):
    p = tmp_path / "x.pt"
    if content is None:
        torch.save({"conv.weight": torch.zeros(1)}, p)  # a bare state_dict from another tool
    else:
        p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        run_export(ExportOptions(str(p), out=str(tmp_path / "b"), quiet=True))
    assert not (tmp_path / "b").exists()


def test_failed_verification_leaves_no_bundle(bundles, checkpoint, tmp_path, monkeypatch):
    import export.verify as verify

    out = tmp_path / "b"
    shutil.copytree(bundles[0], out)  # an older bundle
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(verify, "FP32_ATOL", -1.0)  # no graph can pass: the export must fail cleanly
    with pytest.raises(UserError, match="verification failed"):
        run_export(ExportOptions(str(checkpoint), out=str(out), verify_images=4, quiet=True))
    assert [p.name for p in tmp_path.iterdir()] == ["b"], "no temp folder left behind"
    assert (out / "manifest.json").read_bytes() == before
    verify_bundle(out)


def _no_work(monkeypatch):
    """Fail the test if the export gets as far as folding: every refusal must come before the long work."""
    import export.pipeline as pipeline

    def boom(*a, **k):
        raise AssertionError("the export started its work before refusing --out")

    monkeypatch.setattr(pipeline, "fold_batchnorm", boom)


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("layout", ["notes", "bundles", "run", "file"])
def test_out_that_is_not_a_bundle_is_refused_and_kept(bundles, checkpoint, tmp_path, monkeypatch, layout):
    """`--out DIR` replaces only a bundle: a folder of notes, a folder of bundles, a run folder or a file survive."""
    out = tmp_path / "out"
    if layout == "notes":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    elif layout == "bundles":
        shutil.copytree(bundles[0], out / "quick-fp32")
        shutil.copytree(bundles[1], out / "quick-int8")
    elif layout == "run":
        out.mkdir()
        shutil.copy(checkpoint, out / "best.pt")
        shutil.copy(checkpoint, out / "last.pt")
    else:
        out.write_text("keep")
    before = _tree(tmp_path)
    _no_work(monkeypatch)
    with pytest.raises(UserError, match=f"^{out} is a (folder that is not a bundle|file); refusing to replace it") as e:
        run_export(ExportOptions(str(checkpoint), out=str(out), quiet=True))
    assert "\n" not in str(e.value)
    assert _tree(tmp_path) == before


def test_reexport_over_a_bundle_replaces_it_atomically(bundles, checkpoint, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundles[0], out)
    (out / "stale.txt").write_text("from an older export")  # a bundle folder is replaced whole
    run_export(ExportOptions(str(checkpoint), out=str(out), verify_images=4, eval_subset=10, quiet=True))
    assert verify_bundle(out)["accuracy"]["images"] == 10
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temp or old folder left behind"


def test_unwritable_out_refused_before_any_work(checkpoint, tmp_path, monkeypatch):
    from tests.redistill.test_io import read_only_folder

    ro = read_only_folder(tmp_path)
    _no_work(monkeypatch)
    with pytest.raises(UserError, match=f"cannot write {ro / 'b'}: {ro} is not writable"):
        run_export(ExportOptions(str(checkpoint), out=str(ro / "b"), quiet=True))


def test_wrong_data_classes(checkpoint, tmp_path):
    root = tmp_path / "other"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(root / split / c / "0.png")
    with pytest.raises(UserError, match="differ from the checkpoint's"):
        run_export(ExportOptions(str(checkpoint), out=str(tmp_path / "b"), data_root=str(root), quiet=True))


def test_manifest_reads_back(bundles):
    assert read_manifest(bundles[0])["schema"] == "redistill-bundle"

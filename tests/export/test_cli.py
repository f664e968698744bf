import subprocess
import sys

from redistill.cli import main


def test_help_lists_export_options(capsys):
    try:
        main(["export", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for flag in ("--int8", "--opset", "--target", "--out", "--calib-method", "--dynamic-batch"):
        assert flag in out


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not found" in err


def test_unknown_target_suggests(tmp_path, capsys):
    assert main(["export", "x.pt", "--target", "tx1"]) == 2
    assert "Did you mean 'tx2'" in capsys.readouterr().err


def test_help_does_not_import_torch():
    code = "import sys; from redistill.cli import build_parser; build_parser(); print('torch' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["False", "False"]


def test_cli_export_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli-bundle"
    assert main(["export", str(checkpoint), "--out", str(out), "--target", "cpu", "--dynamic-batch",
                 "--verify-images", "4", "--reference-images", "2", "--tarball"]) == 0
    assert (tmp_path / "cli-bundle.tar.gz").is_file()
    from export.bundle import verify_bundle

    m = verify_bundle(out)
    assert m["input"]["shape"] == ["batch", 3, 32, 32] and m["reference"]["count"] == 2 and m["target"] == "cpu"

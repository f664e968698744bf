import re
import subprocess
import sys

import pytest

from export.calibration import CALIBRATION
from export.pipeline import ExportOptions, check_options
from export.targets import TARGETS, TRT82_OPS, TRT82_SOURCE, Target, add_target
from redistill.cli import build_parser, main
from redistill.errors import UserError


def _export_help() -> str:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices["export"].format_help()


def test_help_lists_export_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--opset", "--target", "--out", "--calib-method", "--dynamic-batch"):
        assert flag in out
    assert not re.search(r"--int8\b(?!-)", out), "the precision is the target's; --int8 is only an error naming the INT8 targets"
    for flag in ("--int8-max-drop", "--int8-max-float-nodes", "--int8-val-images", "--calib-images {auto,N}",
                 "--int8-refine-scales, --no-int8-refine-scales"):
        assert flag in out
    for name in TARGETS:  # every target with its runtime and precision, and every calibration method
        t = TARGETS.get(name)
        assert f"{name}: {t.runtime}, {t.precision}" in out
    assert all(m in out for m in CALIBRATION) and "{" + ",".join(["auto", *CALIBRATION]) + "}" in out


@pytest.mark.parametrize("flag, refine", [([], True), (["--no-int8-refine-scales"], False),
                                          (["--int8-refine-scales"], True)])
def test_refine_scales_flag_reaches_the_export(monkeypatch, flag, refine):
    import export.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_export", lambda o: seen.append(o))
    assert main(["export", "x.pt", "--target", "orin-int8", *flag]) == 0
    assert [o.int8_refine_scales for o in seen] == [refine]


def test_a_new_target_is_one_registry_entry():
    """Registering a target is all it takes: the export help lists it and the options accept it."""
    t = add_target(Target("test-npu-int8", "tensorrt", "TensorRT 99 (test)", "int8", 12, 7, TRT82_OPS, TRT82_SOURCE))
    try:
        assert "test-npu-int8: TensorRT 99 (test), int8, opset <= 12" in _export_help()
        assert check_options(ExportOptions("x.pt", target="test-npu-int8", opset=12)) is t
        with pytest.raises(UserError, match="--opset 13 is refused for --target test-npu-int8: TensorRT 99"):
            check_options(ExportOptions("x.pt", target="test-npu-int8", opset=13))
        with pytest.raises(UserError, match="calibration method 'minmx'"):
            check_options(ExportOptions("x.pt", target="test-npu-int8", opset=12, calib_method="minmx"))
    finally:
        TARGETS.unregister("test-npu-int8")
    assert "test-npu-int8" not in _export_help()


def test_int8_flag_names_the_int8_targets(capsys):
    assert main(["export", "x.pt", "--int8", "--target", "orin"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--target orin-int8" in err and "--target cpu-int8" in err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not found" in err


def test_unknown_target_suggests(tmp_path, capsys):
    assert main(["export", "x.pt", "--target", "tx1"]) == 2
    assert "Did you mean 'tx2'" in capsys.readouterr().err
    assert main(["export", "x.pt", "--target", "orin-int9"]) == 2
    assert "Did you mean 'orin-int8'" in capsys.readouterr().err


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


def _make_commands(target: str):
    import shutil
    from pathlib import Path

    if not shutil.which("make"):
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run(["make", "-n", "-C", str(repo), target, "BIN=bin"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line.startswith("bin/redistill")]


def test_make_export_leaves_the_committed_results_page_alone():
    """`make export` is an everyday target: its FP32 vs INT8 report goes beside the bundles, not over bench/results."""
    cmds = _make_commands("export")
    assert [c.split()[1] for c in cmds] == ["export", "export", "export-report"]
    assert not any("bench/results" in c for c in cmds)
    assert cmds[-1].endswith("--out bundles/quick-export-report")
    (rewrite,) = _make_commands("export-results")
    assert rewrite.endswith("--out bench/results/export_quick")

import dataclasses
import typing

from redistill.cli import build_parser, main
from train import config as C


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_distill_help_documents_every_config_key(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = sub.choices["distill"].format_help()
    for key in _keys(C.RunConfig):
        assert key in text, key
    assert "--resume" in text and "torchrun" in text


def test_unknown_command_suggests(capsys):
    assert main(["distil"]) == 2
    assert "Did you mean 'distill'" in capsys.readouterr().err


def test_unknown_architecture_on_the_command_line_is_one_line(capsys, tmp_path):
    rc = main(["distill", "quick", "student.arch=mobilenetv22-4-1221111", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Did you mean 'mobilenetv2-4-1221111'" in err


def test_mismatched_layer_on_the_command_line(capsys, tmp_path, tiny_images):
    rc = main(["distill", "quick", f"data.root={tiny_images}", f"out_dir={tmp_path}", "epochs=1",
               "red.sites=[{student: features.0.0, where: out, teacher: features.9.block.3}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "RED site mismatch" in err and "features.9.block.3" in err

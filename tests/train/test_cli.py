import dataclasses
import re
import typing

import pytest

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


@pytest.mark.parametrize("site, match", [
    ("{student: features.0.0, where: out, teacher: features.9.block.3}", "RED site mismatch.*features.9.block.3"),
    ("{student: features.0.0, where: out, teacher: features.99}", "layer 'features.99' is not in"),
    ("{student: features.77, where: out, teacher: features.2.block.1.0}", "layer 'features.77' is not in"),
])
def test_red_site_mistakes_fail_before_any_training(capsys, tmp_path, tiny_images, monkeypatch, site, match):
    """Sites are planned on the untrained teacher and student: nothing trains and no run folder appears."""
    import train.trainer

    def no_training(*a, **k):
        raise AssertionError("training started before the RED sites were checked")

    monkeypatch.setattr(train.trainer, "fit", no_training)
    rc = main(["distill", "quick", f"data.root={tiny_images}", f"out_dir={tmp_path}", "epochs=1", f"red.sites=[{site}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and re.search(match, err), err
    assert list(tmp_path.iterdir()) == [], "a failed check must not leave a config.yaml that claims the run name"


@pytest.mark.parametrize("override, match", [
    ("optim.lr=-0.1", "optim.lr=-0.1 is out of range"),
    ("data.train_subset=-1", "data.train_subset=-1 is out of range"),
    ("optim.weight_decay=-0.0005", "optim.weight_decay=-0.0005 is out of range"),
    ("red.alpha=-50", "red.alpha=-50.0 is out of range"),
])
def test_bad_numbers_are_one_line_and_leave_nothing(capsys, tmp_path, tiny_images, override, match):
    rc = main(["distill", "quick", f"data.root={tiny_images}", f"out_dir={tmp_path}", "name=r", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_a_teacher_that_cannot_be_built_fails_before_the_run_folder_appears(capsys, tmp_path, tiny_images):
    rc = main(["distill", "ddpm_bench", "method=teacher", "unet.ch=4", f"data.root={tiny_images}", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unet.ch at least 8" in err, err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_dir_is_one_line(capsys, tmp_path, tiny_images):
    from tests.redistill.test_io import read_only_folder

    ro = read_only_folder(tmp_path)
    rc = main(["distill", "quick", "method=student", f"data.root={tiny_images}", f"out_dir={ro / 'runs'}", "epochs=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"{ro} is not writable" in err, err


def test_evaluate_negative_subset_is_refused(capsys, tmp_path):
    """It evaluated 0 images and printed n: 0 as a result."""
    assert main(["evaluate", str(tmp_path / "best.pt"), "--subset", "-1"]) == 2
    assert "--subset -1: give 0" in capsys.readouterr().err

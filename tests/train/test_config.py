import pytest

from redistill.errors import UserError
from train.config import RunConfig, load_config, parse_overrides


def test_typo_in_key_gets_did_you_mean():
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'\. Did you mean 'optim.lr'"):
        load_config("quick", ["optim.lrr=0.1"])
    with pytest.raises(UserError, match="Did you mean 'epochs'"):
        load_config(None, ["epochz=3", "teacher.arch=resnet18", "student.arch=resnet18-4-11221", "method=kd"])


def test_typo_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: student\nstudent: {arch: resnet18-4-11221}\ndata:\n  batch_sise: 4\n")
    with pytest.raises(UserError, match="data.batch_sise.*Did you mean 'data.batch_size'"):
        load_config(str(p))


def test_bad_values_name_the_key():
    with pytest.raises(UserError, match="'epochs' needs int"):
        load_config("quick", ["epochs=three"])
    with pytest.raises(UserError, match="'method' is 'redd'.*Did you mean 'red'"):
        load_config("quick", ["method=redd"])
    with pytest.raises(UserError, match="image_size=512"):
        load_config("quick", ["data.image_size=512"])


def test_unknown_preset_suggests_presets():
    with pytest.raises(UserError, match="Did you mean 'mobilenetv2_x8' or 'mobilenetv2_x4'"):
        load_config("mobilenetv2_x5")


def test_overrides_are_typed_and_nested():
    cfg = load_config("quick", ["epochs=7", "data.root=/x", "optim.milestones=[0.5,0.75]", "loss.w_ce=1"])
    assert isinstance(cfg, RunConfig)
    assert cfg.epochs == 7 and cfg.data.root == "/x" and cfg.optim.milestones == [0.5, 0.75] and cfg.loss.w_ce == 1.0
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


def test_red_method_needs_sites():
    with pytest.raises(UserError, match="needs at least one red.sites"):
        load_config(None, ["teacher.arch=resnet18", "student.arch=resnet18-4-11221", "method=red"])


def test_paper_presets_load_with_paper_recipe():
    cfg = load_config("resnext18_x4")
    assert cfg.epochs == 300 and cfg.data.batch_size == 8 and cfg.optim.lr == 0.01
    assert cfg.optim.milestones == [0.6, 0.8, 0.9] and cfg.optim.gamma == 0.2
    assert cfg.red.alpha == 50 and cfg.red.distance == "cosine" and cfg.data.image_size == 128
    assert cfg.loss.w_ce == cfg.loss.w_dist == 0.5

"""Recipes (``recipe=NAME``): each loads over the benchmark pair, sits just beneath what names it, and round-trips."""

import pytest
import yaml

from redistill.errors import UserError
from train.config import PRESET_DIR, load_config
from train.recipes import RECIPES


@pytest.mark.parametrize("name", RECIPES.names())
def test_every_recipe_sets_its_keys_over_a_preset(name):
    recipe = RECIPES.get(name)
    cfg = load_config("mobilenetv3_small_x4", [f"recipe={name}"])
    flat = {"optim": cfg.optim, "data": cfg.data, "loss": cfg.loss}
    for key, value in recipe.settings:
        section, field = key.split(".")
        got = getattr(flat[section], field)
        assert got == (list(value) if isinstance(value, tuple) else value), key
    assert cfg.recipe == name and recipe.sources and recipe.summary


def test_the_recipes_are_the_papers():
    student = load_config("mobilenetv3_small_x4_64", ["method=red"])
    assert student.recipe == "paper_student"
    o, d, l = student.optim, student.data, student.loss
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.schedule, o.milestones, o.gamma) == \
        ("sgd", 0.01, 0.9, 0.0, "step", [0.6, 0.8, 0.9], 0.2)
    assert (d.cutmix, d.mixup, d.batch_size, d.image_size, l.w_ce, l.w_dist) == (0.2, 0.2, 8, 64, 0.5, 0.5)
    kd = load_config("mobilenetv3_small_x4_64", ["method=kd", "recipe=paper_kd"])
    assert (kd.loss.w_ce, kd.loss.w_dist, kd.loss.kd_temperature) == (0.1, 0.9, 4.0)
    assert (kd.optim.weight_decay, kd.optim.gamma, kd.data.batch_size, kd.data.cutmix) == (5e-4, 0.1, 64, 0.2)


def test_a_recipe_sits_just_beneath_what_names_it(tmp_path):
    # named on the command line: over the preset's own keys, under the other overrides
    cfg = load_config("quick", ["recipe=paper_kd", "optim.lr=0.05"])
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.05 and cfg.data.batch_size == 64
    # named in a file: under the file's own keys
    f = tmp_path / "my.yaml"
    f.write_text(yaml.safe_dump({**yaml.safe_load((PRESET_DIR / "quick.yaml").read_text()), "recipe": "paper_kd"}))
    cfg = load_config(str(f))
    assert cfg.optim.name == "adam" and cfg.data.batch_size == 128 and cfg.loss.w_ce == 0.5
    assert cfg.optim.gamma == 0.1  # a key the file leaves to the recipe
    # recipe= (empty) drops the preset's recipe
    plain = load_config("mobilenetv3_small_x4_64", ["recipe="])
    assert plain.recipe == "" and plain.data.cutmix == 0.0 and plain.optim.lr == 0.05


def test_a_saved_config_loads_back_unchanged(tmp_path):
    cfg = load_config("mobilenetv3_small_x4_64", ["method=kd", "recipe=paper_kd", "optim.lr=0.03"])
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(str(f)).to_dict() == cfg.to_dict()


def test_an_unknown_recipe_is_one_line():
    with pytest.raises(UserError, match="Did you mean .paper_kd.") as e:
        load_config("quick", ["recipe=paper_kdd"])
    assert "\n" not in str(e.value)

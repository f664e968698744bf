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


def test_presets_are_the_files_in_train_configs():
    from train.config import PRESET_DIR, presets

    found = presets()
    assert set(found) == {p.stem for p in PRESET_DIR.glob("*.yaml")} and "quick" in found
    for name, path in found.items():
        assert load_config(name).to_dict() == load_config(str(path)).to_dict()


@pytest.mark.parametrize("key, value, match", [
    ("data.augment", "crop_flp", "'data.augment' is 'crop_flp'. Did you mean 'crop_flip'"),
    ("optim.name", "adamw", "'optim.name' is 'adamw'. Did you mean 'adam'"),
    ("optim.schedule", "cosin", "'optim.schedule' is 'cosin'. Did you mean 'cosine'"),
    ("red.distance", "cos", "'red.distance' is 'cos'"),
    ("data.name", "cifar100", "'data.name' is 'cifar100'. Did you mean 'cifar10'"),
])
def test_every_name_is_checked_against_its_registry(key, value, match):
    with pytest.raises(UserError, match=match):
        load_config("quick", [f"{key}={value}"])


def test_red_site_side_is_checked_before_training():
    with pytest.raises(UserError, match=r"'red.sites\[0\].where' is 'up'"):
        load_config("quick", ["red.sites=[{student: features.0.0, where: up, teacher: features.2.block.1.0}]"])


def test_a_registered_data_set_is_accepted():
    from train.data import DATASETS

    DATASETS.register("test_set")(lambda root, split: None)
    try:
        assert load_config("quick", ["data.name=test_set"]).data.name == "test_set"
    finally:
        DATASETS.unregister("test_set")
    with pytest.raises(UserError, match="'data.name' is 'test_set'"):
        load_config("quick", ["data.name=test_set"])


def test_what_a_method_needs_comes_from_its_record():
    from train.losses import METHODS, register_method

    register_method("test_red_only", ("red",), "RED only (test)", "x")
    register_method("test_plain", (), "plain (test)", "x")
    try:
        with pytest.raises(UserError, match="method=test_red_only needs at least one red.sites entry"):
            load_config(None, ["teacher.arch=resnet18", "student.arch=resnet18-4-11221", "method=test_red_only"])
        cfg = load_config(None, ["student.arch=resnet18-4-11221", "method=test_plain"])  # no teacher needed
        assert cfg.method == "test_plain"
    finally:
        METHODS.unregister("test_red_only")
        METHODS.unregister("test_plain")


def test_names_given_as_examples_in_the_help_are_registered():
    """The config comments (printed by `redistill distill --help`) may name examples; each must be a real choice."""
    import re

    from train import config as C
    from train.cli import _field_comments
    from train.data import AUGMENTS, DATASETS
    from train.diffusion import SCHEDULES
    from train.losses import METHODS
    from train.optim import LR_SCHEDULES, OPTIMIZERS
    from train.red import DISTANCES

    fields = {(C.DataConfig, "name"): DATASETS, (C.DataConfig, "augment"): AUGMENTS,
              (C.OptimConfig, "name"): OPTIMIZERS, (C.OptimConfig, "schedule"): LR_SCHEDULES,
              (C.REDConfig, "distance"): DISTANCES, (C.DiffusionConfig, "schedule"): SCHEDULES,
              (C.RunConfig, "method"): METHODS}
    for (cls, name), reg in fields.items():
        comment = _field_comments(cls)[name]
        examples = re.findall(r"\b[a-z][a-z0-9_]*\b", comment.split("e.g.", 1)[1].split(";")[0])
        assert examples and set(examples) <= set(reg.names()), (cls.__name__, name, examples)
        assert getattr(cls(), name) in reg


@pytest.mark.parametrize("override, match", [
    ("optim.lr=-0.1", r"optim.lr=-0.1 is out of range: it must be a positive learning rate"),
    ("optim.lr=0", r"optim.lr=0.0 is out of range"),
    ("optim.lr=.nan", r"optim.lr=nan is not a finite number"),
    ("optim.momentum=1.5", r"optim.momentum=1.5 is out of range: it must be in \[0, 1\)"),
    ("optim.weight_decay=-1e-4", r"optim.weight_decay=-0.0001 is out of range"),
    ("optim.gamma=0", r"optim.gamma=0.0 is out of range"),
    ("optim.milestones=[0.5,1.2]", r"optim.milestones=\[0.5, 1.2\] is out of range"),
    ("optim.warmup_epochs=-1", r"optim.warmup_epochs=-1.0 is out of range"),
    ("optim.grad_clip=-1", r"optim.grad_clip=-1.0 is out of range"),
    ("data.train_subset=-1", r"data.train_subset=-1 is out of range: it must be 0 \(all\)"),
    ("data.test_subset=-3", r"data.test_subset=-3 is out of range"),
    ("runtime.workers=-1", r"runtime.workers='-1' is out of range"),
    ("data.cutmix=-0.2", r"data.cutmix=-0.2 is out of range"),
    ("red.alpha=-50", r"red.alpha=-50.0 is out of range"),
    ("loss.w_ce=-0.5", r"loss.w_ce=-0.5 is out of range"),
    ("loss.w_dist=-0.5", r"loss.w_dist=-0.5 is out of range"),
    ("loss.kd_temperature=0", r"loss.kd_temperature=0.0 is out of range"),
    ("loss.label_smoothing=1", r"loss.label_smoothing=1.0 is out of range"),
    ("student.width_mult=0", r"student.width_mult=0.0 is out of range"),
    ("teacher.epochs=0", r"teacher.epochs=0 is out of range"),
    ("num_classes=-2", r"num_classes=-2 is out of range"),
    ("red.sites=[{student: features.0.0, teacher: features.2.block.1.0, alpha: -1}]",
     r"red.sites\[0\].alpha=-1.0 is out of range"),
])
def test_numbers_out_of_range_name_the_key(override, match):
    with pytest.raises(UserError, match=match):
        load_config("quick", [override])


def test_both_loss_weights_zero_is_refused_only_where_a_student_distils():
    with pytest.raises(UserError, match="loss.w_ce and loss.w_dist are both 0"):
        load_config("quick", ["loss.w_ce=0", "loss.w_dist=0"])
    assert load_config("quick", ["loss.w_ce=0", "loss.w_dist=0", "method=student"]).loss.w_ce == 0
    assert load_config("quick", ["loss.w_ce=0"]).loss.w_dist == 0.5  # RED alone


def test_every_preset_is_in_range():
    from train.config import presets

    for name in presets():
        load_config(name)

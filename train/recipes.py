"""Named training recipes (``recipe=NAME``): the paper code's optimiser, schedule, batch, mixing and loss weights.

A recipe is one record: the config keys it sets and the files of the paper's code (Chen et al.'s ReDistill
repository; paths below are relative to its root) each value comes from. It sits
just beneath whatever names it: ``redistill distill PRESET recipe=NAME`` puts it over the preset and under
the other ``key=value`` overrides; a YAML file with ``recipe: NAME`` puts it under the file's own keys (so a
saved ``config.yaml``, which holds every resolved key, loads back unchanged). Epochs are never part of a
recipe: schedules are in fractions of the run (the paper: 300 epochs).

No torch here: ``train.config`` reads this on the ``--help`` path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Tuple

from redistill.registry import Registry


@dataclass(frozen=True)
class Recipe:
    """A set of config values (dotted keys) with where they come from."""

    name: str
    summary: str  # one line for --help and the docs
    settings: Tuple[Tuple[str, Any], ...]  # (dotted config key, value)
    sources: Tuple[str, ...]  # files of the paper's repository the values are read from
    notes: str = ""  # where this recipe knowingly differs from its source

    def tree(self) -> Dict[str, Any]:
        """The settings as a nested mapping, as a YAML preset would hold them."""
        out: Dict[str, Any] = {}
        for key, value in self.settings:
            node = out
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = list(value) if isinstance(value, tuple) else value
        return out


RECIPES: Registry[Recipe] = Registry("recipe")


def register_recipe(recipe: Recipe) -> Recipe:
    RECIPES.register(recipe.name)(recipe)
    return recipe


#: CutMix or MixUp (one of the two per batch, alpha 0.2), always on in the paper's classification code:
#: base/utils/datasets.py ``train_loader(data_aug={"cutmix": 0.2, "mixup": 0.2})`` (a v2.RandomChoice in the
#: collate function, so the teacher and every loss see the mixed batch and CE takes the mixed labels, as here)
_MIXING = (("data.cutmix", 0.2), ("data.mixup", 0.2))
#: torchvision RandomResizedCrop + horizontal flip: base/utils/datasets.py ``set_train_transform``
_AUGMENT = (("data.augment", "rrc_flip"),)

register_recipe(Recipe(
    name="paper_student",
    summary="the official RED student recipe: SGD 0.01, momentum 0.9, no weight decay, lr/5 at 60/80/90 %, "
            "batch 8, CutMix/MixUp 0.2, 0.5 CE + 0.5 distillation",
    settings=(("optim.name", "sgd"), ("optim.lr", 0.01), ("optim.momentum", 0.9), ("optim.nesterov", False),
              ("optim.weight_decay", 0.0), ("optim.schedule", "step"), ("optim.milestones", (0.6, 0.8, 0.9)),
              ("optim.gamma", 0.2), ("optim.warmup_epochs", 0.0), ("data.batch_size", 8), *_AUGMENT, *_MIXING,
              ("loss.w_ce", 0.5), ("loss.w_dist", 0.5)),
    sources=("base/run_classification.sh (distill: --learning_rate 1e-2 --lr_interval '0.6 0.8 0.9' --lr_reduce 5 "
             "--optimizer SGD, BATCHSIZE=8)",
             "base/utils/run_manager.py (SGD momentum 0.9, weight_decay 0; loss = 0.5 * CE + 0.5 * distillation)",
             "base/utils/datasets.py (RandomResizedCrop + flip, CutMix/MixUp 0.2)"),
    notes="The paper's code decays lr at whole epochs (int(0.6 * epochs)); here at the fraction of the run. "
          "rrc_flip crops 35-100 % of the area where torchvision's default is 8-100 %.",
))

register_recipe(Recipe(
    name="paper_kd",
    summary="the paper's KD-baseline recipe: 0.1 CE + 0.9 KD at T=4, SGD 0.01, momentum 0.9, weight decay 5e-4, "
            "batch 64, lr/10 at 60/80/90 % (180/240/270 of 300 epochs), CutMix/MixUp 0.2",
    settings=(("optim.name", "sgd"), ("optim.lr", 0.01), ("optim.momentum", 0.9), ("optim.nesterov", False),
              ("optim.weight_decay", 5e-4), ("optim.schedule", "step"), ("optim.milestones", (0.6, 0.8, 0.9)),
              ("optim.gamma", 0.1), ("optim.warmup_epochs", 0.0), ("data.batch_size", 64), *_AUGMENT, *_MIXING,
              ("loss.w_ce", 0.1), ("loss.w_dist", 0.9), ("loss.kd_temperature", 4.0)),
    sources=("pipeline_classification/stl10/run_stl10_distill.sh (kd: BATCHSIZE=64, --learning_rate 1e-2 "
             "--lr_decay_epochs '180 240 270' --lr_decay_rate 0.1 --distill kd -r 0.1 -a 0.9 -b 0)",
             "pipeline_classification/stl10/train_distill.py (--weight_decay 5e-4, --momentum 0.9, --kd_T 4; "
             "data from base/utils/datasets.py with CutMix/MixUp 0.2)"),
    notes="Weight decay here skips BatchNorm weights and biases (train/optim.py); the paper's SGD decays every "
          "parameter. Use it with method=kd (the loss weights are KD's).",
))

register_recipe(Recipe(
    name="paper_feature",
    summary="the recipe of the paper's FitNet/AT baselines: 1 * CE + 1 * the method's weighted loss (FitNet 100 * "
            "hint, AT 1000 * attention), otherwise as paper_kd",
    settings=(("optim.name", "sgd"), ("optim.lr", 0.01), ("optim.momentum", 0.9), ("optim.nesterov", False),
              ("optim.weight_decay", 5e-4), ("optim.schedule", "step"), ("optim.milestones", (0.6, 0.8, 0.9)),
              ("optim.gamma", 0.1), ("optim.warmup_epochs", 0.0), ("data.batch_size", 64), *_AUGMENT, *_MIXING,
              ("loss.w_ce", 1.0), ("loss.w_dist", 1.0), ("loss.fitnet_weight", 100.0), ("loss.at_weight", 1000.0)),
    sources=("pipeline_classification/stl10/run_stl10_distill.sh (FitNet: --distill hint -a 0 -b 100; AT: "
             "--distill attention -a 0 -b 1000; -r defaults to 1)",
             "pipeline_classification/stl10/train_distill.py (optimiser and data as for paper_kd)"),
    notes="Use it with method=fitnet or method=at; the paper's hint layer and attention groups are its own "
          "feature list, here the RED sites (see docs/methods.md).",
))

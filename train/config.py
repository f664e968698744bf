"""Typed run configuration: dataclasses with defaults, loaded from YAML plus ``key=value`` overrides.

Every key is validated on load: an unknown key fails with a did-you-mean, a
value of the wrong type fails naming the key and the expected type, and a name
(method, architecture, data set, augmentation, optimizer, ...) must be in its registry.
A preset is a YAML file in ``train/configs/``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from redistill.errors import UserError, did_you_mean

PRESET_DIR = Path(__file__).resolve().parent / "configs"
AUTO_SITES = "auto"  # red.sites: auto -> the RED sites of the paper's rule, placed when the config is validated


@dataclass
class DataConfig:
    """Where the images are and how they are fed."""

    name: str = "imagefolder"  # data set (DATASETS, train/data.py), e.g. imagefolder, cifar10, stl10; never downloaded
    root: str = "data/cifar10"  # imagefolder: has train/<class>/* and test/<class>/*
    image_size: int = 32  # images are resized to this square size (32-224 px)
    train_subset: int = 0  # use only this many training images, balanced over classes (0 = all)
    test_subset: int = 0  # evaluate on this many test images, balanced (0 = all)
    val_fraction: float = 0.05  # held out from train to pick the best epoch; the test set never picks
    augment: str = "crop_flip"  # training augmentation (AUGMENTS, train/data.py), e.g. crop_flip, rrc_flip, flip, none
    batch_size: int = 128  # training batch size per process
    eval_batch_size: int = 256  # batch size for validation and test
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    mixup: float = 0.0  # MixUp alpha (0 = off)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "sgd"  # optimizer (OPTIMIZERS, train/optim.py), e.g. sgd, adam
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9  # sgd momentum
    weight_decay: float = 5e-4  # L2 on conv/linear weights (not on BN or biases)
    nesterov: bool = False  # sgd: Nesterov momentum
    schedule: str = "cosine"  # learning-rate schedule (LR_SCHEDULES, train/optim.py), e.g. cosine, step
    milestones: List[float] = field(default_factory=lambda: [0.6, 0.8, 0.9])  # step: fractions of training
    gamma: float = 0.2  # step: lr multiplier at each milestone (the paper: lr / 5)
    warmup_epochs: float = 0.0  # linear warm-up, in epochs
    grad_clip: float = 0.0  # clip the gradient norm to this (0 = off; DDPM: 1.0)


@dataclass
class ModelConfig:
    """One network of the pair."""

    arch: str = ""  # ARCH-A-R name, e.g. mobilenetv2-4-1221111
    width_mult: float = 1.0  # mobilenet families only
    checkpoint: Optional[str] = None  # teacher: reuse this trained checkpoint instead of training one
    epochs: Optional[int] = None  # overrides the run's epochs for this network


@dataclass
class REDSiteConfig:
    """One RED block: student layer and side, and the teacher layer it is matched to."""

    student: str = ""  # student module name, e.g. features.0.0
    where: str = "out"  # in | out
    teacher: str = ""  # teacher module of equal H x W, e.g. features.4.conv.1.0
    teacher_where: Optional[str] = None  # defaults to `where`
    alpha: Optional[float] = None  # defaults to red.alpha


@dataclass
class REDConfig:
    distance: str = "cosine"  # RED distance on channel-mean maps (DISTANCES, train/red.py), e.g. cosine, mse
    alpha: float = 50.0  # RED loss weight per block (the paper: 50 on STL10, 1 on ImageNet)
    sites: List[REDSiteConfig] = field(default_factory=list)  # list of {student, where, teacher, teacher_where, alpha}, or a placement (PLACEMENTS, train/red.py): auto (the paper's rule, classifiers), paper or outputs (U-Nets)


@dataclass
class UNetConfig:
    """The U-Net denoiser's options (architectures unet-A-R only)."""

    ch: int = 128  # base channels (the paper: 128)
    ch_mult: List[int] = field(default_factory=lambda: [1, 2, 2, 2])  # channels per level = ch * mult; one level per stride
    attn: List[int] = field(default_factory=lambda: [1])  # levels with self-attention (level 1 = 16 px in the teacher)
    num_res_blocks: int = 2  # residual blocks per level
    dropout: float = 0.1  # dropout inside residual blocks
    norm_groups: int = 32  # GroupNorm groups (fewer when channels are not divisible)


@dataclass
class DiffusionConfig:
    """The denoiser's noise schedule and training options."""

    schedule: str = "linear"  # noise schedule (SCHEDULES, train/diffusion.py), e.g. linear (DDPM), cosine
    timesteps: int = 1000  # T
    beta_start: float = 1e-4  # linear schedule: first beta
    beta_end: float = 0.02  # linear schedule: last beta
    ema_decay: float = 0.9999  # EMA of the weights (warmed up as min(decay, (1+n)/(10+n))); EMA weights are evaluated, sampled and exported
    conditional: bool = False  # class-conditional on the data set's labels
    p_uncond: float = 0.1  # conditional: fraction of labels dropped in training (classifier-free guidance)
    eval_seed: int = 1234  # fixed noise and time steps of the validation/test denoising loss


@dataclass
class LossConfig:
    w_ce: float = 0.5  # total = w_ce * task loss (CE, or the diffusion loss) + w_dist * mean(distillation losses)
    w_dist: float = 0.5  # weight of the mean distillation loss
    kd_temperature: float = 4.0  # Hinton KD temperature T
    label_smoothing: float = 0.0  # CE label smoothing
    red_kd_paper_temperature: float = 2.0  # KD temperature of method red_kd_paper (the paper's KD module: T=2, reed/modules.py)
    fitnet_weight: float = 100.0  # FitNet: weight of the hint loss inside D (the paper's zoo: -b 100, run_stl10_distill.sh)
    at_weight: float = 1000.0  # AT: weight of the attention loss inside D (the paper's zoo: -b 1000)
    at_p: float = 2.0  # AT: power of the attention map mean_c |f|^p (distiller_zoo/AT.py: p=2)


@dataclass
class RuntimeConfig:
    """How training uses the machine (train/runtime.py): speed only, the networks and data trained are the same."""

    threads: str = "auto"  # CPU intra-op threads: auto (OMP_NUM_THREADS if set, else adapted to the load between 1 and the cores) or N
    workers: str = "auto"  # DataLoader worker processes of the per-image data path: auto (0 on a CPU, cores - 1 up to 8 on CUDA) or N
    device_augment: str = "auto"  # augment whole uint8 batches on the training device: auto (when the images share a size), true, false (per image)
    channels_last: str = "auto"  # channels_last memory format for teacher, student and batches: auto (classifiers), true, false
    compile: str = "auto"  # torch.compile the student: auto (CUDA only; on 2 CPU cores it took 3.5 min and gained nothing), true, false
    amp: str = "none"  # autocast precision (PRECISIONS, train/runtime.py), e.g. none, bf16, fp16; fp16 with a GradScaler
    fold_teacher: bool = True  # the frozen teacher runs with its BatchNorm folded, without autograd (taps keep their tensors)
    se_linear: bool = True  # MobileNetV3 squeeze-excitation as linear layers in training (same weights and export)
    teacher_stop: bool = True  # the teacher's pass stops at its last tapped tensor when no loss reads its output (RED alone)
    tiny_map_conv: str = "auto"  # the trained network's convs on 2 x 2 and smaller maps over their valid taps only: auto (CPU), true, false

    def __post_init__(self):
        for key in ("device_augment", "channels_last", "compile", "tiny_map_conv"):
            v = str(getattr(self, key)).strip().lower()
            setattr(self, key, {"on": "true", "yes": "true", "1": "true", "off": "false", "no": "false",
                                "0": "false"}.get(v, v))


@dataclass
class RunConfig:
    """A distillation run: train the teacher (unless given), then the student by ``method``."""

    name: str = "run"  # run folder name under out_dir
    method: str = "red"  # training method (METHODS, train/losses.py), e.g. teacher, student, kd, red, red_kd, fitnet, at
    recipe: str = ""  # a named recipe (RECIPES, train/recipes.py), e.g. paper_student, paper_kd: set just beneath what names it
    epochs: int = 30  # epochs per network (teacher.epochs / student.epochs override)
    seed: int = 0  # seeds init, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs"  # where run folders go
    num_classes: int = 0  # 0 = from the data set
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    red: REDConfig = field(default_factory=REDConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log_every: int = 20  # progress-bar refresh, in steps

    @property
    def task(self) -> str:
        """``classify`` or ``denoise``, from the architectures (a pair must share it)."""
        from train.models import task_of

        arch = self.teacher.arch or self.student.arch
        return task_of(arch) if arch else "classify"

    def label_count(self, num_classes: int) -> int:
        """Labels the networks take: the classes for a classifier or a class-conditional denoiser, else 0."""
        return num_classes if self.task == "classify" or self.diffusion.conditional else 0

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    """Convert ``value`` to the annotated type ``tp``, or raise a UserError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List):
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key!r} needs a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r} needs a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "yes", "1", "on"):
                    return True
                if low in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return bool(value)
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError
        return tp(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {key!r} needs {_type_name(tp)}, got {value!r}") from None


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise UserError(f"unknown config key {prefix + k!r}." + did_you_mean(prefix + k, [prefix + n for n in names]))
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"config key {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """Turn ``["epochs=3", "data.root=/x"]`` into a nested dict (values parsed as YAML scalars)."""
    tree: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (e.g. epochs=3 or data.root=DIR)")
        k, v = item.split("=", 1)
        try:
            parsed = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            parsed = v
        _set_dotted(tree, k.strip(), parsed)
    return tree


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def presets() -> Dict[str, Path]:
    """Every preset, ``{name: file}``: a preset is one YAML file in ``train/configs/``, named by its stem."""
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def is_paper_pair(cfg: RunConfig) -> bool:
    """A reproduction of one of the paper's pairs: classifier teacher and student, a RED method, at 128 px
    (the paper's STL10 size)."""
    from train.losses import METHODS

    return cfg.task == "classify" and METHODS.get(cfg.method).needs_sites and cfg.data.image_size == 128


def paper_pairs() -> List[str]:
    """The presets that are paper pairs (``is_paper_pair``), by name."""
    return [name for name, path in presets().items() if is_paper_pair(load_config(str(path)))]


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, and validate everything."""
    data: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            found = presets()
            if str(path) not in found:
                raise UserError(f"config {path!r} not found: give a YAML file or a preset name."
                                + did_you_mean(str(path), found))
            p = found[str(path)]
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config {p} must be a mapping of keys to values")
    data = _moved_keys(_with_recipe(data, parse_overrides(overrides)))
    red = data.get("red")
    placement = red["sites"] if isinstance(red, dict) and isinstance(red.get("sites"), str) else None
    cfg = _build(RunConfig, _merge(data, {"red": {"sites": []}}) if placement else data)
    if placement:
        cfg.red.sites = placement  # placed by validate, once the architectures are known to be valid
    return validate(cfg)


def _with_recipe(file_data: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """The file's keys and the overrides with the named recipe just beneath whatever names it: an override
    ``recipe=NAME`` goes over the file (under the other overrides), a file's ``recipe: NAME`` under the file."""
    from train.recipes import RECIPES

    def tree(name) -> Dict[str, Any]:
        if not name:
            return {}
        _choice("recipe", name, RECIPES)
        return RECIPES.get(name).tree()

    if "recipe" in over:
        return _merge(_merge(file_data, tree(over["recipe"])), over)
    return _merge(_merge(tree(file_data.get("recipe")), file_data), over)


#: keys that moved: a config still giving the old one sets the new one (unless it gives both)
_MOVED = {("data", "workers"): ("runtime", "workers")}


def _moved_keys(data: Dict[str, Any]) -> Dict[str, Any]:
    for (sec, key), (new_sec, new_key) in _MOVED.items():
        if isinstance(data.get(sec), dict) and key in data[sec]:
            data = _merge(data, {sec: {}})
            value = data[sec].pop(key)
            new = data.get(new_sec) if isinstance(data.get(new_sec), dict) else {}
            data[new_sec] = {new_key: value, **new}
    return data


def _choice(key: str, value: str, options) -> None:
    """``value`` must be one of ``options`` (a registry or a list); else a one-line error naming ``key``."""
    if value not in options:
        raise UserError(f"config key {key!r} is {value!r}." + did_you_mean(str(value), options))


#: numeric keys and their ranges, checked on load: a bad value is one line here, not a torch traceback mid-run
_RANGES = (
    ("num_classes", lambda v: v >= 0, "0 (from the data set) or the class count"),
    ("log_every", lambda v: v >= 0, "a step count >= 0"),
    ("teacher.width_mult", lambda v: v > 0, "> 0"),
    ("student.width_mult", lambda v: v > 0, "> 0"),
    ("teacher.epochs", lambda v: v is None or v >= 1, "at least 1 (or unset: the run's epochs)"),
    ("student.epochs", lambda v: v is None or v >= 1, "at least 1 (or unset: the run's epochs)"),
    ("data.train_subset", lambda v: v >= 0, "0 (all) or a positive image count"),
    ("data.test_subset", lambda v: v >= 0, "0 (all) or a positive image count"),
    ("data.cutmix", lambda v: v >= 0, "0 (off) or a positive Beta alpha"),
    ("data.mixup", lambda v: v >= 0, "0 (off) or a positive Beta alpha"),
    ("optim.lr", lambda v: v > 0, "a positive learning rate"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("optim.milestones", lambda v: all(0 < m < 1 for m in v), "fractions of training in (0, 1), e.g. [0.6, 0.8, 0.9]"),
    ("optim.gamma", lambda v: v > 0, "a positive lr multiplier (0.2 = lr / 5)"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("optim.grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("red.alpha", lambda v: v >= 0, ">= 0"),
    ("loss.w_ce", lambda v: v >= 0, ">= 0"),
    ("loss.w_dist", lambda v: v >= 0, ">= 0"),
    ("loss.kd_temperature", lambda v: v > 0, "> 0"),
    ("loss.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("loss.red_kd_paper_temperature", lambda v: v > 0, "> 0"),
    ("loss.fitnet_weight", lambda v: v >= 0, ">= 0"),
    ("loss.at_weight", lambda v: v >= 0, ">= 0"),
    ("loss.at_p", lambda v: v > 0, "> 0 (Zagoruyko & Komodakis: 2)"),
    ("unet.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("unet.norm_groups", lambda v: v >= 1, "at least 1"),
)


def _check_ranges(cfg: RunConfig, distils: bool) -> None:
    """Every number in its range (``_RANGES``), no NaN or infinity anywhere, and each RED site's alpha >= 0."""
    import math

    flat = flatten_config(cfg.to_dict())
    for key, value in flat.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{key}={value!r} is not a finite number")
    for key, ok, what in _RANGES:
        if not ok(flat[key]):
            raise UserError(f"{key}={flat[key]!r} is out of range: it must be {what}")
    if distils and cfg.loss.w_ce == 0 and cfg.loss.w_dist == 0:
        raise UserError("loss.w_ce and loss.w_dist are both 0: the student would not train; make at least one positive")
    for i, s in enumerate(cfg.red.sites if isinstance(cfg.red.sites, list) else []):
        alpha = getattr(s, "alpha", None)
        if alpha is not None and not (alpha >= 0 and math.isfinite(alpha)):
            raise UserError(f"red.sites[{i}].alpha={alpha!r} is out of range: it must be >= 0 (or unset: red.alpha)")


def _check_runtime(rt: RuntimeConfig) -> None:
    """``runtime.*``: counts are auto or integers in range, switches auto/true/false, amp a registered precision."""
    from train.runtime import PRECISIONS, SWITCH_VALUES, parse_count

    parse_count("threads", rt.threads, 1)
    parse_count("workers", rt.workers, 0)
    for key in ("device_augment", "channels_last", "compile", "tiny_map_conv"):
        _choice(f"runtime.{key}", getattr(rt, key), SWITCH_VALUES)
    _choice("runtime.amp", rt.amp, PRECISIONS)


def flatten_config(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``; lists (red.sites, milestones) stay one value."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks that types alone cannot express; every name is checked against its registry."""
    # imported here: the registries pull in torch, and the CLI's --help reads this module without it
    from train.data import AUGMENTS, DATASETS
    from train.losses import METHODS
    from train.models import parse_arch
    from train.optim import LR_SCHEDULES, OPTIMIZERS
    from train.red import DISTANCES, PLACEMENTS, WHERE

    _choice("method", cfg.method, METHODS)
    method = METHODS.get(cfg.method)
    _choice("optim.name", cfg.optim.name, OPTIMIZERS)
    _choice("optim.schedule", cfg.optim.schedule, LR_SCHEDULES)
    _choice("data.augment", cfg.data.augment, AUGMENTS)
    _choice("data.name", cfg.data.name, DATASETS)
    _choice("red.distance", cfg.red.distance, DISTANCES)
    if cfg.recipe:
        from train.recipes import RECIPES

        _choice("recipe", cfg.recipe, RECIPES)
    if not 32 <= cfg.data.image_size <= 224:
        raise UserError(f"data.image_size={cfg.data.image_size} is out of range: use 32 to 224")
    if cfg.epochs < 1:
        raise UserError("epochs must be at least 1")
    _check_ranges(cfg, distils=method.needs_teacher)
    _check_runtime(cfg.runtime)
    if not 0 <= cfg.data.val_fraction < 0.5:
        raise UserError("data.val_fraction must be in [0, 0.5)")
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        raise UserError("data.batch_size and data.eval_batch_size must be at least 1")
    if (method.teacher_only or method.needs_teacher) and not (cfg.teacher.arch or cfg.teacher.checkpoint):
        raise UserError(f"method={cfg.method} needs teacher.arch (or teacher.checkpoint)")
    if not method.teacher_only and not cfg.student.arch:
        raise UserError(f"method={cfg.method} needs student.arch")
    for m in (cfg.teacher, cfg.student):
        if m.arch:
            parse_arch(m.arch)
    _validate_task(cfg)
    if isinstance(cfg.red.sites, str):
        _choice("red.sites", cfg.red.sites, PLACEMENTS)
        cfg.red.sites = _auto_sites(cfg) if method.reads_sites else []
    if method.reads_sites:
        if not cfg.red.sites:
            raise UserError(f"method={cfg.method} needs at least one red.sites entry (student layer + teacher layer)")
        for i, s in enumerate(cfg.red.sites):
            if not s.student or not s.teacher:
                raise UserError(f"red.sites[{i}] needs both 'student' and 'teacher' layer names")
            _choice(f"red.sites[{i}].where", s.where, WHERE)
            if s.teacher_where is not None:
                _choice(f"red.sites[{i}].teacher_where", s.teacher_where, WHERE)
    return cfg


def _auto_sites(cfg: RunConfig) -> List[REDSiteConfig]:
    """``red.sites: NAME`` (auto, paper, ...): the sites that placement gives this teacher, student and image size."""
    from train.red import place_sites

    name = cfg.red.sites
    if not cfg.teacher.arch:
        raise UserError(f"red.sites: {name} places RED blocks by the teacher's architecture: set teacher.arch "
                        "(also when teacher.checkpoint is given)")
    return [REDSiteConfig(**s) for s in place_sites(name, cfg.student.arch, cfg.teacher.arch, cfg.data.image_size,
                                                    cfg.unet.num_res_blocks)]


def _validate_task(cfg: RunConfig) -> None:
    from train.diffusion import SCHEDULES
    from train.losses import METHODS
    from train.models import parse_arch, task_of

    tasks = {task_of(m.arch) for m in (cfg.teacher, cfg.student) if m.arch}
    if len(tasks) > 1:
        raise UserError(f"teacher.arch {cfg.teacher.arch!r} and student.arch {cfg.student.arch!r} do different tasks "
                        "(classifier vs denoiser): pair a unet with a unet, a classifier with a classifier")
    if cfg.task != "denoise":
        return
    if METHODS.get(cfg.method).needs_logits:
        raise UserError(f"method={cfg.method} distils logits and applies to classifiers only; "
                        "use method=red (or student/teacher) for a unet denoiser")
    if METHODS.get(cfg.method).needs_taps:
        raise UserError(f"method={cfg.method} taps classifier features and applies to classifiers only; "
                        "use method=red (or student/teacher) for a unet denoiser")
    d, u = cfg.diffusion, cfg.unet
    _choice("diffusion.schedule", d.schedule, SCHEDULES)
    if d.timesteps < 2 or not 0 < d.beta_start < d.beta_end < 1:
        raise UserError("diffusion needs timesteps >= 2 and 0 < beta_start < beta_end < 1")
    if not 0 <= d.ema_decay < 1 or not 0 <= d.p_uncond < 1:
        raise UserError("diffusion.ema_decay and diffusion.p_uncond must be in [0, 1)")
    if not u.ch_mult or any(m < 1 for m in u.ch_mult):
        raise UserError("unet.ch_mult needs one positive multiplier per level, e.g. [1, 2, 2, 2]")
    for key, m in (("teacher.arch", cfg.teacher), ("student.arch", cfg.student)):
        if m.arch:
            digits = len(parse_arch(m.arch).strides)
            if digits + 1 != len(u.ch_mult):
                raise UserError(f"{key}={m.arch!r} has {digits} level strides after the head but unet.ch_mult has "
                                f"{len(u.ch_mult)} levels: give {len(u.ch_mult) - 1} digits (e.g. unet-1-"
                                f"{'2' * (len(u.ch_mult) - 1)}) or change unet.ch_mult")


def build_kwargs(cfg: RunConfig, which: ModelConfig) -> Dict[str, Any]:
    """Builder options of one network of the pair beyond its name."""
    from train.models import model_kwargs, task_of

    if task_of(which.arch) == "denoise":
        return asdict(cfg.unet)
    return model_kwargs(which.arch, which.width_mult)


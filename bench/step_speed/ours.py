"""This project's side of bench.step_speed: the trainer's distillation step for a preset, each speed change on or off.

Run as ``python -m bench.step_speed.ours SPEC_JSON`` (a worker process speaking ``paper.serve``'s protocol).
The step is the one the trainer runs (``train.step.build_step``), on the same seeded synthetic batches as
the paper's side; the changes are switched through ``runtime.*`` config keys (``SWITCHES``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from bench.step_speed.paper import serve, synthetic_batches
from redistill.errors import UserError
from train.config import RunConfig, load_config
from train.models import parse_arch

from train.step import build_step


@dataclass(frozen=True)
class Switch:
    """One speed change of the step: its ``runtime.KEY``, the value that switches it on and the one that turns it
    it off."""

    key: str
    on: Any
    off: Any
    what: str
    families: Optional[Tuple[str, ...]] = None  # the architecture families it changes (None: every one)

    def applies(self, cfg: RunConfig) -> bool:
        """Whether switching it changes this pair's step at all."""
        return self.families is None or any(parse_arch(m.arch).family in self.families
                                            for m in (cfg.teacher, cfg.student))


#: the changes timed one at a time (a key this checkout's ``runtime`` section lacks is left out, with a note)
SWITCHES: Dict[str, Switch] = {s.key: s for s in (
    Switch("fold_teacher", True, False, "teacher as a folded inference graph (BatchNorm folded, no autograd)"),
    Switch("teacher_stop", True, False, "teacher pass ends at its last RED tap (RED alone reads no teacher output)"),
    Switch("channels_last", True, False, "channels_last memory format for teacher and student"),
    Switch("se_linear", True, False, "squeeze-excitation as linear layers instead of 1x1 convs",
           ("mobilenetv3_small",)),
    Switch("tiny_map_conv", True, False, "student convs on 2 x 2 and smaller maps over their valid taps only (CPU)"),
    Switch("compile", True, False, "torch.compile of the student step"),
    Switch("threads", "auto", None, "adaptive intra-op threads (off: the benchmark's fixed --threads)"),
)}
#: changes not timed unless asked for: bf16 autocast is a GPU feature here
OPTIONAL_SWITCHES: Dict[str, Switch] = {s.key: s for s in (
    Switch("amp", "bf16", "none", "bf16 autocast"),
)}


def runtime_keys() -> List[str]:
    """The keys of this checkout's ``runtime`` config section ([] where it has none)."""
    rt = next((f for f in fields(RunConfig) if f.name == "runtime"), None)
    return [f.name for f in fields(rt.default_factory())] if rt is not None else []


def switch_value(switch: Switch, on: bool, threads: int) -> Any:
    value = switch.on if on else switch.off
    return threads if value is None else value


def overrides(settings: Dict[str, Any]) -> List[str]:
    """``runtime.KEY=VALUE`` config overrides for ``{KEY: VALUE}``."""
    def text(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [f"runtime.{k}={text(v)}" for k, v in sorted(settings.items())]


def pair_config(preset: str, image_size: int, batch: int, settings: Dict[str, Any]) -> RunConfig:
    """The preset at the benchmark's size and batch, on the CPU, with ``settings`` in its runtime section."""
    return load_config(preset, [f"data.image_size={image_size}", f"data.batch_size={batch}", "device=cpu",
                                *overrides(settings)])


# --- the step -------------------------------------------------------------------------------------------

@dataclass
class OurStep:
    """A built step: ``step(x, y)`` returns the loss; ``round_start()`` before each timed round; what was built."""

    step: Callable[[torch.Tensor, torch.Tensor], Any]
    round_start: Callable[[], None]
    facts: Dict[str, Any]


def _optimized(optimizer: torch.optim.Optimizer) -> int:
    """Parameters the optimizer updates (student, RED blocks, any training-only modules)."""
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def _plain(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def make_step(cfg: RunConfig, num_classes: int) -> OurStep:
    """The trainer's own step for ``cfg`` (``train.step.build_step``) on untrained networks.

    Each round starts with ``begin_epoch``: the time between rounds, while other sides run, is no step, so
    the adaptive thread setting must not read it as a slowdown.
    """
    built = build_step(cfg, num_classes=num_classes)
    rt = built.runtime
    resolved = {k: _plain(v) for k, v in (asdict(rt) if is_dataclass(rt) else vars(rt)).items()}
    return OurStep(lambda x, y: built.step(x, y), lambda: built.begin_epoch(built.global_step), {
        "step_source": "train.step.build_step", "red_blocks": len(built.plans),
        "trainable_params": _optimized(built.optimizer),
        "optimizer": type(built.optimizer).__name__, "resolved_runtime": resolved})


def build_ours(spec: Dict[str, Any]):
    """The worker's builder (``paper.serve``): our step for the spec's preset and runtime settings."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    cfg = pair_config(spec["preset"], spec["image_size"], spec["batch"], spec["settings"])
    ours = make_step(cfg, spec["num_classes"])
    pool = synthetic_batches(torch, spec["pool"], spec["batch"], spec["image_size"], spec["num_classes"], spec["seed"])
    state = {"i": 0}

    def run(n):
        ours.round_start()
        loss = None
        for _ in range(n):
            x, y = pool[state["i"] % len(pool)]
            state["i"] += 1
            loss = float(ours.step(x, y))
        return loss

    runtime = {k: _plain(v) for k, v in asdict(cfg.runtime).items()} if hasattr(cfg, "runtime") else {}
    return run, {**ours.facts, "torch": torch.__version__, "threads": torch.get_num_threads(), "runtime": runtime,
                 "optim": cfg.optim.name, "lr": cfg.optim.lr}


def check_switches(names: Optional[List[str]]) -> Tuple[List[Switch], List[str]]:
    """The switches named (None: every ``SWITCHES`` key this checkout's runtime section has), and the default ones
    left out; a name that is unknown or not a runtime key is one line naming the fix."""
    known = {**SWITCHES, **OPTIONAL_SWITCHES}
    keys = runtime_keys()
    if names is None:
        return [s for k, s in SWITCHES.items() if k in keys], [k for k in SWITCHES if k not in keys]
    out = []
    for n in names:
        if n not in known:
            raise UserError(f"--switches: unknown change {n!r}; known: {', '.join(known)}")
        if n not in keys:
            raise UserError(f"--switches {n}: this checkout's runtime config has no {n!r} key "
                            f"(it has: {', '.join(keys) or 'no runtime section'}); leave it out")
        out.append(known[n])
    return out, []


if __name__ == "__main__":
    sys.exit(serve(build_ours, json.loads(sys.argv[1])))

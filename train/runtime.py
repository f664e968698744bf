"""How a training run uses the machine (``runtime.*`` config keys): threads, loader workers, memory format,
``torch.compile``, autocast precision. None of it changes what is trained, only how fast.

``resolve_runtime`` turns the config's ``auto`` values into settings for this device and process;
``ThreadGovernor`` adapts the CPU intra-op thread count to the load: on a shared 2-core machine two
OpenMP threads collapse when another process takes a core (each parallel region waits for the descheduled
sibling; measured 450-630 -> 11-155 images/s) while one thread holds (380-400), and on an idle machine two
threads are the fastest, so neither fixed count is right.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from redistill.errors import UserError
from redistill.registry import Registry

#: values of the on/off keys (``runtime.channels_last``, ``compile``, ``device_augment``, ``tiny_map_conv``)
SWITCH_VALUES = ("auto", "true", "false")


@dataclass(frozen=True)
class Precision:
    """An autocast precision (``runtime.amp``): the dtype forward passes run in, and whether gradients need a
    GradScaler (fp16's range underflows small gradients; bf16 has float32's range)."""

    name: str
    dtype: Optional[torch.dtype]  # None: no autocast
    scaler: bool = False
    what: str = ""


PRECISIONS: Registry[Precision] = Registry("autocast precision")
for _p in (Precision("none", None, what="float32 throughout"),
           Precision("bf16", torch.bfloat16, what="bfloat16 autocast (CPU or CUDA), no loss scaling"),
           Precision("fp16", torch.float16, scaler=True, what="float16 autocast with a GradScaler (CUDA)")):
    PRECISIONS.register(_p.name)(_p)


def resolve_device(name: str) -> torch.device:
    """``device=auto|cpu|cuda|cuda:N`` as a torch device; CUDA asked for where there is none is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here: use device=cpu or device=auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None


def cpu_cores() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_count(key: str, value: str, least: int) -> Optional[int]:
    """``auto`` -> None, else an integer >= ``least``; anything else is one line naming ``key``."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or n < least:
        raise UserError(f"runtime.{key}={value!r} is out of range: it must be auto or an integer >= {least}")
    return n


def switch(value: str, auto: bool) -> bool:
    """An on/off key (``SWITCH_VALUES``): ``auto`` gives the default ``auto``."""
    return auto if value == "auto" else value == "true"


@dataclass
class Runtime:
    """The runtime settings resolved for one device and process (``resolve_runtime``)."""

    device: torch.device
    threads: Optional[int]  # intra-op threads to set; None: leave torch's (CUDA)
    adaptive: bool  # a ThreadGovernor adapts ``threads`` to the load
    workers: int
    device_augment: bool
    channels_last: bool
    compile: bool
    precision: Precision
    fold_teacher: bool
    se_linear: bool
    teacher_stop: bool
    tiny_map_conv: bool
    why_threads: str = ""

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        """The autocast context of a forward pass (a no-op for ``runtime.amp=none``)."""
        if self.precision.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.dtype)

    def describe(self) -> str:
        """One line for the run's log."""
        keys = ("channels_last", "compile", "fold_teacher", "se_linear", "teacher_stop", "tiny_map_conv")
        on = [k for k in keys if getattr(self, k)]
        data = (f"batches augmented on {self.device.type}" if self.device_augment
                else f"per-image loading, {self.workers} workers")
        return (f"runtime: threads {self.why_threads}; {data}; amp {self.precision.name}; "
                f"on: {', '.join(on) or 'nothing'}")


def resolve_runtime(rt, device: torch.device, *, task: str = "classify", world: int = 1,
                    one_tensor: bool = True) -> Runtime:
    """``cfg.runtime`` for ``device``: ``auto`` threads are fixed when OMP_NUM_THREADS is set (the user chose)
    or several processes share the node (DistributedDataParallel: cores / processes each), else adaptive;
    ``auto`` workers are 0 on a CPU (a worker takes cores the step needs; 1-2 workers cost 13-29 % on 2 cores)
    and for batches augmented on the device; channels_last is on for CNN classifiers (bench/results/step_speed.md times it) and off for U-Nets
    (GroupNorm, attention); compile is on for CUDA only (on 2 CPU cores it took 3.5 min and gained nothing)."""
    cuda = device.type == "cuda"
    cores = cpu_cores()
    fixed = parse_count("threads", rt.threads, 1)
    adaptive = False
    if fixed is not None:
        threads, why = fixed, f"{fixed} (runtime.threads)"
    elif cuda:
        threads, why = None, f"torch's default ({torch.get_num_threads()}; the GPU computes)"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), f"{torch.get_num_threads()} (OMP_NUM_THREADS is set)"
    elif world > 1:
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        why = f"{threads} ({cores} cores / processes)"
    else:
        threads, adaptive, why = cores, cores > 1, f"adaptive, 1-{cores} by the measured step time"
    workers = parse_count("workers", rt.workers, 0)
    device_augment = switch(rt.device_augment, one_tensor)
    if device_augment and not one_tensor:
        raise UserError("runtime.device_augment=true needs images of one size (one uint8 tensor); these differ in "
                        "size: use runtime.device_augment=auto or false")
    if workers is None:
        workers = 0 if device_augment or not cuda else max(0, min(8, cores // max(world, 1) - 1))
    precision = PRECISIONS.get(rt.amp)
    return Runtime(device=device, threads=threads, adaptive=adaptive, workers=workers, device_augment=device_augment,
                   channels_last=switch(rt.channels_last, task == "classify"), compile=switch(rt.compile, cuda),
                   precision=precision, fold_teacher=bool(rt.fold_teacher), se_linear=bool(rt.se_linear),
                   teacher_stop=bool(rt.teacher_stop), tiny_map_conv=switch(rt.tiny_map_conv, not cuda),
                   why_threads=why)


# --- adaptive threads ---------------------------------------------------------------------------------------

_GEMM: Dict[str, torch.Tensor] = {}


def parallel_speedup(more: int, fewer: int, repeats: int = 5) -> float:
    """How much faster a 512 x 512 matrix product (3 ms on one core) typically runs on ``more`` threads than at
    best on ``fewer`` (median against minimum of ``repeats`` each): near ``more / fewer`` on idle cores, below 1
    when one is busy. Leaves ``fewer`` threads set."""
    if not _GEMM:
        g = torch.Generator().manual_seed(0)
        _GEMM.update(a=torch.randn(512, 512, generator=g), b=torch.randn(512, 512, generator=g))

    def times(n: int) -> List[float]:
        torch.set_num_threads(n)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(_GEMM["a"], _GEMM["b"])
            ts.append(time.perf_counter() - t)
        return ts

    slow, fast = min(times(fewer)), statistics.median(times(more))
    torch.set_num_threads(fewer)
    return slow / max(fast, 1e-9)


@dataclass
class ThreadGovernor:
    """The intra-op thread count chosen by measured time per image, while training runs.

    It keeps the median of the last ``window`` steps at the current count and tries a neighbouring count
    (halving or doubling) for ``probe_steps`` steps (the first not counted: thread pools warm up), adopting it
    when ``win`` times faster; a probe step ``abort`` times slower than the current median ends the probe at
    once, as a count that collapses can be 40x slower. Probes come when the median rises above ``slowdown``
    times the best seen at this count (another process took a core: fewer threads; the best is kept across
    epochs and checkpoints, so a core taken during evaluation is noticed too), and on a schedule in global
    steps so that a freed core is taken back: first at step ``first`` or once ``window`` steps are timed at
    the current count, whichever is later (slow first steps of an epoch do not decide), soon again after a
    win (in the same direction), else every ``base`` steps, doubling to ``most`` while probes lose. On a busy machine even a few
    steps at too many threads cost more than a few at too few (a collapsed step cost 3-13 s on the shared
    2-core machine), so before a step is risked on more threads a matrix product of a few milliseconds must
    run ``gate`` times faster on them (``parallel_speedup``). The same check picks the start: the most threads
    whose product runs ``gate`` times faster than on half as many (all cores on an idle machine), else one
    thread (a resumed run takes the fewer of that and its checkpoint's count); the first scheduled probe then
    tests a start the check got wrong (it is a few milliseconds).

    On an idle machine every probe ends the same way at the same steps in every run, and the schedule is saved
    in checkpoints (``state``), so a resumed run stays bit-identical there (the thread count changes float sums).
    """

    most_threads: int
    window: int = 8
    least: int = 3
    probe_steps: int = 4
    first: int = 4
    base: int = 100
    most: int = 800
    slowdown: float = 1.5
    win: float = 0.93
    abort: float = 2.0
    gate: float = 1.2
    clock: Callable[[], float] = time.perf_counter
    set_threads: Callable[[int], None] = torch.set_num_threads
    speedup: Optional[Callable[[int, int], float]] = None  # (more, fewer) -> speed-up; None: parallel_speedup
    switches: List[Tuple[int, int, int, str]] = field(default_factory=list)  # (global step, from, to, why)

    def __post_init__(self):
        self.candidates = sorted({max(1, self.most_threads >> k) for k in range(16)}, reverse=True)
        self.current, self.up, self.best = self.candidates[-1], True, None
        self.interval, self.next_probe = self.base, self.first
        speedup = self.speedup or parallel_speedup
        for more, fewer in zip(self.candidates, self.candidates[1:]):
            if speedup(more, fewer) >= self.gate:
                self.current, self.up = more, more < self.candidates[0]
                break
        self.set_threads(self.current)
        self.restart(0)

    def restart(self, global_step: int) -> None:
        """At an epoch's start: the clock restarts (evaluation between epochs is not a step) and so does the window;
        the best median stays, the yardstick of a slowdown."""
        self.global_step, self.times = global_step, []
        self.probe: Optional[Tuple[int, List[float], bool]] = None  # (threads, per-image seconds, scheduled)
        self.last: Optional[float] = None
        self.set_threads(self.current)

    def tick(self, images: int, full: bool = True) -> None:
        """After each step: ``images`` trained; ``full`` False for a short last batch (not comparable)."""
        now = self.clock()
        last, self.last = self.last, now
        self.global_step += 1
        if last is None or not full or images < 1:
            return
        t = (now - last) / images
        if self.probe is not None:
            self._probe_step(t)
            return
        self.times = (self.times + [t])[-self.window:]
        if len(self.times) < self.least:
            return
        med = statistics.median(self.times)
        if len(self.times) == self.window:
            self.best = med if self.best is None else min(self.best, med)
        if self.best is not None and med > self.slowdown * self.best and self._neighbour(up=False):
            self._start(self._neighbour(up=False), scheduled=False)
        elif self.global_step >= self.next_probe and len(self.times) == self.window:
            target = self._neighbour(self.up)
            if target is None:
                self.up = not self.up
                target = self._neighbour(self.up)
            if target > self.current and (self.speedup or parallel_speedup)(target, self.current) < self.gate:
                self._lost(scheduled=True, current=med)  # the cores are busy: no step is risked on them
                self.set_threads(self.current)
                self.last = self.clock()  # the measurement is no part of the next step
                return
            self._start(target, scheduled=True)

    def _neighbour(self, up: bool) -> Optional[int]:
        j = self.candidates.index(self.current) + (-1 if up else 1)
        return self.candidates[j] if 0 <= j < len(self.candidates) else None

    def _start(self, threads: int, scheduled: bool) -> None:
        self.probe = (threads, [], scheduled)
        self.set_threads(threads)

    def _probe_step(self, t: float) -> None:
        threads, ts, scheduled = self.probe
        ts.append(t)
        current = statistics.median(self.times)
        lost = t > self.abort * current * (2 if len(ts) == 1 else 1)
        if not lost and len(ts) < self.probe_steps:
            return
        self.probe = None
        if not lost and statistics.median(ts[1:]) < self.win * current:
            self.switches.append((self.global_step, self.current, threads, "scheduled" if scheduled else "slowdown"))
            self.up = threads > self.current
            self.current, self.times, self.best = threads, ts[1:], statistics.median(ts[1:])
            self.interval = self.base
            further = self._neighbour(self.up) is not None
            self.next_probe = self.global_step + (self.window if further else self.interval)
            if not further:
                self.up = not self.up
            return
        self.set_threads(self.current)
        self._lost(scheduled, current)

    def _lost(self, scheduled: bool, current: float) -> None:
        self.best = current  # every count is slower now: this is the new normal
        if scheduled:
            self.up = not self.up
            self.interval = min(self.interval * 2, self.most)
            self.next_probe = self.global_step + self.interval

    def state(self) -> Dict[str, Any]:
        """What a checkpoint keeps, so a resumed run probes at the same steps."""
        return {"threads": self.current, "up": self.up, "interval": self.interval, "next_probe": self.next_probe,
                "best": self.best}

    def load(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        if int(state["threads"]) in self.candidates:  # never more than the start check found free now
            self.current = min(int(state["threads"]), self.current)
        self.up, self.interval, self.next_probe = bool(state["up"]), int(state["interval"]), int(state["next_probe"])
        self.best = state.get("best") if self.current == int(state["threads"]) else None
        self.set_threads(self.current)

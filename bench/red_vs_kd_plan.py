"""The RED-vs-KD benchmark's plan: its settings, its steps (each a ``redistill distill`` command line), their time
estimates at measured step rates, and the calibration that measures those rates with tiny real runs.

``bench.red_vs_kd`` runs the plan; ``bench.red_vs_kd_gpu`` sizes it to a lent GPU machine's minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench.red_vs_kd_page import REFERENCE, VARIANTS, Variant
from bench.steps import stop_processes

PRESET = "mobilenetv3_small_x4_64"
PREFIX = "rvk"
#: the teacher's recipe, for a strong teacher in few epochs: the `quick` preset's optimiser (Adam 3e-3, picked over
#: SGD on the validation split there, train/configs/quick.yaml), cosine to zero, CIFAR crop + flip, no mixing,
#: batch 128; not tuned at 64 px
TEACHER_SETTINGS = ("recipe=", "optim.name=adam", "optim.lr=0.003", "optim.weight_decay=0", "optim.schedule=cosine",
                    "optim.warmup_epochs=0.5", "data.batch_size=128", "data.augment=crop_flip", "data.cutmix=0",
                    "data.mixup=0")


#: step rates (training images per second, data loading included) the plan is estimated with; --calibrate measures
#: them here. Defaults: the lead's idle 2-core figures at 32 px (teacher 512, distillation 539 images/s, batch 128)
#: scaled to 64 px (teacher ~4x the work) and to batch 8 (per-step overhead), not measured
RATE_KINDS = {"teacher": 130.0, "distill": 150.0, "student": 300.0, "distill_b64": 220.0}
#: evaluation (validation and test forward passes) runs this many times faster than the stage's training step
EVAL_SPEEDUP = 4.0
#: per run: process start, decoding the data set, the memory analysis
FIXED_S = 40.0


@dataclass
class Settings:
    """What the benchmark trains; a state made with other settings is refused (a run would not be comparable)."""

    preset: str = PRESET
    data_root: str = "data/cifar10"
    seeds: Tuple[int, ...] = (0, 1)
    epochs: int = 6
    teacher_epochs: int = 15
    train_subset: int = 15000
    variants: Tuple[str, ...] = tuple(v.name for v in VARIANTS)
    reference: bool = True
    image_size: int = 0  # 0: the preset's (64 px)
    overrides: Tuple[str, ...] = ()  # key=value given to every run, e.g. runtime.amp=bf16 on a GPU


@dataclass
class Step:
    name: str  # state key and run name suffix
    run: str  # run folder name under --runs
    variant: Optional[Variant]  # None: the teacher
    seed: int
    argv: List[str]


def variants_of(s: Settings) -> List[Variant]:
    known = {v.name: v for v in VARIANTS}
    return [known[n] for n in s.variants]


def teacher_checkpoint(a) -> Path:
    """The committed copy of the teacher's weights when there is one, else the run's own best.pt."""
    committed = Path(a.results + "_run") / "teacher" / "best.pt"
    return committed if committed.is_file() else Path(a.runs) / f"{PREFIX}-teacher" / "teacher" / "best.pt"


#: keys every step's command line sets (beside TEACHER_SETTINGS and the variants'): never a --set
OWN_KEYS = ("method=", "name=", "seed=", "epochs=", "out_dir=", "data.root=", "data.image_size=", "data.train_subset=",
            "teacher.checkpoint=", "recipe=")


def run_settings(s: Settings) -> List[str]:
    """The ``key=value`` every run of the benchmark takes beyond the preset: the data, the image size, ``--set``."""
    return [f"data.root={s.data_root}", *([f"data.image_size={s.image_size}"] if s.image_size else []), *s.overrides]


def plan(a, s: Settings) -> List[Step]:
    """The teacher, then every variant with every seed (seed-major), then the reference run if asked."""
    cli = [sys.executable, "-m", "redistill.cli", "distill", s.preset]
    common = [f"out_dir={a.runs}", *run_settings(s)]
    steps = [Step("teacher", f"{PREFIX}-teacher", None, s.seeds[0],
                  cli + ["method=teacher", f"name={PREFIX}-teacher", f"seed={s.seeds[0]}", f"epochs={s.teacher_epochs}",
                         *common, *TEACHER_SETTINGS, "--resume"])]
    runs = [(v, seed) for seed in s.seeds for v in variants_of(s)]
    runs += [(REFERENCE, s.seeds[0])] if s.reference else []
    for v, seed in runs:
        name = v.name if v is REFERENCE else f"{v.name}-s{seed}"
        steps.append(Step(name, f"{PREFIX}-{name}", v, seed, cli + [
            f"method={v.method}", f"name={PREFIX}-{name}", f"seed={seed}", f"epochs={s.epochs}", *common,
            f"data.train_subset={s.train_subset}", f"teacher.checkpoint={teacher_checkpoint(a)}", *v.overrides,
            "--resume"]))
    return steps


# --- time estimates -------------------------------------------------------------------------------------------


def image_counts(root: str) -> Tuple[int, int]:
    """(training, test) images under an image-folder root (CIFAR-10's 50,000 / 10,000 when it is not there)."""
    counts = []
    for split, default in (("train", 50000), ("test", 10000)):
        d = Path(root) / split
        counts.append(sum(len(os.listdir(c)) for c in d.iterdir() if c.is_dir()) if d.is_dir() else default)
    return counts[0], counts[1]


def estimate(step: Step, s: Settings, rates: Dict[str, float], counts: Tuple[int, int]) -> Tuple[int, float]:
    """(training images, estimated seconds) of one step: training at its rate, validation every epoch and the test
    set twice (best and last epoch) ``EVAL_SPEEDUP`` times faster, plus ``FIXED_S``."""
    n_train, n_test = counts
    if step.variant is None:
        n, epochs, rate = n_train, s.teacher_epochs, rates["teacher"]
    else:
        full = "data.train_subset=0" in step.variant.overrides or not s.train_subset
        n, epochs, rate = (n_train if full else min(s.train_subset, n_train)), s.epochs, rates[step.variant.rate]
    val = round(n * 0.05)
    images = (n - val) * epochs
    return images, images / rate + (val * epochs + 2 * n_test) / (rate * EVAL_SPEEDUP) + FIXED_S


def wall_s(times: Dict[str, float], jobs: int) -> float:
    """Wall time of steps (name -> seconds) when the students run ``jobs`` at a time after the teacher: the
    teacher's, plus the students' sum over ``jobs`` (never less than the longest student)."""
    students = [t for n, t in times.items() if n != "teacher"]
    return times.get("teacher", 0.0) + (max(sum(students) / jobs, max(students)) if students else 0.0)


def print_plan(steps: List[Step], s: Settings, rates: Dict[str, float], measured: bool, budget_h: float,
               done: Dict[str, dict], jobs: int = 1) -> float:
    """The plan as a table with its estimated time; returns the estimated wall seconds of the steps still to run."""
    counts = image_counts(s.data_root)
    total, todo = 0.0, {}
    print(f"{'step':<20} {'images trained':>15} {'img/s':>7} {'est. min':>9}  status")
    for st in steps:
        images, sec = estimate(st, s, rates, counts)
        kind = "teacher" if st.variant is None else st.variant.rate
        status = f"done ({done[st.name]['seconds'] / 60:.1f} min)" if done.get(st.name, {}).get("done") else "to run"
        total += sec
        if not status.startswith("done"):
            todo[st.name] = sec
        print(f"{st.name:<20} {images:>15,} {rates[kind]:>7.0f} {sec / 60:>9.1f}  {status}")
    how = "measured here by --calibrate" if measured else "assumed (not measured; --calibrate measures them)"
    left = wall_s(todo, jobs)
    wall = wall_s({st.name: estimate(st, s, rates, counts)[1] for st in steps}, jobs)
    print(f"total {total / 3600:.2f} h estimated" + (f", {wall / 3600:.2f} h of wall time with --jobs {jobs}"
                                                     if jobs > 1 else "")
          + f" ({left / 3600:.2f} h still to run); budget {budget_h:g} h; "
          f"rates {how}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in rates.items()))
    if wall > budget_h * 3600:
        print("over the budget: lower --train-subset, --epochs or --teacher-epochs (the estimate is linear in each)")
    fit = subset_for(steps, s, rates, counts, budget_h * 3600, jobs)
    if fit is not None and fit != s.train_subset:
        print(f"--train-subset {fit} would make the estimate {budget_h:g} h with these epochs")
    return left


def subset_for(steps: List[Step], s: Settings, rates: Dict[str, float], counts: Tuple[int, int],
               budget_s: float, jobs: int = 1) -> Optional[int]:
    """The largest student subset (in images, a multiple of 1,000; a split under 1,000 whole) whose plan is
    estimated within ``budget_s`` of wall time. None when no subset fits or the plan uses none."""
    if not s.train_subset:
        return None

    def total(n):
        t = replace(s, train_subset=n)
        return wall_s({st.name: estimate(st, t, rates, counts)[1] for st in steps}, jobs)

    if counts[0] < 1000:  # a tiny data set: all of it or nothing
        return counts[0] if total(counts[0]) <= budget_s else None
    lo, hi = 1, counts[0] // 1000  # in thousands; the estimate never falls as the subset grows: bisect
    if total(1000) > budget_s:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid * 1000) <= budget_s else (lo, mid - 1)
    return lo * 1000


def calibrated_for(s: Settings, jobs: int) -> Dict[str, object]:
    """What a calibration's rates depend on beyond the machine (a calibration made for others is not used)."""
    return {"jobs": jobs, "image_size": s.image_size, "overrides": list(s.overrides)}


def calibrate(a, s: Settings, jobs: int = 1) -> Dict[str, float]:
    """Measure each kind of step's training rate with tiny real runs in <runs>/calibration: two epochs of 1,280
    images (5,120 for the teacher), the rate read from the second, so that first-use costs (a GPU's kernel loading
    and selection, on a lent H200 most of a one-epoch run) are not taken for the steady rate.

    With ``jobs`` > 1 the student kinds run ``jobs`` at once (mostly distillation, as in the plan), so the rates are
    those of a step sharing the machine as the benchmark's students will; each kind's rate is the median of its runs."""
    out = Path(a.runs) / "calibration"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cli = [sys.executable, "-m", "redistill.cli", "distill", s.preset]
    tiny = [f"out_dir={out}", *run_settings(s), "epochs=2", "data.train_subset=1280", "data.test_subset=100"]
    teacher = f"teacher.checkpoint={out}/teacher/teacher/best.pt"
    # batch 128: 40 steps, not 10, so that a GPU's first slow steps weigh less
    extra = {"teacher": ["method=teacher", *TEACHER_SETTINGS, "data.train_subset=5120"], "distill": ["method=red", teacher],
             "student": ["method=student"], "distill_b64": ["method=kd", "recipe=paper_kd", teacher]}
    kinds = ["distill"] * max(jobs - 2, 1) + ["student", "distill_b64"]
    names = {"teacher": "teacher", **{f"{k}{i}" if jobs > 1 else k: k for i, k in enumerate(kinds)}}
    rates: Dict[str, List[float]] = {}
    students = [n for n in names if n != "teacher"]
    for group in [["teacher"], *([[n] for n in students] if jobs == 1 else [students])]:
        procs = []
        try:
            for n in group:
                f = open(out / f"{n}.log", "w")
                procs.append((n, f, subprocess.Popen(cli + [f"name={n}", *tiny, *extra[names[n]]], stdout=f,
                                                     stderr=subprocess.STDOUT)))
            for n, f, proc in procs:
                rc = proc.wait()
                if rc != 0:
                    raise SystemExit(f"[red_vs_kd] calibration run {n} failed (exit {rc}); see {out / (n + '.log')}")
                stage = "teacher" if n == "teacher" else "student"
                hist = [json.loads(x) for x in (out / n / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
                rates.setdefault(names[n], []).append(hist[-1]["train_images_per_s"])
        finally:  # a failed run (or an interruption) stops its siblings: none outlives the calibration
            stop_processes([proc for _, _, proc in procs])
            for _, f, _ in procs:
                f.close()
    rate = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rate.items():
        print(f"[red_vs_kd] calibration: {k} {v:.0f} img/s" + (f" (median of {len(rates[k])} runs at once)"
                                                               if len(rates[k]) > 1 else ""), flush=True)
    return rate

"""The RED-vs-KD benchmark (issue 13): does RED beat KD at 64 px with a strong teacher? Resumable across sessions.

    python -m bench.red_vs_kd --plan --calibrate     # measure this machine's step rates (~5 min), print plan and time
    nohup python -m bench.red_vs_kd --commit --remarks bench/results/red_vs_kd_remarks.md \\
        > runs/red_vs_kd.log 2>&1 &                  # run it (about 5 h on an idle 2-core CPU)
    python -m bench.red_vs_kd --pages-only --remarks bench/results/red_vs_kd_remarks.md

The MobileNetV3-small pair of ``mobilenetv3_small_x4_64`` on CIFAR-10 upsampled to 64 px. A teacher is trained
once on the whole training split (its weights are committed beside the results when under 10 MB and reused
by every student, in this session and later ones); then every variant of ``VARIANTS`` trains the student with
the official student recipe (``recipe: paper_student``) and equal epochs on a balanced training subset, with
every seed. Each step is one ``redistill distill ... --resume`` subprocess: a finished step is skipped on a
re-run, an interrupted one continues from its last epoch. After each finished step its config, metrics,
summaries, log and theoretical peak memory are copied to ``<results>_run/`` and the page is rewritten from
those copies; ``--commit`` then commits exactly those files (by path), so a session can end at any time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench.distill_report import clean_log, copied_run_files
from bench.red_vs_kd_page import REFERENCE, VARIANTS, Variant, write_results
from redistill.errors import UserError, did_you_mean
from redistill.io import atomic_copy, atomic_write_json, atomic_write_text
from redistill.report import add_page_options, machine, timestamp
from train.config import load_config
from train.design import analyze_model, checkpoint_design

PROG = "python -m bench.red_vs_kd"
PRESET = "mobilenetv3_small_x4_64"
PREFIX = "rvk"
#: the teacher's weights are committed when their checkpoint is smaller than this
TEACHER_COMMIT_LIMIT = 10 * 1024 * 1024
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
    """The largest student subset (in images, a multiple of 1,000) whose plan is estimated within ``budget_s`` of
    wall time. None when no subset fits or the plan uses none."""
    if not s.train_subset:
        return None

    def total(n):
        t = replace(s, train_subset=n)
        return wall_s({st.name: estimate(st, t, rates, counts)[1] for st in steps}, jobs)

    lo, hi = 1, counts[0] // 1000  # in thousands; the estimate never falls as the subset grows: bisect
    if hi < 1 or total(1000) > budget_s:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total(mid * 1000) <= budget_s else (lo, mid - 1)
    return lo * 1000


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
        for n in group:
            f = open(out / f"{n}.log", "w")
            procs.append((n, f, subprocess.Popen(cli + [f"name={n}", *tiny, *extra[names[n]]], stdout=f,
                                                 stderr=subprocess.STDOUT)))
        for n, f, proc in procs:
            rc = proc.wait()
            f.close()
            if rc != 0:
                raise SystemExit(f"[red_vs_kd] calibration run {n} failed (exit {rc}); see {out / (n + '.log')}")
            stage = "teacher" if n == "teacher" else "student"
            hist = [json.loads(x) for x in (out / n / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
            rates.setdefault(names[n], []).append(hist[-1]["train_images_per_s"])
    rate = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rate.items():
        print(f"[red_vs_kd] calibration: {k} {v:.0f} img/s" + (f" (median of {len(rates[k])} runs at once)"
                                                               if len(rates[k]) > 1 else ""), flush=True)
    return rate


# --- state and the finished steps' files ----------------------------------------------------------------------


class State:
    """The benchmark's record (settings, machine, calibration, steps), kept in <runs>/state.json and committed in
    <results>_run/state.json; a later session without <runs> continues from the committed copy."""

    def __init__(self, a, settings: Settings):
        self.paths = [Path(a.runs) / "state.json", Path(a.results + "_run") / "state.json"]
        found = self.found = next((p for p in self.paths if p.is_file()), None)
        self.data = json.loads(found.read_text()) if found else {}
        want = _settings_record(settings)
        saved = self.data.get("settings")
        if saved is not None:  # a setting added since takes its default
            saved = {**_settings_record(Settings()), **saved}
            self.data["settings"] = saved
        if saved is not None and saved != want:
            k = next((k for k in {**saved, **want} if saved.get(k) != want.get(k)), "settings")
            raise UserError(f"{found} was made with {k}={saved.get(k)!r}, not {want.get(k)!r}: rerun with the same "
                            f"settings, or give new --runs and --results folders for a new benchmark")
        self.data.setdefault("settings", want)
        self.data.setdefault("steps", {})

    @property
    def steps(self) -> Dict[str, dict]:
        return self.data["steps"]

    def save(self) -> None:
        for p in self.paths:
            atomic_write_json(p, self.data)


def _settings_record(s: Settings) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}


def peak_memory(checkpoint: Path) -> dict:
    """The theoretical peak activation memory of a checkpoint's network as exported (RED blocks included)."""
    model, size = checkpoint_design(checkpoint)
    return {"peak_bytes": analyze_model(model, size).peak_bytes, "image_size": size, "network": model.arch_name,
            "definition": "liveness peak of the exported ONNX graph, FP32, batch 1 (redistill memory); exact to the byte"}


def keep_step(a, step: Step, log: Path) -> List[Path]:
    """Copy a finished step's run files, log and memory figure to <results>_run/<name>/ (the teacher's weights too,
    under the limit); returns the paths written."""
    run_dir, dest = Path(a.runs) / step.run, Path(a.results + "_run") / step.name
    written = copied_run_files(run_dir, dest)
    stage = "teacher" if step.variant is None else "student"
    best = run_dir / stage / "best.pt"
    atomic_write_json(dest / "memory.json", peak_memory(best))
    written.append(dest / "memory.json")
    atomic_write_text(dest / "log.txt", clean_log(log.read_text(errors="replace")))
    written.append(dest / "log.txt")
    if step.variant is None:
        size = best.stat().st_size
        if size < TEACHER_COMMIT_LIMIT:
            written.append(atomic_copy(best, dest / "best.pt"))
        else:
            print(f"[red_vs_kd] the teacher's best.pt is {size / 2**20:.1f} MiB, over the limit: not copied", flush=True)
    return written


def _inside(path: Path, folder: str) -> bool:
    return Path(folder).resolve() in Path(path).resolve().parents


def commit(paths: List[Path], message: str) -> None:
    """``git add`` and ``git commit`` exactly ``paths`` (nothing else staged goes in)."""
    where = Path(paths[0]).resolve().parent
    top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        raise UserError(f"--commit: {where} is not in a git repository ({top.stderr.strip()}); run without --commit")
    rel = [str(Path(p).resolve().relative_to(top.stdout.strip())) for p in paths]
    for argv in (["add", "--", *rel], ["commit", "-q", "-m", message, "--only", "--", *rel]):
        for wait in (5, 15, 40, 0):  # someone else's git command holds the index for a moment
            r = subprocess.run(["git", "-C", top.stdout.strip(), *argv], capture_output=True, text=True)
            if r.returncode == 0 or "index.lock" not in r.stderr or not wait:
                break
            time.sleep(wait)
        if r.returncode != 0 and "nothing to commit" not in r.stdout + r.stderr:
            raise UserError(f"--commit: git {argv[0]} failed: {(r.stderr or r.stdout).strip().splitlines()[-1]}")


# --- the command ----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    d = Settings()
    ap.add_argument("--plan", action="store_true", help="print the plan with its estimated time and stop")
    ap.add_argument("--calibrate", action="store_true", help="measure the step rates here first (about 5 min of tiny "
                    "real runs) and estimate the plan with them; kept in <runs>/calibration/rates.json for later runs")
    ap.add_argument("--commit", action="store_true", help="git add + commit each finished step's result files (only those)")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run the whole plan)")
    ap.add_argument("--jobs", type=int, default=1, help="students trained at once after the teacher (1 on a 2-core "
                    "CPU; more on a GPU, where one small-batch step leaves it mostly idle); --calibrate measures so too")
    ap.add_argument("--stop-after-s", type=float, default=0, help="stop the running steps after this many seconds "
                    "(they resume on the next run) and start none estimated to end later (0: no limit)")
    ap.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="student seeds; the teacher takes the first")
    ap.add_argument("--epochs", type=int, default=d.epochs, help="epochs of every student")
    ap.add_argument("--teacher-epochs", type=int, default=d.teacher_epochs)
    ap.add_argument("--train-subset", type=int, default=d.train_subset,
                    help="students train on this many training images, balanced over classes (0: all)")
    ap.add_argument("--variants", default=",".join(d.variants), help="which of: " + ", ".join(v.name for v in VARIANTS))
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=d.reference,
                    help="last, train the student alone on the whole training split (first seed): what the subset "
                    "cost (default: on)")
    ap.add_argument("--budget-h", type=float, default=5.0, help="machine-time budget the plan is checked against")
    ap.add_argument("--preset", default=d.preset)
    ap.add_argument("--image-size", type=int, default=d.image_size, help="train every run at this size (0: the "
                    "preset's, 64 px)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="a config key for every run, e.g. runtime.amp=bf16 (repeatable; part of the settings)")
    ap.add_argument("--data-root", default=d.data_root)
    ap.add_argument("--runs", default="runs/red_vs_kd", help="run folders and the working state")
    ap.add_argument("--results", default="bench/results/red_vs_kd", help="page path without extension; run files "
                    "go to <results>_run/")
    add_page_options(ap, "<results>_run/ (configs, metrics, summaries, memory, state.json)")
    return ap


def settings_of(a) -> Settings:
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    known = [v.name for v in VARIANTS]
    bad = [n for n in names if n not in known]
    if bad:
        raise UserError(f"--variants: unknown {bad[0]!r}." + did_you_mean(bad[0], known))
    try:
        seeds = tuple(int(x) for x in a.seeds.split(","))
    except ValueError:
        raise UserError(f"--seeds {a.seeds!r} must be integers separated by commas, e.g. 0,1") from None
    if min(a.epochs, a.teacher_epochs) < 1 or a.train_subset < 0 or a.image_size < 0:
        raise UserError("--epochs and --teacher-epochs must be at least 1, --train-subset and --image-size at least 0")
    s = Settings(a.preset, a.data_root, seeds, a.epochs, a.teacher_epochs, a.train_subset, tuple(names), a.reference,
                 a.image_size, tuple(a.overrides))
    load_config(s.preset, [o for o in run_settings(s) if not o.startswith("data.root=")])  # a bad --set: one line now
    return s


def _plan_options(argv: List[str]) -> List[str]:
    """The command line without the options that only steer this invocation (--plan, --max-steps N, ...)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--max-steps", "--stop-after-s"):
            skip = True
        elif x not in ("--plan", "--calibrate", "--pages-only") and not x.startswith(("--max-steps=", "--stop-after-s=")):
            out.append(x)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    command = " ".join([PROG, *map(shlex.quote, _plan_options(argv))])
    if a.pages_only:
        write_results(a)
        return 0
    if a.remarks and not Path(a.remarks).is_file():
        raise UserError(f"--remarks {a.remarks} not found: give the hand-written remarks file (Markdown)")
    if a.jobs < 1 or a.stop_after_s < 0:
        raise UserError("--jobs must be at least 1 and --stop-after-s at least 0")
    s = settings_of(a)
    state = State(a, s)
    steps = plan(a, s)
    cal_file = Path(a.runs) / "calibration" / "rates.json"  # apart from the state: it holds for any settings
    if a.calibrate:
        atomic_write_json(cal_file, {"rates": calibrate(a, s, a.jobs), "when": timestamp(), "jobs": a.jobs,
                                     "load_1min": os.getloadavg()[0]})
    cal = json.loads(cal_file.read_text()) if cal_file.is_file() else state.data.get("calibration")
    rates = {**RATE_KINDS, **(cal["rates"] if cal else {})}
    print_plan(steps, s, rates, cal is not None, a.budget_h, state.steps, a.jobs)
    if a.plan:
        return 0
    if cal is not None:
        state.data["calibration"] = cal
    state.data.setdefault("machine", machine())
    state.data.setdefault("created", timestamp())
    state.data["command"] = command
    return Runner(a, s, state, rates).run()


class Runner:
    """Runs the plan's unfinished steps: the teacher alone, then up to ``--jobs`` students at once, each a
    subprocess; a finished step's files are kept (and committed) as it finishes. ``--stop-after-s`` stops the
    running steps at that time (they resume on the next run) and starts none estimated to end after it."""

    def __init__(self, a, s: Settings, state: State, rates: Dict[str, float]):
        self.a, self.s, self.state, self.rates = a, s, state, rates
        self.counts = image_counts(s.data_root)
        self.deadline = time.time() + a.stop_after_s if a.stop_after_s else None
        self.running: Dict[str, Tuple[Step, subprocess.Popen, float, object]] = {}
        self.failed: List[str] = []

    def run(self) -> int:
        a, state = self.a, self.state
        todo = [st.name for st in plan(a, self.s) if not state.steps.get(st.name, {}).get("done")]
        if a.max_steps:
            todo = todo[:a.max_steps]
        while todo or self.running:
            while todo and len(self.running) < a.jobs and "teacher" not in self.running:
                st = next(x for x in plan(a, self.s) if x.name == todo[0])  # the teacher's weights: where it left them
                if st.variant is not None and not teacher_checkpoint(a).is_file():
                    self.stop_all()
                    raise UserError(f"the teacher's weights are neither committed nor in {a.runs}: remove the 'teacher' "
                                    f"step from {state.found or state.paths[1]} to train it again")
                todo.pop(0)
                est = estimate(st, self.s, self.rates, self.counts)[1]
                if self.deadline and time.time() + est > self.deadline:
                    print(f"[red_vs_kd] {st.name} not started: estimated {est / 60:.1f} min, past --stop-after-s",
                          flush=True)
                    if st.variant is None:
                        todo = []  # the students need its weights
                    continue
                self.start(st, est)
                if st.variant is None:
                    break  # the students wait for the teacher's weights
            if not self.running:
                break
            done = self.wait()
            if done is None:
                print(f"[red_vs_kd] --stop-after-s reached: stopped {', '.join(self.running)}; run again to resume",
                      flush=True)
                self.stop_all()
                if any(v.get("done") for v in state.steps.values()):
                    write_results(a)
                return 0
            self.finish(done)
            if done in self.failed and done == "teacher":
                todo = []
        if self.failed:
            raise SystemExit(f"[red_vs_kd] failed: {', '.join(self.failed)} (see {a.runs}/logs/); run again to resume them")
        left = [st.name for st in plan(a, self.s) if not state.steps.get(st.name, {}).get("done")]
        if left:
            print(f"[red_vs_kd] {len(left)} step(s) left; run again to continue", flush=True)
        return 0

    def start(self, st: Step, estimate_s: float) -> None:
        """Start one ``redistill distill`` subprocess; the load it started under and the jobs beside it recorded."""
        log = Path(self.a.runs) / "logs" / f"{st.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        rec = self.state.steps.setdefault(st.name, {})
        rec.update({"argv": st.argv, "estimate_s": round(estimate_s, 1), "load_1min_at_start": os.getloadavg()[0],
                    "attempts": rec.get("attempts", 0) + 1, "jobs": self.a.jobs})
        self.state.save()
        print(f"[red_vs_kd] {st.name}: {' '.join(shlex.quote(x) for x in st.argv)}", flush=True)
        if rec["load_1min_at_start"] > 1.5 and self.a.jobs == 1:
            print(f"[red_vs_kd] load average {rec['load_1min_at_start']:.1f} at the start: something else is running, "
                  "so this run's machine time will read high (it is recorded on the page)", flush=True)
        f = open(log, "a")
        self.running[st.name] = (st, subprocess.Popen(st.argv, stdout=f, stderr=subprocess.STDOUT), time.time(), f)

    def wait(self) -> Optional[str]:
        """The name of the next step to end, or None once the deadline passes first."""
        while True:
            for name, (_, proc, _, _) in self.running.items():
                if proc.poll() is not None:
                    return name
            if self.deadline and time.time() > self.deadline:
                return None
            time.sleep(0.5)

    def _end(self, name: str) -> Tuple[Step, int, float]:
        st, proc, t0, f = self.running.pop(name)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a step that ignores SIGTERM
            proc.kill()
            rc = proc.wait()
        f.close()
        return st, rc, time.time() - t0

    def stop_all(self) -> None:
        """Stop every running step (each resumes from its last epoch) and keep its time so far."""
        for name in list(self.running):
            self.running[name][1].terminate()
        for name in list(self.running):
            _, _, seconds = self._end(name)
            rec = self.state.steps[name]
            rec["seconds_before"] = round(rec.get("seconds_before", 0.0) + seconds, 1)
        self.state.save()

    def finish(self, name: str) -> None:
        """Record an ended step; a finished one's files are kept, the page rewritten and (``--commit``) committed."""
        a, state = self.a, self.state
        st, rc, seconds = self._end(name)
        rec = state.steps[name]
        log = Path(a.runs) / "logs" / f"{name}.log"
        if rc != 0:
            rec["seconds_before"] = round(rec.get("seconds_before", 0.0) + seconds, 1)
            state.save()
            self.failed.append(name)
            print(f"[red_vs_kd] {name} failed (exit {rc}); see {log}", flush=True)
            return
        # an attempt killed with its session records nothing: ``attempts`` says the time may be short
        seconds += rec.get("seconds_before", 0.0)
        rec.update({"done": True, "seconds": round(seconds, 1), "finished": timestamp(), "machine": machine()})
        print(f"[red_vs_kd] {name}: {seconds / 60:.1f} min (estimated {rec['estimate_s'] / 60:.1f})", flush=True)
        written = keep_step(a, st, log)
        state.save()
        written += [state.paths[1], *write_results(a)]
        if a.commit:  # the whole results folder: a step whose commit failed before goes in with this one
            commit([Path(a.results + "_run"), *(p for p in written if not _inside(p, a.results + "_run"))],
                   f"red_vs_kd: {name} finished ({seconds / 60:.0f} min)")


if __name__ == "__main__":
    raise SystemExit(main())

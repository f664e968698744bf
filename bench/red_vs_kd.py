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
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench.distill_report import clean_log, copied_run_files
from bench.red_vs_kd_page import VARIANTS, write_results
from bench.red_vs_kd_plan import (OWN_KEYS, RATE_KINDS, TEACHER_SETTINGS, Settings, Step, calibrate, calibrated_for,
                                  estimate, image_counts, plan, print_plan, run_settings, teacher_checkpoint)
from bench.steps import stop_processes, without_steering
from redistill.errors import UserError, did_you_mean
from redistill.io import atomic_copy, atomic_write_json, atomic_write_text
from redistill.report import add_page_options, machine, timestamp
from train.config import load_config
from train.design import analyze_model, checkpoint_design

PROG = "python -m bench.red_vs_kd"
#: the teacher's weights are committed when their checkpoint is smaller than this
TEACHER_COMMIT_LIMIT = 10 * 1024 * 1024


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
            saved = {k: v for k, v in {**_settings_record(Settings()), **saved}.items()
                     if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}
            self.data["settings"] = saved
        if saved is not None and saved != want:
            full_saved, full_want = {**LATER_SETTINGS, **saved}, {**LATER_SETTINGS, **want}
            k = next((k for k in full_want if full_saved.get(k) != full_want.get(k)), "settings")
            raise UserError(f"{found} was made with {k}={full_saved.get(k)!r}, not {full_want.get(k)!r}: rerun with the same "
                            f"settings, or give new --runs and --results folders for a new benchmark")
        self.data.setdefault("settings", want)
        self.data.setdefault("steps", {})

    @property
    def steps(self) -> Dict[str, dict]:
        return self.data["steps"]

    def save(self) -> None:
        for p in self.paths:
            atomic_write_json(p, self.data)


#: settings added later: left out of the record at their defaults, so that a state stays readable by older code
LATER_SETTINGS = {"image_size": 0, "overrides": []}


def _settings_record(s: Settings) -> dict:
    rec = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    return {k: v for k, v in rec.items() if not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}


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
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
    own = {x.split("=", 1)[0] for x in OWN_KEYS + TEACHER_SETTINGS + tuple(o for v in VARIANTS for o in v.overrides)}
    for o in a.overrides:
        key = o.split("=", 1)[0].strip()
        if "=" not in o or key in own:
            raise UserError(f"--set {o!r}: " + ("give KEY=VALUE" if "=" not in o else f"the benchmark sets {key} "
                            "itself for its runs (its options: --epochs, --seeds, --image-size, --train-subset, ...)"))
    s = Settings(a.preset, a.data_root, seeds, a.epochs, a.teacher_epochs, a.train_subset, tuple(names), a.reference,
                 a.image_size, tuple(a.overrides))
    load_config(s.preset, [o for o in run_settings(s) if not o.startswith("data.root=")])  # a bad --set: one line now
    return s


def _plan_options(argv: List[str]) -> List[str]:
    """The command line without the options that only steer this invocation (--plan, --max-steps N, ...)."""
    return without_steering(argv, steering=("--max-steps", "--stop-after-s"),
                            flags=("--plan", "--calibrate", "--pages-only"))


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
    cal_file = Path(a.runs) / "calibration" / "rates.json"  # apart from the state: a later benchmark may reuse it
    if a.calibrate:
        atomic_write_json(cal_file, {"rates": calibrate(a, s, a.jobs), "when": timestamp(), **calibrated_for(s, a.jobs),
                                     "load_1min": os.getloadavg()[0]})
    cal = json.loads(cal_file.read_text()) if cal_file.is_file() else state.data.get("calibration")
    if cal is not None and any(cal.get(k, v) != v for k, v in calibrated_for(s, a.jobs).items()):
        print(f"[red_vs_kd] the calibration in {cal_file} was measured for other settings "
              f"({', '.join(f'{k} {cal.get(k)!r}' for k, v in calibrated_for(s, a.jobs).items() if cal.get(k, v) != v)}): "
              "not used; --calibrate measures these", flush=True)
        cal = None
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
    running steps at that time (they resume on the next run) and starts none estimated to end after it. However
    the benchmark ends (an error, Ctrl-C, SIGTERM), no step it started outlives it."""

    def __init__(self, a, s: Settings, state: State, rates: Dict[str, float]):
        self.a, self.s, self.state, self.rates = a, s, state, rates
        self.counts = image_counts(s.data_root)
        self.deadline = time.time() + a.stop_after_s if a.stop_after_s else None
        self.running: Dict[str, Tuple[Step, subprocess.Popen, float, object]] = {}
        self.ended: Dict[str, float] = {}  # when each process was seen to exit
        self.failed: List[str] = []

    def run(self) -> int:
        """The steps; 0 when none failed (some may be left for the next run), else 1."""
        previous = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() else None
        try:
            return self._run()
        except BaseException:
            self.stop_all()
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _run(self) -> int:
        a, state = self.a, self.state
        todo = [st.name for st in plan(a, self.s) if not state.steps.get(st.name, {}).get("done")]
        if a.max_steps:
            todo = todo[:a.max_steps]
        while todo or self.running:
            while todo and len(self.running) < a.jobs and "teacher" not in self.running:
                st = next(x for x in plan(a, self.s) if x.name == todo[0])  # the teacher's weights: where it left them
                if st.variant is not None and not teacher_checkpoint(a).is_file():
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
                written = [state.paths[1], *(write_results(a) if any(v.get("done") for v in state.steps.values())
                                             else [])]
                if a.commit:
                    commit([Path(a.results + "_run"), *(p for p in written if not _inside(p, a.results + "_run"))],
                           "red_vs_kd: stopped at --stop-after-s")
                break
            self.finish(done)
            if done in self.failed and done == "teacher":
                todo = []
        if self.failed:
            print(f"[red_vs_kd] failed: {', '.join(self.failed)} (see {a.runs}/logs/); run again to resume them",
                  flush=True)
            return 1
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
        """The name of the next step to end (its exit time noted for every step seen ended), or None once the
        deadline passes first."""
        while True:
            for name, (_, proc, _, _) in self.running.items():
                if proc.poll() is not None:
                    self.ended.setdefault(name, time.time())
            first = min((n for n in self.running if n in self.ended), key=self.ended.get, default=None)
            if first is not None:
                return first
            if self.deadline and time.time() > self.deadline:
                return None
            time.sleep(0.5)

    def _end(self, name: str) -> Tuple[Step, int, float]:
        """Take an exited step off the running ones: (step, exit status, wall seconds up to its exit)."""
        st, proc, t0, f = self.running.pop(name)
        rc = proc.wait()
        f.close()
        return st, rc, self.ended.pop(name, time.time()) - t0

    def stop_all(self) -> None:
        """Stop every running step (each resumes from its last epoch) and keep its time so far."""
        stop_processes([proc for _, proc, _, _ in self.running.values()])
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


def _sigterm(signum, frame):
    raise SystemExit(f"[red_vs_kd] stopped by signal {signum}: running steps stopped; run again to resume")


if __name__ == "__main__":
    raise SystemExit(main())

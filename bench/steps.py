"""Resumable benchmark steps: each a shell-free subprocess run once, its wall time kept in a state file.

A finished step is skipped on a re-run. With a deadline, the step running at that time is stopped (a
``redistill distill`` resumes from its last finished epoch on the next run) and none starts after it; however
the benchmark ends (an error, Ctrl-C, SIGTERM), the step it started does not outlive it.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from redistill.errors import UserError
from redistill.io import atomic_write_json


class StopReached(SystemExit):
    """The deadline passed: the running step was stopped and is left for the next run (exit status 0)."""

    def __init__(self, message: str):
        print(message, flush=True)
        super().__init__(0)


def stop_processes(procs: List[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Terminate every process still running, then kill any that outlives ``grace_s`` (all waited on together)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    end = time.time() + grace_s
    for p in alive:
        try:
            p.wait(timeout=max(end - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def add_stop_option(ap) -> None:
    ap.add_argument("--stop-after-s", type=float, default=0,
                    help="stop the running step after this many seconds (it resumes on the next run) and start none "
                         "after it; 0 (default): no limit")


def deadline(a) -> Optional[float]:
    """The ``time.time()`` that ``--stop-after-s`` sets, or None."""
    if a.stop_after_s < 0:
        raise UserError("--stop-after-s must be at least 0 (0: no limit)")
    return time.time() + a.stop_after_s if a.stop_after_s else None


def run_command(prog: str, argv: List[str]) -> str:
    """The command line a page records: ``argv`` without the options that only steer one invocation."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--stop-after-s":
            skip = True
        elif x != "--pages-only" and not x.startswith("--stop-after-s="):
            out.append(shlex.quote(x))
    return " ".join([prog, *out])


def _sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}; run again to resume")


class Steps:
    """Runs named steps once, recording wall time (summed over the attempts a deadline cut short);
    ``deadline``: a ``time.time()`` after which the running step is stopped and none is started."""

    def __init__(self, state_path: Path, deadline: Optional[float] = None, tag: str = "repro"):
        self.path, self.deadline, self.tag = state_path, deadline, tag
        self.state: Dict[str, dict] = json.loads(state_path.read_text()) if state_path.exists() else {}

    def run(self, name: str, argv: List[str], log: Path) -> None:
        rec = self.state.get(name, {})
        if rec.get("done"):
            print(f"[{self.tag}] {name}: done earlier ({rec['seconds']:.0f} s), skipped", flush=True)
            return
        if self.deadline is not None and time.time() >= self.deadline:
            raise StopReached(f"[{self.tag}] --stop-after-s reached before {name}; run again to continue")
        print(f"[{self.tag}] {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        t0 = time.time()
        log.parent.mkdir(parents=True, exist_ok=True)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _sigterm) if main else None
        try:
            with open(log, "a") as f:
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
                try:
                    rc = proc.wait(timeout=None if self.deadline is None else max(self.deadline - time.time(), 0.0))
                except subprocess.TimeoutExpired:
                    stop_processes([proc])
                    self._keep(name, {"done": False, "seconds": round(rec.get("seconds", 0.0) + time.time() - t0, 1),
                                      "argv": argv, "log": str(log)})
                    raise StopReached(f"[{self.tag}] --stop-after-s reached: {name} stopped; run again to resume it")
                except BaseException:
                    stop_processes([proc])
                    raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        seconds = rec.get("seconds", 0.0) + time.time() - t0
        if rc != 0:
            raise SystemExit(f"[{self.tag}] {name} failed (exit {rc}); see {log}; re-run to resume")
        self._keep(name, {"done": True, "seconds": round(seconds, 1), "argv": argv, "log": str(log)})
        print(f"[{self.tag}] {name}: {seconds:.0f} s", flush=True)

    def _keep(self, name: str, rec: dict) -> None:
        self.state[name] = rec
        atomic_write_json(self.path, self.state)

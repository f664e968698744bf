"""Resumable benchmark steps: each a shell-free subprocess run once, its wall time kept in a state file.

A finished step is skipped on a re-run. With a deadline, the step running at that time is stopped (a
``redistill distill`` resumes from its last finished epoch on the next run) and none starts after it. Each step
runs in its own process group, and however the benchmark ends (the deadline, an error, Ctrl-C, SIGTERM) the whole
group is stopped: nothing a step started (a loopback sshd, an agent) outlives it.

State records: a finished step ``{"done": true, "seconds": wall time over all its attempts, ...}``; a step
stopped or failed before that ``{"done": false, "seconds_before": the time its attempts took so far, ...}``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from redistill.errors import UserError
from redistill.io import atomic_write_json


class StopReached(SystemExit):
    """The deadline passed: the running step was stopped and is left for the next run (exit status 0)."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message


def _signal(p: subprocess.Popen, sig: int) -> None:
    """``sig`` to ``p``'s whole process group when it leads one (started with ``start_new_session``), else to it."""
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
    except ProcessLookupError:
        pass


def stop_processes(procs: List[subprocess.Popen], grace_s: float = 30.0) -> None:
    """SIGTERM every process still running (its group, when it leads one), then SIGKILL whatever outlives
    ``grace_s`` (all waited on together); the SIGKILL is sent even when a second signal cuts the wait short."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal(p, signal.SIGTERM)
    end = time.time() + grace_s
    try:
        for p in alive:
            try:
                p.wait(timeout=max(end - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in alive:
            _signal(p, signal.SIGKILL)  # the group too: a child that outlived its leader
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


def without_steering(argv: Sequence[str], steering: Sequence[str] = ("--stop-after-s",),
                     flags: Sequence[str] = ("--pages-only",)) -> List[str]:
    """``argv`` without the options that only steer one invocation (``steering`` take a value, ``flags`` do not)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in steering:
            skip = True
        elif x not in flags and not x.startswith(tuple(f"{s}=" for s in steering)):
            out.append(x)
    return out


def run_command(prog: str, argv: Sequence[str]) -> str:
    """The command line a page records: ``prog`` and ``argv`` without ``--stop-after-s`` and ``--pages-only``."""
    return " ".join([prog, *map(shlex.quote, without_steering(argv))])


def _sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}; run again to resume")


class Steps:
    """Runs named steps once, recording their wall time; ``deadline``: a ``time.time()`` after which the running
    step is stopped and none is started (``StopReached``)."""

    def __init__(self, state_path: Path, deadline: Optional[float] = None, tag: str = "repro"):
        self.path, self.deadline, self.tag = state_path, deadline, tag
        self.state: Dict[str, dict] = json.loads(state_path.read_text()) if state_path.exists() else {}

    def done(self, name: str) -> bool:
        return bool(self.state.get(name, {}).get("done"))

    def run(self, name: str, argv: List[str], log: Path) -> None:
        rec = self.state.get(name, {})
        if rec.get("done"):
            print(f"[{self.tag}] {name}: done earlier ({rec['seconds']:.0f} s), skipped", flush=True)
            return
        if self.deadline is not None and time.time() >= self.deadline:
            raise StopReached(f"--stop-after-s reached before {name}")
        before = rec.get("seconds_before", rec.get("seconds", 0.0))
        print(f"[{self.tag}] {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        t0 = time.time()
        log.parent.mkdir(parents=True, exist_ok=True)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _sigterm) if main else None
        keep = lambda **r: self._keep(name, {"argv": argv, "log": str(log), **r})  # noqa: E731
        try:
            with open(log, "a") as f:
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    rc = proc.wait(timeout=None if self.deadline is None else max(self.deadline - time.time(), 0.0))
                except subprocess.TimeoutExpired:
                    stop_processes([proc])
                    keep(done=False, seconds_before=round(before + time.time() - t0, 1), stopped="deadline")
                    raise StopReached(f"--stop-after-s reached: {name} stopped") from None
                except BaseException as e:
                    stop_processes([proc])
                    keep(done=False, seconds_before=round(before + time.time() - t0, 1), stopped=type(e).__name__)
                    raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        seconds = before + time.time() - t0
        if rc != 0:
            keep(done=False, seconds_before=round(seconds, 1), failed=rc)
            raise SystemExit(f"[{self.tag}] {name} failed (exit {rc}); see {log}; re-run to resume")
        keep(done=True, seconds=round(seconds, 1))
        print(f"[{self.tag}] {name}: {seconds:.0f} s", flush=True)

    def _keep(self, name: str, rec: dict) -> None:
        self.state[name] = rec
        atomic_write_json(self.path, self.state)


def stopped(tag: str, e: StopReached) -> int:
    """What a benchmark's ``main`` prints and returns when its deadline stopped it."""
    print(f"[{tag}] {e.message}; the steps left run on the next run of the same command", flush=True)
    return 0

"""Resumable benchmark steps: a finished step is skipped, a deadline or a signal stops the running step's whole
process group and keeps its time, and the next run resumes it."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bench.steps import StopReached, Steps, run_command, stop_processes, without_steering

#: a step that writes its pid and its child's (a grandchild of the benchmark) and then sleeps
FAMILY = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
          "open(sys.argv[1], 'w').write(f'{__import__(\"os\").getpid()} {c.pid}'); time.sleep(120)")


def _family(pids_file):
    return [sys.executable, "-c", FAMILY, str(pids_file)]


def _pids(path):
    deadline = time.monotonic() + 60
    while not (path.exists() and len(path.read_text().split()) == 2):
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


def _gone(pid):
    """No such process, or a zombie left for init (its parent, the step, was stopped too)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pids):
    deadline = time.monotonic() + 60
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


def _marker_step(marker):
    return [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('x')"]


def test_a_finished_step_is_skipped(tmp_path):
    marker = tmp_path / "starts"
    Steps(tmp_path / "state.json").run("one", _marker_step(marker), tmp_path / "one.log")
    Steps(tmp_path / "state.json").run("one", _marker_step(marker), tmp_path / "one.log")
    assert marker.read_text() == "x"
    rec = json.loads((tmp_path / "state.json").read_text())["one"]
    assert rec["done"] is True and rec["seconds"] >= 0


def test_deadline_stops_the_whole_step_and_the_next_run_resumes_it(tmp_path):
    pids_file = tmp_path / "pids"
    steps = Steps(tmp_path / "state.json", deadline=time.time() + 1.0)
    with pytest.raises(StopReached) as e:
        steps.run("slow", _family(pids_file), tmp_path / "slow.log")
    assert e.value.code == 0 and "slow stopped" in e.value.message
    assert _wait_gone(_pids(pids_file)) == []  # the step and the process it started
    rec = json.loads((tmp_path / "state.json").read_text())["slow"]
    assert rec["done"] is False and rec["stopped"] == "deadline" and rec["seconds_before"] > 0 and "seconds" not in rec
    before = rec["seconds_before"]
    with pytest.raises(StopReached):  # no step starts once the deadline has passed
        steps.run("later", _marker_step(tmp_path / "later"), tmp_path / "later.log")
    assert not (tmp_path / "later").exists()
    marker = tmp_path / "resumed"
    Steps(tmp_path / "state.json").run("slow", _marker_step(marker), tmp_path / "slow.log")
    rec = json.loads((tmp_path / "state.json").read_text())["slow"]
    assert rec["done"] is True and rec["seconds"] >= before and marker.exists()  # both attempts' time


def test_sigterm_to_the_benchmark_stops_its_step_and_keeps_the_time(tmp_path):
    pids_file = tmp_path / "pids"
    steps = Steps(tmp_path / "state.json")
    handler = signal.getsignal(signal.SIGTERM)

    def term():
        _pids(pids_file)
        os.kill(os.getpid(), signal.SIGTERM)
    t = threading.Thread(target=term, daemon=True)
    t.start()
    with pytest.raises(SystemExit, match="stopped by signal"):
        steps.run("slow", _family(pids_file), tmp_path / "slow.log")
    t.join()
    assert _wait_gone(_pids(pids_file)) == []
    assert signal.getsignal(signal.SIGTERM) == handler  # the benchmark's own handling is given back
    rec = json.loads((tmp_path / "state.json").read_text())["slow"]
    assert rec["done"] is False and rec["stopped"] == "SystemExit"


def test_a_step_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          f"open({str(ready)!r}, 'w').write('1'); time.sleep(120)"], start_new_session=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stop_processes([p], grace_s=0.5)
    assert p.returncode == -signal.SIGKILL


def test_a_failed_step_is_not_done_and_keeps_its_time(tmp_path):
    steps = Steps(tmp_path / "state.json")
    with pytest.raises(SystemExit, match="failed"):
        steps.run("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")
    rec = steps.state["bad"]
    assert rec["done"] is False and rec["failed"] == 3 and "seconds" not in rec


def test_the_recorded_command_leaves_out_the_steering_options():
    argv = ["--parts", "placement", "--stop-after-s", "3600", "--pages-only", "--stop-after-s=5", "a b"]
    assert run_command("python -m bench.x", argv) == "python -m bench.x --parts placement 'a b'"
    assert without_steering(["--plan", "--max-steps", "2", "--jobs", "2"], ("--max-steps",), ("--plan",)) == ["--jobs", "2"]

"""Resumable benchmark steps: a finished step is skipped, a deadline stops the running one and keeps its time."""

import json
import sys
import time

import pytest

from bench.steps import StopReached, Steps, run_command


def _sleeper(marker, seconds):
    """A step that records each start in ``marker`` and then sleeps."""
    return [sys.executable, "-c", f"import time; open({str(marker)!r}, 'a').write('x'); time.sleep({seconds})"]


def test_a_finished_step_is_skipped(tmp_path):
    marker = tmp_path / "starts"
    steps = Steps(tmp_path / "state.json")
    steps.run("one", _sleeper(marker, 0), tmp_path / "one.log")
    Steps(tmp_path / "state.json").run("one", _sleeper(marker, 0), tmp_path / "one.log")
    assert marker.read_text() == "x"
    assert json.loads((tmp_path / "state.json").read_text())["one"]["done"] is True


def test_deadline_stops_the_running_step_and_the_next_run_resumes_it(tmp_path):
    marker = tmp_path / "starts"
    steps = Steps(tmp_path / "state.json", deadline=time.time() + 1.0)
    t0 = time.time()
    with pytest.raises(StopReached) as e:
        steps.run("slow", _sleeper(marker, 60), tmp_path / "slow.log")
    assert e.value.code == 0 and time.time() - t0 < 30
    rec = json.loads((tmp_path / "state.json").read_text())["slow"]
    assert rec["done"] is False and rec["seconds"] >= 0.9
    # no step starts once the deadline has passed
    with pytest.raises(StopReached):
        steps.run("later", _sleeper(tmp_path / "later", 0), tmp_path / "later.log")
    assert not (tmp_path / "later").exists()
    # the next run starts it again and adds the time of both attempts
    Steps(tmp_path / "state.json").run("slow", _sleeper(marker, 0), tmp_path / "slow.log")
    rec = json.loads((tmp_path / "state.json").read_text())["slow"]
    assert rec["done"] is True and rec["seconds"] >= 0.9 and marker.read_text() == "xx"


def test_a_failed_step_is_not_recorded_as_done(tmp_path):
    steps = Steps(tmp_path / "state.json")
    with pytest.raises(SystemExit, match="failed"):
        steps.run("bad", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad.log")
    assert "bad" not in steps.state


def test_the_recorded_command_leaves_out_the_steering_options():
    argv = ["--parts", "placement", "--stop-after-s", "3600", "--pages-only", "--stop-after-s=5", "a b"]
    assert run_command("python -m bench.x", argv) == "python -m bench.x --parts placement 'a b'"

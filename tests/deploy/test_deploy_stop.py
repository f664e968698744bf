"""An interrupted, timed-out or killed deploy stops the agent and its processes on the device, and a second agent on
the same device refuses to measure while one is measuring; over a real OpenSSH server on 127.0.0.1."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.agent import lock as agent_lock
from deploy.agent.common import AgentError
from tests.deploy.test_deploy_loopback import FAST, VENV_PYTHON, assert_one_line_error, reports_in, run_deploy

#: a latency run of hours: the agent is surely still measuring when the test stops it
LONG = ["--iters", "100000000"]
MEASURING = "agent: latency: 2 warm-up + 100000000 timed iterations"


class Deploy:
    """``redistill deploy`` in its own session (as a terminal job), its stderr collected as it comes."""

    def __init__(self, bundle, host, config, tmp, *extra):
        argv = [sys.executable, "-m", "redistill.cli", "deploy", str(bundle), "--host", host, "--ssh-config",
                str(config), "--python", VENV_PYTHON, "--reports", str(tmp / "reports"), "--remote-dir",
                str(tmp / "device"), "--connect-timeout", "5", *FAST, *extra]
        self.remote_base = tmp / "device"
        # faulthandler: a deploy that hangs is made to print every thread's stack (``finish``). SIGINT back to its
        # default, as in a terminal's foreground job: a test suite started in the background (``cmd &`` in a script)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt at all
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
                                     start_new_session=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self.reader.start()

    @property
    def stderr(self):
        return "".join(self.lines)

    def wait_for(self, needle, timeout=90):
        deadline = time.monotonic() + timeout
        while needle not in self.stderr:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr
            time.sleep(0.1)

    def finish(self, timeout=60):
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # show where it hangs: faulthandler prints each thread's stack on SIGABRT
            os.kill(self.proc.pid, signal.SIGABRT)
            self.proc.wait(timeout=10)
            self.reader.join(timeout=10)
            pytest.fail(f"the deploy did not exit within {timeout} s; its stderr and stacks:\n{self.stderr}")
        self.reader.join(timeout=10)
        return self.proc.returncode

    def cleanup(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def agent_pids(remote_base):
    """Live processes whose working folder is under ``remote_base``: the agent and its measurement processes."""
    base = str(Path(remote_base).resolve())
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cwd = os.readlink(d / "cwd")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == base or cwd.startswith(base + "/")):
            found.append(int(d.name))
    return found


def wait_gone(remote_base, timeout):
    deadline = time.monotonic() + timeout
    while agent_pids(remote_base) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = agent_pids(remote_base)
    for pid in left:  # leave nothing behind for the next test, then fail
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.fixture
def deploys():
    """Start deploys; whatever a failing test left running (the deploy, agents on the "device") is killed after it."""
    started = []
    yield lambda *a: started.append(Deploy(*a)) or started[-1]
    for d in started:
        d.cleanup()
        wait_gone(d.remote_base, 0)


def test_ctrl_c_stops_the_agent_and_a_second_agent_is_refused_meanwhile(fleet, bundles, tmp_path, deploys):
    first = deploys(bundles["fp32"], "loop0", fleet.config, tmp_path, *LONG)
    first.wait_for(MEASURING)
    assert agent_pids(tmp_path / "device"), "the agent should be measuring"
    second = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path)
    assert_one_line_error(second, "another agent is measuring on this device", "bundle tiny-fp32", "pid ")
    os.killpg(first.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground job
    assert first.finish() == 130, first.stderr
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("redistill deploy: interrupted") and "the agent on loop0 was stopped on the device" in last, first.stderr
    assert "--resume" not in first.stderr
    assert wait_gone(tmp_path / "device", 2) == []
    assert reports_in(tmp_path) == []
    again = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path)  # nothing stale is left: the lock is free
    assert again.returncode == 0, again.stderr


def test_ctrl_c_stops_every_agent_of_a_fleet(fleet, bundles, tmp_path, deploys):
    d = deploys(bundles["fp32"], "loop0,loop1", fleet.config, tmp_path, *LONG)
    d.wait_for(f"[loop0] {MEASURING}")
    d.wait_for(f"[loop1] {MEASURING}")
    os.killpg(d.proc.pid, signal.SIGINT)
    assert d.finish() == 130, d.stderr
    last = d.stderr.strip().splitlines()[-1]
    assert "the agent on loop0 was stopped on the device; the agent on loop1 was stopped on the device" in last, last
    assert wait_gone(tmp_path / "device", 2) == []


def test_run_timeout_stops_the_agent(fleet, bundles, tmp_path):
    try:
        p = run_deploy(bundles["fp32"], "loop1", fleet.config, tmp_path, *LONG, "--run-timeout", "5")
        assert_one_line_error(p, "did not finish within 5 s and was stopped on the device", "--run-timeout")
    finally:
        left = wait_gone(tmp_path / "device", 2)
    assert left == []


def test_a_killed_deploy_leaves_no_agent_running(fleet, bundles, tmp_path, deploys):
    d = deploys(bundles["fp32"], "loop1", fleet.config, tmp_path, *LONG)
    d.wait_for(MEASURING)
    os.kill(d.proc.pid, signal.SIGKILL)  # no handler runs: the closed connection alone must stop the agent
    assert wait_gone(tmp_path / "device", 15) == []


# --- the stop script and the device lock, on this machine -------------------------------------------------------

AGENT_LIKE = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "time.sleep(60)")


def test_stop_script_ends_the_whole_group_and_leaves_other_processes_alone(tmp_path):
    from deploy.remote_run import stop_script

    token = "20260101T000000Z-0123abcd"
    (tmp_path / "runs").mkdir()
    # as the deploy runs it: the shell writes its pid, then execs a group leader that has a child; started apart
    # from this process (setsid -f), so that what is killed is reaped as on a device and not left a zombie here
    subprocess.run(["setsid", "-f", "sh", "-c", f'echo $$ > runs/{token}.pid && exec "$0" -c "$1" {token}',
                    sys.executable, AGENT_LIKE], cwd=tmp_path, check=True)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(agent_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(agent_pids(tmp_path)) == 2
        run = lambda: subprocess.run(["sh", "-c", stop_script(str(tmp_path), token)], stdout=subprocess.PIPE,
                                     text=True, timeout=30).stdout.strip()
        assert run() == "stop=stopped"
        assert wait_gone(tmp_path, 2) == []  # the child went with its group
        assert run() == "stop=not-started"   # the pid file went too
        (tmp_path / "runs" / f"{token}.pid").write_text(f"{other.pid}\n")  # a pid now used by something else
        assert run() == "stop=finished" and other.poll() is None
    finally:
        wait_gone(tmp_path, 0)
        other.kill()
        other.wait()


# --- the device lock itself -------------------------------------------------------------------------------------

HOLD = ("import sys, time; sys.path.insert(0, %r); from deploy.agent import lock; "
        "h = lock.DeviceLock(sys.argv[1], 'abc123', 'held-bundle'); h.acquire(); print('held', flush=True); "
        "time.sleep(60)")


def test_lock_names_its_holder_and_a_dead_holder_never_blocks(tmp_path):
    path = str(tmp_path / "agent.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD % str(Path(__file__).resolve().parents[2]), path],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AgentError, match=r"another agent is measuring on this device \(pid %d, bundle held-bundle "
                                             r"abc123" % holder.pid) as e:
            agent_lock.DeviceLock(path, "def", "mine").acquire()
        assert e.value.kind == "busy" and "kill -TERM -%d" % holder.pid in str(e.value)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file still names the dead pid
        holder.wait()
    lk = agent_lock.DeviceLock(path, "def", "mine")
    lk.acquire()
    try:
        assert '"pid": %d' % os.getpid() in Path(path).read_text()
    finally:
        lk.release()

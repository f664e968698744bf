"""One agent run on a device over ssh, and stopping it so that nothing outlives an interrupted or timed-out deploy.

The run's shell writes its pid to ``runs/<token>.pid`` in the remote folder and execs the agent with
``--stop-on-eof``: the agent leads a process group of its own and stops that whole group when its stdin closes,
which happens when this ssh connection goes, however the deploy ended (Ctrl-C, a timeout, ``kill -9``). ``stop``
adds a second ssh that stops the group and waits until it is gone, so a retry never runs beside an orphan.
"""

from __future__ import annotations

import shlex
import subprocess
import threading
from typing import Callable, List, Optional, Sequence, Tuple

from deploy.agent.contract import REPORT_BEGIN, REPORT_END
from deploy.ssh import Host, SshOptions


def sh_c(script: str) -> str:
    """The remote command: our script run by sh whatever the login shell is."""
    return "sh -c " + shlex.quote(script)


def stop_script(remote: str, token: str) -> str:
    """Stop run ``token``'s process group (TERM, then KILL after 10 s) and print ``stop=<outcome>``: ``stopped``,
    ``finished`` (nothing of it left), ``not-started`` (no pid file) or ``failed``.

    The group is the agent's pid: it is only signalled while the agent with that pid still carries the token on its
    command line, or, once the agent itself is gone, while its group lives on (the kernel never reuses a pid that
    still names a process group, so that group can only be the agent's).
    """
    q = shlex.quote
    pid_file = q(f"runs/{token}.pid")
    return "\n".join([
        f"cd {q(remote)} 2>/dev/null || {{ echo stop=not-started; exit 0; }}",
        f"pid=$(cat {pid_file} 2>/dev/null)",
        'case "$pid" in ""|*[!0-9]*) echo stop=not-started; exit 0;; esac',
        f'if test -r /proc/$pid/cmdline && ! tr "\\000" " " </proc/$pid/cmdline | grep -q -e {q(token)}; then '
        f"rm -f {pid_file}; echo stop=finished; exit 0; fi",
        'if kill -0 -"$pid" 2>/dev/null; then g=-$pid; else g=$pid; fi',
        f'kill -0 "$g" 2>/dev/null || {{ rm -f {pid_file}; echo stop=finished; exit 0; }}',
        'kill -TERM "$g" 2>/dev/null',
        'i=0; while kill -0 "$g" 2>/dev/null && test $i -lt 50; do sleep 0.2 2>/dev/null || sleep 1; i=$((i+1)); done',
        'if kill -0 "$g" 2>/dev/null; then kill -KILL "$g" 2>/dev/null; sleep 1; fi',
        # SIGKILL cannot be caught: what still answers is a zombie its parent has not reaped yet, unless the agent
        # itself is stuck in the kernel (a driver call), which is reported
        'state=$(sed "s/.*) //" /proc/$pid/stat 2>/dev/null | cut -d" " -f1)',
        'if test -n "$state" && test "$state" != Z && kill -0 "$pid" 2>/dev/null; then echo stop=failed; exit 0; fi',
        f"rm -f {pid_file}; echo stop=stopped",
    ])


class RemoteRun:
    """``python3 agent ...`` in ``remote`` on ``host``: its report lines collected, everything else passed to ``say``."""

    def __init__(self, ssh: SshOptions, host: Host, remote: str, python: str, agent_args: Sequence[str], token: str,
                 env: str, say: Callable[[str], None]):
        self.ssh, self.host, self.remote, self.token, self.say = ssh, host, remote, token, say
        self.pid_file = f"runs/{token}.pid"
        self.json_out = f"reports/{token}.json"
        q = shlex.quote
        argv = [python, "agent", "--bundle", "bundle", "--json-out", self.json_out, "--stop-on-eof",
                "--pid-file", self.pid_file, *agent_args]
        self.script = (f"cd {q(remote)} && mkdir -p runs && echo $$ > {q(self.pid_file)} && {env}exec "
                       + " ".join(q(a) for a in argv))
        self.proc: Optional[subprocess.Popen] = None
        self.report_lines: List[str] = []
        self.err_lines: List[str] = []
        self.report_complete = False
        self._threads: List[threading.Thread] = []

    @property
    def device_report(self) -> str:
        """Where the agent keeps its copy of the report on the device (relative paths are under the remote home)."""
        return f"{self.remote}/{self.json_out}"

    @property
    def stop_hint(self) -> str:
        return f"on the device run `kill -TERM -$(cat {self.remote}/{self.pid_file})`"

    def start(self) -> None:
        # stdin stays open and unused: its end (this process gone, or the pipe closed) tells the agent to stop
        self.proc = subprocess.Popen(self.ssh.ssh(self.host, sh_c(self.script)), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.PIPE, text=True, bufsize=1)
        self._threads = [threading.Thread(target=self._pump_err, daemon=True),
                         threading.Thread(target=self._pump_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.err_lines.append(line)
            self.say(line.rstrip("\n"))

    def _pump_out(self) -> None:
        inside = False
        for line in self.proc.stdout:
            if line.strip() == REPORT_BEGIN:
                inside = True
            elif line.strip() == REPORT_END:
                inside = False
                self.report_complete = True
            elif inside:
                self.report_lines.append(line)
            else:
                self.say(line.rstrip("\n"))

    def wait(self, timeout: float) -> int:
        """The ssh exit status (the agent's, or 255); raises ``subprocess.TimeoutExpired`` with the run still going."""
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        self.proc.stdin.close()
        return rc

    def kill_local(self) -> None:
        """End this side: the ssh client goes, the connection closes, and the agent sees its stdin close."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: int) -> Tuple[bool, str]:
        """Stop the run on the device: ``(True, outcome)`` once no process of it is left, else ``(False, why)``."""
        self.kill_local()
        try:
            p = subprocess.run(self.ssh.ssh(self.host, sh_c(stop_script(self.remote, self.token))),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return False, f"the stop over ssh did not finish within {timeout} s"
        outcome = next((ln[5:] for ln in p.stdout.splitlines() if ln.startswith("stop=")), None)
        if outcome in ("stopped", "finished", "not-started"):
            return True, outcome
        if outcome == "failed":
            return False, "its processes survived SIGKILL"
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        return False, f"ssh exit {p.returncode}: {lines[-1] if lines else 'no output'}"

"""Deploy a bundle to one or more devices over ssh, run the bench agent there, and save its report.

Per device: one ssh preflight (interpreter, numpy, rsync, free disk, remote dir), one copy of the
agent folder and the bundle into ``<remote-dir>/<bundle id>/`` (rsync copies nothing the second time),
one ssh run of the agent folder (``python3 agent ...``) whose progress is streamed, and the report
written atomically to ``reports/<host>/<bundle>/<timestamp>.json``. Every failure is one ``UserError``
line with the fix. Markers, exit codes and the agent's hash come from the agent's own modules.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from deploy.agent import fingerprint
from deploy.agent.contract import ERROR_PREFIX, EXIT_REFUSED, REPORT_BEGIN, REPORT_END
from deploy.ssh import Host, SshOptions, classify, require_client
from export.bundle import bundle_id, verify_bundle
from redistill.errors import UserError
from redistill.io import atomic_write_json

AGENT_DIR = Path(fingerprint.AGENT_DIR)
_SAFE_DIR = re.compile(r"^[A-Za-z0-9._/][A-Za-z0-9._/-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_print_lock = threading.Lock()


@dataclass
class DeployOptions:
    python: str = "python3"
    remote_dir: str = ".cache/redistill/deploy"
    reports: str = "reports"
    copy: str = "auto"              # auto | rsync | scp
    recopy: bool = False            # compare file contents (rsync --checksum) instead of size+mtime
    connect_timeout: int = 10
    copy_timeout: int = 600
    run_timeout: int = 1800
    agent_args: List[str] = field(default_factory=list)
    ssh: SshOptions = field(default_factory=SshOptions)
    quiet: bool = False


@dataclass
class DeployResult:
    host: Host
    report_path: Optional[Path] = None
    report: Optional[dict] = None
    error: Optional[str] = None
    copied: Optional[List[str]] = None


def say(host: Host, line: str, quiet: bool = False) -> None:
    if not quiet:
        with _print_lock:
            print(f"[{host.spec}] {line}", file=sys.stderr, flush=True)


def validate_remote_dir(path: str) -> str:
    path = path.rstrip("/") or "."
    if not _SAFE_DIR.match(path) or ".." in path.split("/"):
        raise UserError(f"bad --remote-dir {path!r}: use letters, digits, '.', '_', '-' and '/' only, no '..' "
                        "(relative paths are under the remote home)")
    return path


def validate_python(py: str) -> str:
    if not py or py.startswith("-") or not re.match(r"^[A-Za-z0-9._/+-]+$", py):
        raise UserError(f"bad JETSON_PYTHON {py!r}: give an interpreter name or absolute path, e.g. python3 or /usr/bin/python3")
    return py


def agent_files() -> Dict[str, Path]:
    """The agent folder's files (relative path -> file), as copied to the device and hashed."""
    files = {rel: AGENT_DIR / rel for rel in fingerprint.agent_files(str(AGENT_DIR))}
    if "__main__.py" not in files:
        raise UserError(f"the agent is missing from {AGENT_DIR}: reinstall redistill-edge")
    return files


def agent_sha256() -> str:
    """The agent folder's sha256, computed by the agent's own function (the report carries the device's)."""
    agent_files()
    return fingerprint.agent_sha256(str(AGENT_DIR))


def sh_c(script: str) -> str:
    """The remote command: our script run by sh whatever the login shell is."""
    return "sh -c " + shlex.quote(script)


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _run(argv: Sequence[str], timeout: int, host: Host, what: str, hint: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"{host.spec}: {what} did not finish within {timeout} s; {hint}") from None


def _fail(host: Host, proc_stderr: str, what: str, fallback: str) -> UserError:
    msg = classify(proc_stderr, host, what)
    return UserError(f"{host.spec}: {msg or fallback}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


class Deployer:
    """Deploys one verified bundle; ``run(hosts)`` handles a fleet in parallel."""

    def __init__(self, bundle: str, opts: DeployOptions):
        self.bundle = Path(bundle)
        self.manifest = verify_bundle(self.bundle)
        self.bundle_id = bundle_id(self.bundle)
        if not _HEX64.match(self.bundle_id):
            raise UserError(f"bundle id of {bundle} is not a sha256; re-export the bundle")
        self.opts = opts
        self.opts.remote_dir = validate_remote_dir(opts.remote_dir)
        self.opts.python = validate_python(opts.python)
        self.bundle_bytes = sum(int(e.get("bytes", 0)) for e in self.manifest["files"].values())
        self.agent_sha = agent_sha256()
        self.remote = f"{self.opts.remote_dir}/{self.bundle_id}"
        require_client("ssh")

    # -- steps ------------------------------------------------------------------------------
    def preflight(self, host: Host) -> Dict[str, str]:
        q = shlex.quote
        py = q(self.opts.python)
        code = ('import sys; print("python=%d.%d.%d" % sys.version_info[:3]); '
                'import numpy; print("numpy=" + numpy.__version__)')
        script = (f"mkdir -p {q(self.remote)} || exit 41; cd {q(self.remote)} || exit 41; "
                  'echo "rsync=$(command -v rsync 2>/dev/null)"; echo "machine=$(uname -m)"; '
                  'echo "df=$(df -Pk . 2>/dev/null | tail -n 1)"; '
                  'if test -f bundle/manifest.json; then echo present=yes; fi; '
                  f"if command -v {py} >/dev/null 2>&1; then {py} -c {q(code)} 2>&1; else echo python=missing; fi")
        p = _run(self.opts.ssh.ssh(host, sh_c(script)), self.opts.connect_timeout + 60, host, "the ssh preflight",
                 "check the network or raise --connect-timeout")
        if p.returncode == 255:
            raise _fail(host, p.stderr, "connecting", f"ssh failed: {_last_line(p.stderr)}")
        if p.returncode == 41:
            raise _fail(host, p.stderr, "creating the remote dir",
                        f"cannot create {self.remote} on the device ({_last_line(p.stderr)}); pass a writable --remote-dir")
        if p.returncode != 0:
            raise UserError(f"{host.spec}: the ssh preflight failed (exit {p.returncode}: {_last_line(p.stderr + p.stdout)}); "
                            f"check that the remote login shell is POSIX (sh) and try `ssh {host.destination} true`")
        facts = dict(ln.split("=", 1) for ln in p.stdout.splitlines() if "=" in ln and re.match(r"^[a-z]+=", ln))
        if facts.get("python") == "missing":
            raise UserError(f"{host.spec}: no Python interpreter {self.opts.python!r} on the device: install it "
                            "(JetPack: sudo apt install python3 python3-numpy) or set JETSON_PYTHON=/path/to/python3")
        if not re.match(r"^\d+\.\d+", facts.get("python", "")):
            raise UserError(f"{host.spec}: {self.opts.python!r} on the device did not run ({_last_line(p.stdout)}); "
                            "set JETSON_PYTHON to a working python3")
        major, minor = (int(v) for v in facts["python"].split(".")[:2])
        if (major, minor) < (3, 6):
            raise UserError(f"{host.spec}: {self.opts.python} is Python {facts['python']}; the agent needs 3.6 or newer: "
                            "set JETSON_PYTHON=python3")
        if "numpy" not in facts:
            raise UserError(f"{host.spec}: numpy is not importable by {self.opts.python} on the device: "
                            "sudo apt install python3-numpy (JetPack) or pip3 install numpy")
        df = facts.get("df", "").split()
        if not facts.get("present") and len(df) >= 4 and df[3].isdigit():
            need = self.bundle_bytes + (64 << 20)
            if int(df[3]) * 1024 < need:
                raise UserError(f"{host.spec}: the device disk is full ({int(df[3]) // 1024} MiB free at {self.remote}, "
                                f"{need >> 20} MiB needed): free space there (`df -h`) or pass --remote-dir on a larger disk")
        return facts

    def copy(self, host: Host, facts: Dict[str, str]) -> List[str]:
        method = self.opts.copy
        if method == "auto":
            method = "rsync" if shutil.which("rsync") and facts.get("rsync") else "scp"
        require_client(method)
        with tempfile.TemporaryDirectory(prefix="redistill-deploy-") as tmp:
            staging = Path(tmp)
            for rel, path in agent_files().items():
                link = staging / "agent" / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path, link)
            os.symlink(self.bundle.resolve(), staging / "bundle")
            sources = [str(staging / "agent"), str(staging / "bundle")]
            if method == "rsync":
                # --delete: a file an older agent had must not stay in the folder the device runs and hashes
                argv = self.opts.ssh.rsync(host, sources, self.remote, checksum=self.opts.recopy, delete=True)
            else:
                argv = self.opts.ssh.scp(host, sources, self.remote)
            t0 = time.monotonic()
            p = _run(argv, self.opts.copy_timeout, host, f"copying with {method}", "raise --copy-timeout")
        if p.returncode != 0:
            fallback = f"{method} failed (exit {p.returncode}): {_last_line(p.stderr)}"
            if method == "rsync" and ("command not found" in p.stderr or p.returncode == 127):
                fallback = "rsync is not installed on the device: sudo apt install rsync there, or pass --copy scp"
            raise _fail(host, p.stderr, "copying the bundle", fallback)
        copied = ([ln for ln in p.stdout.splitlines() if ln and not ln.endswith("/") and not ln.startswith("deleting ")]
                  if method == "rsync" else ["(scp: all files)"])
        say(host, f"copy ({method}): {len(copied)} file(s) in {time.monotonic() - t0:.1f} s"
                  + ("" if copied else ", already on the device"), self.opts.quiet)
        return copied

    def run_agent(self, host: Host, facts: Dict[str, str], stamp: str) -> dict:
        q = shlex.quote
        argv = [self.opts.python, "agent", "--bundle", "bundle", "--json-out", f"reports/{stamp}-{uuid.uuid4().hex[:8]}.json",
                *self.opts.agent_args]
        env = "OPENBLAS_CORETYPE=ARMV8 " if facts.get("machine") == "aarch64" else ""
        script = f"cd {q(self.remote)} && {env}exec " + " ".join(q(a) for a in argv)
        cmd = self.opts.ssh.ssh(host, sh_c(script))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                bufsize=1)
        out_lines: List[str] = []
        err_lines: List[str] = []

        def pump_err():
            for line in proc.stderr:
                err_lines.append(line)
                say(host, line.rstrip("\n"), self.opts.quiet)

        def pump_out():
            inside = False
            for line in proc.stdout:
                if line.strip() == REPORT_BEGIN:
                    inside = True
                elif line.strip() == REPORT_END:
                    inside = False
                elif inside:
                    out_lines.append(line)
                else:
                    say(host, line.rstrip("\n"), self.opts.quiet)

        threads = [threading.Thread(target=pump_err, daemon=True), threading.Thread(target=pump_out, daemon=True)]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout=self.opts.run_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise UserError(f"{host.spec}: the agent did not finish within {self.opts.run_timeout} s (a first TensorRT "
                            "build on a TX2 takes minutes); raise --run-timeout") from None
        for t in threads:
            t.join(timeout=10)
        stderr = "".join(err_lines)
        if rc == 255:
            raise _fail(host, stderr, "running the agent", f"ssh failed while running the agent: {_last_line(stderr)}")
        if rc == 127:
            raise UserError(f"{host.spec}: the device could not start {self.opts.python!r}: set JETSON_PYTHON to a python3 there")
        refusal = [ln for ln in err_lines if ln.startswith(ERROR_PREFIX)]
        if rc == EXIT_REFUSED and refusal:
            msg = refusal[-1][len(ERROR_PREFIX):].strip()
            msg = msg.split(": ", 1)[1] if ": " in msg else msg
            raise UserError(f"{host.spec}: {msg}")
        if rc != 0:
            disk = classify(stderr, host, "running the agent") if "No space left" in stderr else None
            if disk:
                raise UserError(f"{host.spec}: {disk}")
            exc = next((ln.strip() for ln in reversed(err_lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln.strip())),
                       _last_line(stderr))
            raise UserError(f"{host.spec}: the agent crashed (exit {rc}): {exc} -- the remote traceback is printed above; "
                            "fix its cause, or try --backend onnxruntime")
        try:
            return json.loads("".join(out_lines))
        except ValueError:
            raise UserError(f"{host.spec}: the agent exited 0 but sent no readable report; check the remote log above "
                            f"and the copy under {self.remote}/reports/ on the device") from None

    # -- one host / many hosts ---------------------------------------------------------------------
    def deploy_one(self, host: Host) -> DeployResult:
        t0 = time.monotonic()
        say(host, f"preflight ({self.opts.python}, {self.remote})", self.opts.quiet)
        facts = self.preflight(host)
        say(host, f"python {facts.get('python')}, numpy {facts.get('numpy')}, {facts.get('machine')}", self.opts.quiet)
        copied = self.copy(host, facts)
        stamp = timestamp()
        report = self.run_agent(host, facts, stamp)
        report["deploy"] = {
            "host": host.spec, "destination": host.destination, "port": host.port,
            "bundle_path": str(self.bundle), "bundle_id": self.bundle_id, "remote_dir": self.remote,
            "remote_python": self.opts.python, "remote_python_version": facts.get("python"),
            "agent_sha256": self.agent_sha, "files_copied": copied, "agent_args": self.opts.agent_args,
            "seconds": round(time.monotonic() - t0, 3), "server_time": stamp,
        }
        out_dir = Path(self.opts.reports) / host.label / self.bundle.resolve().name
        path = out_dir / f"{stamp}.json"
        n = 1
        while path.exists():
            n += 1
            path = out_dir / f"{stamp}-{n}.json"
        atomic_write_json(path, report)
        check = report.get("output_check") or {}
        lat = report.get("latency") or {}
        act = ((report.get("memory") or {}).get("activation") or {}).get("bytes")
        say(host, f"report {path}: output check {'pass' if check.get('passed') else 'FAIL'}, "
                  f"latency p50 {lat.get('p50_ms', float('nan')):.3f} ms, activation memory {act} bytes", self.opts.quiet)
        return DeployResult(host, path, report, copied=copied)

    def _safe(self, host: Host) -> DeployResult:
        try:
            return self.deploy_one(host)
        except UserError as e:
            return DeployResult(host, error=str(e))

    def run(self, hosts: Sequence[Host]) -> List[DeployResult]:
        if len(hosts) == 1:
            return [self._safe(hosts[0])]
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            return list(pool.map(self._safe, hosts))

"""Deploy a bundle to one or more devices over ssh, run the bench agent there, and save its report.

Per device: one ssh preflight (interpreter and version, numpy, the backend's modules, rsync, free disk,
remote dir), one copy of the agent folder and of the files the bundle's manifest lists into
``<remote-dir>/<bundle id>/`` (rsync copies nothing the second time), one ssh run of the agent folder
(``python3 agent ...``) whose progress is streamed and which is stopped on the device when the deploy is
interrupted or times out, and the report written atomically to ``reports/<host>/<bundle>/<timestamp>.json``.
Every failure is one ``UserError`` line with the fix. Markers, exit codes and the agent's hash come from the
agent's own modules.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
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
from deploy.agent.contract import ERROR_PREFIX, EXIT_REFUSED
from deploy.preflight import PreflightFacts, parse_preflight, preflight_problem, preflight_script
from deploy.remote_run import RemoteRun, sh_c
from deploy.ssh import Host, SshOptions, classify, require_client
from export.bundle import MANIFEST, bundle_id, check_export_record, verify_bundle
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


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def check_reports_dir(path: str) -> None:
    """Refuse an unwritable ``--reports`` before the long work, without creating anything."""
    parent = Path(path).absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot save reports under {path}: {parent} is not a folder; pass another --reports")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot save reports under {path}: {parent} is not writable; pass another --reports")


def _option(argv: Sequence[str], flag: str, default: str) -> str:
    """The value of the last ``flag`` in ``argv`` (as argparse reads it), else ``default``."""
    found = [i for i, a in enumerate(argv[:-1]) if a == flag]
    return argv[found[-1] + 1] if found else default


def _fail(host: Host, proc_stderr: str, what: str, fallback: str) -> UserError:
    msg = classify(proc_stderr, host, what)
    return UserError(f"{host.spec}: {msg or fallback}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def per_image_line(section: dict) -> str:
    """The report's per-image figures in one line (each with its resolution), or why there are none."""
    figures = section.get("figures") or []
    if not figures:
        return f"memory per image: not measured ({section.get('skipped') or 'an agent from before per-image figures'})"
    return "memory per image: " + ", ".join(
        f"{f.get('label')} {f.get('bytes')} B (resolution {f.get('resolution_bytes')} B)" for f in figures)


class Deployer:
    """Deploys one verified bundle; ``run(hosts)`` handles a fleet in parallel."""

    def __init__(self, bundle: str, opts: DeployOptions):
        self.bundle = Path(bundle)
        self.manifest = verify_bundle(self.bundle)
        self.bundle_id = bundle_id(self.bundle)
        if not _HEX64.match(self.bundle_id):
            raise UserError(f"bundle id of {bundle} is not a sha256; re-export the bundle")
        self.exported_id = check_export_record(self.bundle)
        if self.exported_id is None and not opts.quiet:
            print(f"redistill deploy: warning: {bundle} has no export record ({self.bundle.name}.id.json beside it), "
                  "so an edit of its manifest after export cannot be detected; re-export it to get one",
                  file=sys.stderr)
        self.opts = opts
        self.opts.remote_dir = validate_remote_dir(opts.remote_dir)
        self.opts.python = validate_python(opts.python)
        check_reports_dir(self.opts.reports)
        self.backend = _option(self.opts.agent_args, "--backend", "auto")
        self.bundle_bytes = sum(int(e.get("bytes", 0)) for e in self.manifest["files"].values())
        self.agent_sha = agent_sha256()
        self.remote = f"{self.opts.remote_dir}/{self.bundle_id}"
        self._lock = threading.Lock()
        self._procs: set = set()                   # preflight and copy processes under way
        self._runs: Dict[str, RemoteRun] = {}      # agent runs under way, by host
        self._interrupted = threading.Event()
        require_client("ssh")

    # -- processes this deploy started ----------------------------------------------------------
    def _run(self, argv: Sequence[str], timeout: int, host: Host, what: str, hint: str) -> subprocess.CompletedProcess:
        with self._lock:  # started and registered under the lock, so interrupt() sees every process or none starts
            if self._interrupted.is_set():
                raise UserError(f"{host.spec}: interrupted")
            proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    stdin=subprocess.DEVNULL)
            self._procs.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise UserError(f"{host.spec}: {what} did not finish within {timeout} s; {hint}") from None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            with self._lock:
                self._procs.discard(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def _stop_run(self, run: RemoteRun) -> str:
        """Stop ``run`` on its device; what became of it, to follow "the agent": "was stopped ..." or how to by hand."""
        ok, why = run.stop(self.opts.connect_timeout + 30)
        if ok:
            return "was stopped on the device" + ("" if why == "stopped" else f" ({why.replace('-', ' ')})")
        return f"could not be stopped on the device ({why}): {run.stop_hint}"

    def interrupt(self) -> str:
        """Stop every run under way (on Ctrl-C); one line saying what became of each."""
        with self._lock:
            self._interrupted.set()
            procs, runs = list(self._procs), dict(self._runs)
            self._runs.clear()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        outcomes: Dict[str, str] = {}

        def stop(spec: str, run: RemoteRun) -> None:
            outcomes[spec] = self._stop_run(run)
        threads = [threading.Thread(target=stop, args=item) for item in runs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if not outcomes:
            return "interrupted before any agent started; nothing was saved: run the same command again"
        said = "; ".join(f"the agent on {spec} {what}" for spec, what in sorted(outcomes.items()))
        return f"interrupted; {said}; no report saved: run the same command again"

    # -- steps ------------------------------------------------------------------------------
    def preflight(self, host: Host) -> PreflightFacts:
        p = self._run(self.opts.ssh.ssh(host, sh_c(preflight_script(self.remote, self.opts.python))),
                      self.opts.connect_timeout + 60, host, "the ssh preflight",
                      "check the network or raise --connect-timeout")
        if p.returncode == 255:
            raise _fail(host, p.stderr, "connecting", f"ssh failed: {_last_line(p.stderr)}")
        if p.returncode == 41:
            raise _fail(host, p.stderr, "creating the remote dir",
                        f"cannot create {self.remote} on the device ({_last_line(p.stderr)}); pass a writable --remote-dir")
        facts = parse_preflight(p.stdout)
        if p.returncode != 0 or not facts.done:
            raise UserError(f"{host.spec}: the ssh preflight failed (exit {p.returncode}: {_last_line(p.stderr + p.stdout)}); "
                            f"check that the remote login shell is POSIX (sh) and try `ssh {host.destination} true`")
        problem = preflight_problem(facts, self.opts.python, self.backend, self.opts.copy, self.remote,
                                    self.bundle_bytes)
        if problem:
            raise UserError(f"{host.spec}: {problem}")
        return facts

    def copy(self, host: Host, facts: PreflightFacts) -> List[str]:
        method = self.opts.copy
        if method == "auto":
            method = "rsync" if shutil.which("rsync") and facts.rsync else "scp"
        require_client(method)
        with tempfile.TemporaryDirectory(prefix="redistill-deploy-") as tmp:
            staging = Path(tmp)
            # only what is sent: the agent's files, and the bundle's manifest and the files it lists (each checked to
            # be a regular file inside the bundle), so nothing else in the bundle folder ever leaves this machine
            bundle_root = self.bundle.resolve()
            links = {**{f"agent/{rel}": path for rel, path in agent_files().items()},
                     f"bundle/{MANIFEST}": bundle_root / MANIFEST,
                     **{f"bundle/{rel}": bundle_root / rel for rel in self.manifest["files"]}}
            for rel, path in links.items():
                link = staging / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(path, link)
            sources = [str(staging / "agent"), str(staging / "bundle")]
            if method == "rsync":
                # --delete: a file an older agent had must not stay in the folder the device runs and hashes
                argv = self.opts.ssh.rsync(host, sources, self.remote, checksum=self.opts.recopy, delete=True)
            else:
                argv = self.opts.ssh.scp(host, sources, self.remote)
            t0 = time.monotonic()
            p = self._run(argv, self.opts.copy_timeout, host, f"copying with {method}", "raise --copy-timeout")
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

    def run_agent(self, host: Host, facts: PreflightFacts, stamp: str) -> dict:
        env = "OPENBLAS_CORETYPE=ARMV8 " if facts.machine == "aarch64" else ""
        run = RemoteRun(self.opts.ssh, host, self.remote, self.opts.python, self.opts.agent_args,
                        f"{stamp}-{uuid.uuid4().hex[:8]}", env, lambda line: say(host, line, self.opts.quiet))
        with self._lock:
            if self._interrupted.is_set():
                raise UserError(f"{host.spec}: interrupted")
            run.start()
            self._runs[host.spec] = run
        try:
            rc = run.wait(self.opts.run_timeout)
        except subprocess.TimeoutExpired:
            with self._lock:
                self._runs.pop(host.spec, None)
            raise UserError(f"{host.spec}: the agent did not finish within {self.opts.run_timeout} s and "
                            f"{self._stop_run(run)}; raise --run-timeout (a first TensorRT build on a TX2 takes "
                            "minutes)") from None
        # a KeyboardInterrupt leaves the run registered, so that interrupt() stops it on the device
        with self._lock:
            self._runs.pop(host.spec, None)
        return self._read_report(host, run, rc)

    def _read_report(self, host: Host, run: RemoteRun, rc: int) -> dict:
        err_lines = run.err_lines
        stderr = "".join(err_lines)
        kept = f"the device keeps its copy of the report at {host.destination}:{run.device_report}"
        if rc == 255 and not run.report_complete:  # a report received whole is used even if the connection then broke
            where = f"; if the agent finished its measurement, {kept}" if err_lines else ""
            raise _fail(host, stderr, "running the agent", f"ssh failed while running the agent: {_last_line(stderr)}{where}")
        if rc == 127:
            raise UserError(f"{host.spec}: the device could not start {self.opts.python!r}: set JETSON_PYTHON to a python3 there")
        refusal = [ln for ln in err_lines if ln.startswith(ERROR_PREFIX)]
        if rc == EXIT_REFUSED and refusal:
            msg = refusal[-1][len(ERROR_PREFIX):].strip()
            msg = msg.split(": ", 1)[1] if ": " in msg else msg
            raise UserError(f"{host.spec}: {msg}")
        if rc not in (0, 255):
            disk = classify(stderr, host, "running the agent") if "No space left" in stderr else None
            if disk:
                raise UserError(f"{host.spec}: {disk}")
            exc = next((ln.strip() for ln in reversed(err_lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", ln.strip())),
                       _last_line(stderr))
            other = "" if self.backend == "onnxruntime" else ", or try --backend onnxruntime"
            raise UserError(f"{host.spec}: the agent crashed (exit {rc}): {exc} -- the remote traceback is printed above; "
                            f"fix its cause{other}")
        try:
            report = json.loads("".join(run.report_lines))
        except ValueError:
            raise UserError(f"{host.spec}: the agent exited 0 but sent no readable report; check the remote log above; "
                            f"{kept}") from None
        device_id = (report.get("bundle") or {}).get("id")
        if device_id != self.bundle_id:
            raise UserError(f"{host.spec}: the device ran bundle {str(device_id)[:12]}, not the {self.bundle_id[:12]} "
                            f"verified here (its manifest differs on the device): redeploy with --recopy; {kept}")
        return report

    # -- one host / many hosts ---------------------------------------------------------------------
    def save(self, host: Host, report: dict, stamp: str) -> Path:
        """Write the report atomically under --reports; a failure names the device's copy, so nothing is lost."""
        out_dir = Path(self.opts.reports) / host.label / self.bundle.resolve().name
        path = out_dir / f"{stamp}.json"
        n = 1
        while path.exists():
            n += 1
            path = out_dir / f"{stamp}-{n}.json"
        try:
            atomic_write_json(path, report)
        except OSError as e:
            kept = (report.get("agent") or {}).get("device_copy")
            scp = f"scp {'-P ' + str(host.port) + ' ' if host.port else ''}{host.destination}:{kept} {path}"
            where = (f"the measurement is kept on the device at {host.destination}:{kept}: fix that and copy it with "
                     f"`{scp}`" if kept else
                     "the device could not keep a copy either, so this measurement is lost: fix that and deploy again")
            raise UserError(f"{host.spec}: could not save the report to {path} ({e.strerror or e}); {where}") from None
        return path

    def deploy_one(self, host: Host) -> DeployResult:
        t0 = time.monotonic()
        say(host, f"preflight ({self.opts.python}, {self.remote})", self.opts.quiet)
        facts = self.preflight(host)
        say(host, f"python {facts.python}, numpy {facts.numpy}, {facts.machine}", self.opts.quiet)
        copied = self.copy(host, facts)
        stamp = timestamp()
        report = self.run_agent(host, facts, stamp)
        report["deploy"] = {
            "host": host.spec, "destination": host.destination, "port": host.port,
            "bundle_path": str(self.bundle), "bundle_id": self.bundle_id, "exported_bundle_id": self.exported_id,
            "remote_dir": self.remote, "remote_python": self.opts.python, "remote_python_version": facts.python,
            "agent_sha256": self.agent_sha, "files_copied": copied, "agent_args": self.opts.agent_args,
            "seconds": round(time.monotonic() - t0, 3), "server_time": stamp,
        }
        path = self.save(host, report, stamp)
        check = report.get("output_check") or {}
        lat = report.get("latency") or {}
        act = ((report.get("memory") or {}).get("activation") or {}).get("bytes")
        say(host, f"report {path}: output check {'pass' if check.get('passed') else 'FAIL'}, "
                  f"latency p50 {lat.get('p50_ms', float('nan')):.3f} ms, activation memory {act} bytes", self.opts.quiet)
        say(host, per_image_line((report.get("memory") or {}).get("per_image") or {}), self.opts.quiet)
        return DeployResult(host, path, report, copied=copied)

    def _safe(self, host: Host) -> DeployResult:
        try:
            return self.deploy_one(host)
        except UserError as e:
            return DeployResult(host, error=str(e))

    def run(self, hosts: Sequence[Host]) -> List[DeployResult]:
        """Deploy to every host; on Ctrl-C, stop the agents under way and raise KeyboardInterrupt saying so."""
        pool = ThreadPoolExecutor(max_workers=len(hosts)) if len(hosts) > 1 else None
        try:
            if pool is None:
                return [self._safe(hosts[0])]
            futures = [pool.submit(self._safe, h) for h in hosts]
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            message = self.interrupt()
            raise KeyboardInterrupt(message) from None
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

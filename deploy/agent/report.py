"""The report: bundle verified, each phase in a fresh subprocess of the agent folder, device facts, one JSON dict."""

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

from .backends import choose_backend
from .bundle import bundle_inputs, input_batch_is_dynamic, load_and_verify_bundle
from .common import AgentError, PhaseCrashed, log
from .contract import AGENT_VERSION, REPORT_SCHEMA, REPORT_SCHEMA_VERSION, format_batch_list
from .device import device_facts
from .fingerprint import AGENT_DIR, agent_sha256
from .lock import DeviceLock, lock_path
from .probes import MEMORY_PHASE_ENV
from .slope import measure_per_image


def run_phase_subprocess(phase, argv):
    """Each measurement runs in its own process (the agent folder run again), so the latency run cannot pollute memory."""
    fd, out = tempfile.mkstemp(prefix="redistill-phase-", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, AGENT_DIR] + argv + ["--phase", phase, "--phase-out", out]
        env = dict(os.environ)
        if phase in ("memory", "slope-point"):
            env.update(MEMORY_PHASE_ENV)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            with open(out) as f:
                text = f.read()
            err = json.loads(text) if text.strip() else None
            if err and err.get("kind") == "crash":
                raise PhaseCrashed(err["error"])
            if err and err.get("error"):
                raise AgentError(err["kind"], err["error"])
            raise PhaseCrashed("RuntimeError: the %s phase died with exit code %d" % (phase, rc))
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def iso_now():
    return datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")


def theoretical_peak(manifest):
    mem = manifest.get("memory") or {}
    value = mem.get("peak_bytes") if isinstance(mem, dict) else None
    return {"bytes": value, "what": "theoretical peak activation memory from the export stage (redistill.memory)",
            "how": "copied from the bundle manifest's memory.peak_bytes", "detail": mem or None}


def build_report(args, argv):
    t0 = time.perf_counter()
    bundle_dir = args.bundle
    log("verifying %s" % bundle_dir)
    manifest, bid = load_and_verify_bundle(bundle_dir)
    log("bundle %s (%s) verified: %d files match their sha256" % (manifest.get("name"), bid[:12], len(manifest["files"])))
    cls = choose_backend(args.backend, manifest)
    log("backend: %s" % cls.name)
    phase_argv = [a for a in argv]
    if args.backend == "auto":
        phase_argv += ["--backend", cls.name]
    with DeviceLock(lock_path(), bid, manifest.get("name")) as lock:
        log("holding the device's measurement lock %s" % lock.path)
        facts = device_facts()
        lat = run_phase_subprocess("latency", phase_argv)
        mem = run_phase_subprocess("memory", phase_argv)
        if args.slope_batches and input_batch_is_dynamic(manifest):
            log("per-image memory: batches %s, each in a fresh process"
                % format_batch_list(sorted(set(args.slope_batches))))
        mem["memory"]["per_image"] = measure_per_image(
            args.slope_batches, input_batch_is_dynamic(manifest), cls.name, lat["backend"].get("providers"),
            lambda extra: run_phase_subprocess("slope-point", phase_argv + extra))
    mem["memory"]["theoretical_peak"] = theoretical_peak(manifest)
    report = {
        "schema": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION, "created": iso_now(),
        "agent": {"version": AGENT_VERSION, "sha256": agent_sha256(AGENT_DIR), "argv": argv},
        "bundle": {"id": bid, "name": manifest.get("name"), "precision": manifest.get("precision"),
                   "target": manifest.get("target"), "model": manifest.get("model"), "input": manifest.get("input"),
                   "inputs": bundle_inputs(manifest), "task": manifest.get("task", "classify"),
                   "verified_files": len(manifest["files"]),
                   "verification": "sha256 of every file in manifest.files recomputed on the device before running"},
        "device": facts,
        "backend": lat["backend"],
        "load_seconds": lat["load_seconds"],
        "output_check": lat["output_check"],
        "latency": lat["latency"],
        "memory": mem["memory"],
        "agent_seconds": time.perf_counter() - t0,
    }
    return report

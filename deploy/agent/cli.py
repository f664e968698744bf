"""The agent's command line: parse the options (measurement options from the contract), run, print the report.

Progress goes to stderr; the report goes to stdout between REPORT_BEGIN and REPORT_END (and to
``--json-out``, or the temp folder when that cannot be written). A refusal or bad input, a bad argument
included, exits EXIT_REFUSED with one ``ERROR_PREFIX kind: message`` line; anything else is a crash with
a traceback (EXIT_CRASHED). Run by ``redistill deploy`` (``--stop-on-eof``), the agent stops with all its
processes when the deploy's connection closes.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import traceback

from .backends import backend_choices
from .bundle import load_and_verify_bundle
from .common import AgentError, PhaseCrashed, atomic_write_bytes, log
from .contract import (ERROR_PREFIX, EXIT_CRASHED, EXIT_OK, EXIT_REFUSED, REPORT_BEGIN, REPORT_END, add_measure_options,
                       measure_option_error)
from .phases import PHASES
from .report import build_report

USAGE = "python3 AGENT_DIR --bundle DIR [options]"


class _Parser(argparse.ArgumentParser):
    """A bad argument is a refusal like any other: one ERROR_PREFIX line naming the fix, exit EXIT_REFUSED."""

    def error(self, message):
        self.print_usage(sys.stderr)
        sys.stderr.write("%s bad-argument: bad agent argument: %s; fix that option (they are redistill deploy's "
                         "measurement options; `python3 agent --help` lists them)\n" % (ERROR_PREFIX, message))
        sys.exit(EXIT_REFUSED)


def build_parser():
    p = _Parser(prog="agent", usage=USAGE, description="ReDistill on-device bench agent: verify a "
                                "bundle, run it, measure latency and memory, print a JSON report")
    p.add_argument("--bundle", required=True, help="bundle folder (manifest.json, model.onnx, reference/)")
    add_measure_options(p, choices={"backend": backend_choices()})
    p.add_argument("--cache-dir", default=None, help="TensorRT engine cache (default: engines/ next to the bundle)")
    p.add_argument("--json-out", default=None, help="also write the report here (atomically)")
    p.add_argument("--verify-only", action="store_true", help="only check the bundle's sha256s")
    p.add_argument("--stop-on-eof", action="store_true", help=argparse.SUPPRESS)  # run by redistill deploy
    p.add_argument("--pid-file", help=argparse.SUPPRESS)  # written by the deploy's shell; removed at exit
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    p.add_argument("--point-batch", type=int, help=argparse.SUPPRESS)  # a slope point's batch (--phase slope-point)
    p.add_argument("--point-opt", choices=("off", "on"), help=argparse.SUPPRESS)  # its ORT graph optimisations
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    error = measure_option_error(args)
    if error:
        p.error(error)
    return args


def _write_phase_error(args, kind, error):
    atomic_write_bytes(args.phase_out, json.dumps({"kind": kind, "error": error}).encode("utf-8"))


def stop_on_eof():
    """Lead a process group of our own and stop all of it when stdin closes: the deploy's ssh connection is gone
    (the deploy was interrupted or killed), so no agent or measurement process outlives it on the device."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader (sshd started us directly) already leads its own group

    def terminated(signum, frame):
        raise SystemExit(128 + signum)  # unwinds, so temp files are removed and the lock let go
    signal.signal(signal.SIGTERM, terminated)

    def watch():
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        log("the deploy's connection closed; stopping the agent and its measurement processes")
        os.killpg(os.getpgrp(), signal.SIGTERM)

    t = threading.Thread(target=watch)
    t.daemon = True
    t.start()


def keep_report(report, path):
    """Write the report's device copy to ``path``, else to the temp folder; records and returns where it is (None:
    nowhere). A failed write never discards a finished measurement: the report still goes to stdout."""
    for target in (path, os.path.join(tempfile.gettempdir(), "redistill-report-" + os.path.basename(path))):
        report["agent"]["device_copy"] = os.path.abspath(target)
        try:
            atomic_write_bytes(target, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
            return target
        except (IOError, OSError) as e:
            log("could not write the report to %s (%s)" % (os.path.abspath(target), e))
    report["agent"]["device_copy"] = None
    log("no copy of the report stays on the device; it is sent to the server only")
    return None


def main(argv=None):
    """Run the agent; returns EXIT_OK or EXIT_REFUSED and lets a crash propagate (``run`` turns it into EXIT_CRASHED)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase:
        return run_phase(args)
    if args.stop_on_eof:
        stop_on_eof()
    try:
        return measure(args, argv)
    finally:
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except OSError:
                pass


def refuse(e):
    sys.stderr.write("%s %s: %s\n" % (ERROR_PREFIX, e.kind, e))
    sys.stderr.flush()
    return EXIT_REFUSED


def run_phase(args):
    """One measurement phase in this fresh process; its result or refusal goes to ``--phase-out``."""
    try:
        manifest, bid = load_and_verify_bundle(args.bundle)
        result = PHASES[args.phase](args, args.bundle, manifest, bid)
    except AgentError as e:
        if not args.phase_out:
            return refuse(e)
        _write_phase_error(args, e.kind, str(e))
        return EXIT_REFUSED
    except Exception as e:
        if args.phase_out:
            _write_phase_error(args, "crash", traceback.format_exception_only(type(e), e)[-1].strip())
        raise
    atomic_write_bytes(args.phase_out, json.dumps(result).encode("utf-8"))
    return EXIT_OK


def measure(args, argv):
    """Verify (``--verify-only``) or measure the bundle and print the report."""
    try:
        if args.verify_only:
            manifest, bid = load_and_verify_bundle(args.bundle)
            log("bundle %s verified" % bid)
            return EXIT_OK
        report = build_report(args, argv)
    except AgentError as e:
        return refuse(e)
    if args.json_out and keep_report(report, args.json_out) not in (None, args.json_out):
        log("kept the report's device copy at %s instead" % report["agent"]["device_copy"])
    text = json.dumps(report, indent=2, sort_keys=False)
    sys.stdout.write("%s\n%s\n%s\n" % (REPORT_BEGIN, text, REPORT_END))
    sys.stdout.flush()
    return EXIT_OK


def run(argv=None):
    """``main`` with a crash turned into its traceback on stderr and EXIT_CRASHED: the process's exit code."""
    try:
        return main(argv)
    except PhaseCrashed as crash:
        log("a measurement process crashed; its traceback is above")
        sys.stderr.write("%s\n" % crash)
        return EXIT_CRASHED
    except Exception:
        traceback.print_exc()
        return EXIT_CRASHED

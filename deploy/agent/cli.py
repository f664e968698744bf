"""The agent's command line: parse the options (measurement options from the contract), run, print the report.

Progress goes to stderr; the report goes to stdout between REPORT_BEGIN and REPORT_END (and to
``--json-out``). A refusal or bad input exits EXIT_REFUSED with one ``ERROR_PREFIX kind: message``
line; anything else is a crash with a traceback (EXIT_CRASHED).
"""

import argparse
import json
import sys
import traceback

from .backends import backend_choices
from .bundle import load_and_verify_bundle
from .common import AgentError, PhaseCrashed, atomic_write_bytes, log
from .contract import (ERROR_PREFIX, EXIT_CRASHED, EXIT_OK, EXIT_REFUSED, REPORT_BEGIN, REPORT_END, add_measure_options,
                       measure_option_error)
from .phases import PHASES
from .report import build_report

USAGE = "python3 AGENT_DIR --bundle DIR [options]"


def build_parser():
    p = argparse.ArgumentParser(prog="agent", usage=USAGE, description="ReDistill on-device bench agent: verify a "
                                "bundle, run it, measure latency and memory, print a JSON report")
    p.add_argument("--bundle", required=True, help="bundle folder (manifest.json, model.onnx, reference/)")
    add_measure_options(p, choices={"backend": backend_choices()})
    p.add_argument("--cache-dir", default=None, help="TensorRT engine cache (default: engines/ next to the bundle)")
    p.add_argument("--json-out", default=None, help="also write the report here (atomically)")
    p.add_argument("--verify-only", action="store_true", help="only check the bundle's sha256s")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
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


def main(argv=None):
    """Run the agent; returns EXIT_OK or EXIT_REFUSED and lets a crash propagate (``run`` turns it into EXIT_CRASHED)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.phase:
            manifest, bid = load_and_verify_bundle(args.bundle)
            result = PHASES[args.phase](args, args.bundle, manifest, bid)
            atomic_write_bytes(args.phase_out, json.dumps(result).encode("utf-8"))
            return EXIT_OK
        if args.verify_only:
            manifest, bid = load_and_verify_bundle(args.bundle)
            log("bundle %s verified" % bid)
            return EXIT_OK
        report = build_report(args, argv)
    except Exception as e:
        if not isinstance(e, AgentError):
            if args.phase and args.phase_out:
                _write_phase_error(args, "crash", traceback.format_exception_only(type(e), e)[-1].strip())
            raise
        if args.phase and args.phase_out:
            _write_phase_error(args, e.kind, str(e))
        else:
            sys.stderr.write("%s %s: %s\n" % (ERROR_PREFIX, e.kind, e))
            sys.stderr.flush()
        return EXIT_REFUSED
    text = json.dumps(report, indent=2, sort_keys=False)
    if args.json_out:
        atomic_write_bytes(args.json_out, (text + "\n").encode("utf-8"))
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

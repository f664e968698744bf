"""Loopback deploy bench: start a throwaway sshd on 127.0.0.1, deploy each bundle with the ONNX Runtime backend,
and write ``bench/results/deploy_loopback.{md,json}`` (measured activation memory next to the manifest's theory).

    python -m bench.loopback_bench bundles/quick-fp32 bundles/quick-int8
    python -m bench.loopback_bench --pages-only      # rewrite OUT.md from OUT.json

This is the full deploy path (ssh, rsync, remote agent, report) on this machine's CPU, not a Jetson.
The measurement options are the agent's (deploy/agent/contract.py), with one intra-op thread by default.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

from deploy.agent.contract import add_measure_options, measure_argv, measure_option_error
from deploy.deployer import Deployer, DeployOptions
from deploy.loopback import LoopbackSshd
from deploy.ssh import SshOptions, parse_hosts
from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text
from redistill.memory import fmt_bytes
from redistill.report import add_page_options, machine, machine_line, md_table, timestamp

PROG = "python -m bench.loopback_bench"
#: the backend is fixed (this machine is not a Jetson); one intra-op thread is steadier on a shared box
FIXED = {"backend": "onnxruntime"}
DEFAULTS = {"threads": 1}


def _mib(b) -> str:
    return "n/a" if b is None else fmt_bytes(b)


def summarize(report: dict, bundle: str) -> dict:
    mem, lat, chk = report["memory"], report["latency"], report["output_check"]
    return {
        "bundle": bundle, "bundle_id": report["bundle"]["id"], "precision": report["bundle"]["precision"],
        "backend": report["backend"]["name"], "providers": report["backend"].get("providers"),
        "theoretical_peak_bytes": mem["theoretical_peak"]["bytes"],
        "measured_activation_bytes": mem["activation"]["bytes"],
        "process_peak_bytes": mem["process_peak"]["bytes"],
        "process_after_load_bytes": mem["process_after_load"]["bytes"],
        "system_ram_bytes": mem["system_ram"]["bytes"], "system_ram_source": mem["system_ram"]["source"],
        "latency_ms": {k: lat[k] for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "min_ms", "max_ms")},
        "throughput_per_s": lat["throughput_per_s"], "iterations": lat["iterations"], "warmup": lat["warmup"],
        "batch": lat["batch"], "output_check": {k: chk[k] for k in ("passed", "max_abs_diff", "top1_agreement", "atol")},
        "how": {"activation": mem["activation"]["how"], "latency": lat["how"]},
    }


def render_md(doc: dict) -> str:
    """The page, from the JSON record alone (so ``--pages-only`` rewrites it unchanged)."""
    rows = []
    for r in doc["results"]:
        lat, chk = r["latency_ms"], r["output_check"]
        rows.append([Path(r["bundle"]).name, r["precision"], _mib(r["theoretical_peak_bytes"]),
                     _mib(r["measured_activation_bytes"]), _mib(r["process_peak_bytes"]), f"{lat['mean_ms']:.3f}",
                     f"{lat['p50_ms']:.3f}", f"{lat['p99_ms']:.3f}", f"{r['throughput_per_s']:.1f}",
                     f"{'pass' if chk['passed'] else 'FAIL'} ({chk['max_abs_diff']:.2g})"])
    return "\n".join([
        "# Loopback deploy: ONNX Runtime on this machine's CPU",
        "",
        f"Written by `{doc['command']}` on {doc['created']}.",
        "",
        f"Machine: {machine_line(doc['machine'])}.",
        "Every bundle went through the whole deploy path (system ssh to an sshd on 127.0.0.1, rsync, the agent run "
        "by the remote interpreter, report saved by the server). **This is not a Jetson**: the TensorRT backend is "
        "not exercised here and these latencies say nothing about a TX2.",
        "",
        *md_table(["bundle", "precision", "theoretical peak (manifest)", "measured activation (ORT)",
                   "process peak (VmHWM)", "mean ms", "p50 ms", "p99 ms", "images/s", "output check (max abs diff)"],
                  rows),
        "",
        "- *theoretical peak*: `memory.peak_bytes` from the bundle manifest (redistill.memory's largest live set of "
        "activation tensors).",
        "- *measured activation*: the agent's memory run, a fresh process: peak resident memory during inference "
        "minus resident memory after the session was created, with ONNX Runtime's CPU memory arena and memory "
        "pattern off. It includes whatever the first inference allocates besides activations (kernel scratch, "
        "per-thread buffers), so it is an upper bound on activations at this granularity (pages).",
        "- *latency*: wall clock of `InferenceSession.run` at batch "
        f"{doc['results'][0]['batch'] if doc['results'] else 1}, after the warm-up; measured in a separate process "
        "from memory.",
        "",
        f"Raw numbers: `{Path(doc['json']).name}`; full device reports are kept under `{doc['reports']}`.",
        "",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="*", help="bundle folders to deploy (none with --pages-only)")
    add_page_options(p, "OUT.json", remarks=False)
    p.add_argument("--out", default="bench/results/deploy_loopback", help="writes OUT.md and OUT.json")
    p.add_argument("--reports", default="reports/loopback")
    add_measure_options(p, defaults=DEFAULTS, exclude=tuple(FIXED))
    p.set_defaults(**FIXED)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    error = measure_option_error(args)
    if error:
        p.error(error)
    out = Path(args.out)
    if args.pages_only:
        if args.bundles:
            p.error("--pages-only rewrites the page from OUT.json; give no bundles")
        atomic_write_text(out.with_suffix(".md"), render_md(json.loads(out.with_suffix(".json").read_text())))
        print(f"wrote {out.with_suffix('.md')}")
        return 0
    if not args.bundles:
        p.error("give the bundle folders to deploy (or --pages-only)")
    import onnxruntime  # only for its version on the page

    results = []
    with tempfile.TemporaryDirectory(prefix="redistill-loopback-") as tmp, LoopbackSshd(Path(tmp) / "sshd") as sshd:
        host = parse_hosts(sshd.aliases[0])[0]
        for bundle in args.bundles:
            opts = DeployOptions(python=sys.executable, remote_dir=str(Path(tmp) / "device"), reports=args.reports,
                                 agent_args=measure_argv(args), ssh=SshOptions(config=str(sshd.config)))
            try:
                res = Deployer(bundle, opts).deploy_one(host)
            except UserError as e:
                print(f"loopback_bench: error: {e}", file=sys.stderr)
                return 2
            results.append({**summarize(res.report, bundle), "report": str(res.report_path)})
    doc = {
        "schema": "redistill-deploy-loopback", "schema_version": 1, "created": timestamp(),
        "command": PROG + " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine(onnxruntime=onnxruntime.__version__),
        "json": str(out.with_suffix(".json")), "reports": args.reports,
        "note": "loopback sshd on this machine, ONNX Runtime CPU backend; not a Jetson, TensorRT not exercised",
        "results": results,
    }
    atomic_write_json(out.with_suffix(".json"), doc)
    atomic_write_text(out.with_suffix(".md"), render_md(doc))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

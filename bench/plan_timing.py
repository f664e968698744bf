"""Time the liveness walk against graph size (beside the previous, rescanning walk) and `redistill plan` on every
classifier family; write bench/results/plan_timing.{md,json}.

    python -m bench.plan_timing [--image-size 128] [--teachers ARCH=BUDGET ...] [--baseline 225879f] [--out ...]
    python -m bench.plan_timing --pages-only --remarks bench/results/plan_timing_remarks.md

The walk is timed on chains of Relu nodes in a fresh process per walk; the previous walk is
``redistill/memory/analysis.py`` as of ``--baseline`` (read with ``git show``; left out where git cannot).
The plan is timed in this process (``train.plan.make_plan``: imports excluded, every schedule sized, the fast
path and, for two families, every network exported whole) and end to end (``redistill plan`` in a new process).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from redistill.io import atomic_write_json, atomic_write_text
from redistill.report import add_page_options, machine, machine_line, md_table, remarks_section, timestamp
from train.plan import make_plan, parse_budget

REPO = Path(__file__).resolve().parents[1]
#: every classifier family, each with a budget some of its students fit (the issue's for the MobileNets)
TEACHERS = ("mobilenetv2-1-1222121=1MiB", "mobilenetv3_small-1-22121111211=512KiB", "resnet18-1-21222=2MiB",
            "resnet34-1-21222=2MiB", "resnet50-1-21222=4MiB", "resnext18-1-21222=2MiB")
EXACT = ("mobilenetv2-1-1222121", "mobilenetv3_small-1-22121111211")
WALK_NODES = (1000, 4000, 16000, 64000)
BASELINE_NODES = (1000, 4000, 16000)  # the rescan takes minutes beyond

_WALK = r"""
import importlib.util, json, sys, time
from onnx import TensorProto, helper
spec = importlib.util.spec_from_file_location("walk", sys.argv[1])
walk = sys.modules["walk"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(walk)
n, reps = int(sys.argv[2]), int(sys.argv[3])
nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"r{i}") for i in range(n)]
graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 8, 16, 16])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
best = float("inf")
for _ in range(reps):
    t0 = time.perf_counter()
    report = walk.analyze_onnx(model, inplace=True)
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"seconds": best, "peak_bytes": report.peak_bytes, "inplace_peak_bytes": report.inplace_peak_bytes}))
"""


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def time_walk(source: Path, nodes: int) -> Dict[str, Any]:
    """Best of a few ``analyze_onnx`` runs (shape inference included) of ``source`` on a chain of ``nodes`` Relus."""
    reps = 3 if nodes <= 4000 else 1
    out = subprocess.run([sys.executable, "-c", _WALK, str(source), str(nodes), str(reps)], cwd=REPO, env=_env(),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_source(rev: str, tmp: Path) -> Optional[Path]:
    """The analysis module as of git revision ``rev``, written to ``tmp``; None where git cannot show it."""
    try:
        text = subprocess.run(["git", "show", f"{rev}:redistill/memory/analysis.py"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = tmp / "analysis_baseline.py"
    path.write_text(text)
    return path


def _figures(c) -> tuple:
    return (c.plain.report.peak_bytes, c.plain.report.inplace_peak_bytes, c.red.report.peak_bytes,
            c.red.report.inplace_peak_bytes, c.plain.macs, c.red.macs, c.red.params)


def time_plan(teacher: str, image_size: int, budget: str, exact: bool) -> Dict[str, Any]:
    """The fast plan in this process, optionally the exact one beside it, and ``redistill plan`` end to end."""
    plan = make_plan(teacher, image_size, parse_budget(budget))
    fit = plan.fitting()
    row = {"teacher": teacher, "budget": budget, "schedules": len(plan.candidates), "exports": plan.exports,
           "seconds": round(plan.seconds, 2), "fit": len(fit), "chosen": fit[0].arch if fit else None}
    if exact:
        ref = make_plan(teacher, image_size, parse_budget(budget), exact=True)
        row["exact_seconds"] = round(ref.seconds, 2)
        row["exact_exports"] = ref.exports
        row["exact_equal"] = [_figures(c) for c in plan.candidates] == [_figures(c) for c in ref.candidates]
    with tempfile.TemporaryDirectory(prefix="plan-timing-") as tmp:
        argv = [sys.executable, "-m", "redistill.cli", "plan", "--teacher", teacher, "--image-size", str(image_size),
                "--budget", budget, "--out", str(Path(tmp) / "plan.yaml")]
        t0 = time.perf_counter()
        done = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True)
        row["cli_seconds"] = round(time.perf_counter() - t0, 2)
        row["cli_rc"] = done.returncode
    return row


def render_markdown(doc: Dict[str, Any], remarks: Optional[str] = None) -> str:
    """The page, from the ``.json`` record alone."""
    lines = ["# Planning speed: the liveness walk and `redistill plan`", "",
             f"Command: `{doc['command']}`", "", f"Machine: {machine_line(doc['machine'])}.", "",
             f"Written {doc['created']}. 1-minute load average {doc['load_start']:.2f} when the run started and "
             f"{doc['load_end']:.2f} when it ended (the benchmark's own process adds about 1).", "",
             "## The liveness walk against graph size", "",
             "Chains of N Relu nodes (tensors 1x8x16x16 FP32), `analyze_onnx(model, inplace=True)` in a fresh process "
             "per size, best of 3 runs up to 4,000 nodes and 1 run beyond; ONNX shape inference included. "
             f"Previous walk: `redistill/memory/analysis.py` at {doc['baseline'] or 'no revision (git unavailable)'}, "
             "which rescans every tensor at every node.", ""]
    base = {int(k): v for k, v in doc["baseline_walk"].items()}
    rows = []
    for k, v in sorted((int(k), v) for k, v in doc["walk"].items()):
        b = base.get(k)
        rows.append([f"{k:,}", f"{v['seconds']:.3f}", f"{1000 * v['seconds'] / k * 1000:.1f}",
                     f"{b['seconds']:.3f}" if b else "-", f"{b['seconds'] / v['seconds']:.1f}x" if b else "-"])
    lines += md_table(["nodes", "this walk (s)", "per 1,000 nodes (ms)", "previous walk (s)", "speed-up"], rows)
    lines += ["", f"## `redistill plan` on every classifier family at {doc['image_size']} px", "",
              "*analysis*: `train.plan.make_plan` in the benchmark's process (imports excluded): every student "
              "schedule sized with and without its RED blocks, plus the teacher. *end to end*: `redistill plan` in a "
              "new process, interpreter start, imports, the chosen student's verifying export, the plot and the "
              "preset included.", ""]
    lines += md_table(["teacher", "budget", "schedules", "whole-graph exports", "analysis (s)", "end to end (s)",
                       "fit", "first ranked"],
                      [[f"`{r['teacher']}`", r["budget"], r["schedules"], r["exports"], f"{r['seconds']:.1f}",
                        f"{r['cli_seconds']:.1f}" + ("" if r["cli_rc"] == 0 else f" (exit {r['cli_rc']})"), r["fit"],
                        f"`{r['chosen']}`" if r["chosen"] else "-"] for r in doc["plans"]])
    exact = [r for r in doc["plans"] if "exact_seconds" in r]
    if exact:
        lines += ["", "Against exporting every network whole (`--exact`, the reference the fast path is tested "
                  "against):", ""]
        lines += md_table(["teacher", "fast (s)", "exact (s)", "exact exports", "speed-up", "every figure equal"],
                          [[f"`{r['teacher']}`", f"{r['seconds']:.1f}", f"{r['exact_seconds']:.1f}", r["exact_exports"],
                            f"{r['exact_seconds'] / r['seconds']:.1f}x", "yes" if r["exact_equal"] else "NO"]
                           for r in exact])
    lines += remarks_section(remarks)
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--baseline", default="225879f", help="git revision of the previous walk")
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), metavar="ARCH=BUDGET")
    parser.add_argument("--out", default="bench/results/plan_timing", help="results path without extension")
    add_page_options(parser, "OUT.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.pages_only:
        doc = json.loads(out.with_suffix(".json").read_text())
        atomic_write_text(out.with_suffix(".md"), render_markdown(doc, args.remarks))
        print(f"wrote {out.with_suffix('.md')}")
        return 0
    command = "python -m bench.plan_timing" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
    load_start = os.getloadavg()[0]
    walk, baseline_walk = {}, {}
    with tempfile.TemporaryDirectory(prefix="plan-timing-") as tmp:
        base = baseline_source(args.baseline, Path(tmp))
        for n in WALK_NODES:
            walk[n] = time_walk(REPO / "redistill" / "memory" / "analysis.py", n)
            print(f"walk {n} nodes: {walk[n]['seconds']:.3f} s", flush=True)
            if base is not None and n in BASELINE_NODES:
                baseline_walk[n] = time_walk(base, n)
                assert baseline_walk[n]["peak_bytes"] == walk[n]["peak_bytes"]
                print(f"  previous walk: {baseline_walk[n]['seconds']:.3f} s", flush=True)
    plans = []
    for item in args.teachers:
        teacher, _, budget = item.partition("=")
        plans.append(time_plan(teacher, args.image_size, budget or "1MiB", exact=teacher in EXACT))
        print(f"plan {teacher}: {plans[-1]}", flush=True)
    doc = {"command": command, "created": timestamp(), "machine": machine(), "load_start": load_start,
           "load_end": os.getloadavg()[0], "baseline": args.baseline if baseline_walk else None,
           "walk": walk, "baseline_walk": baseline_walk, "image_size": args.image_size, "plans": plans}
    atomic_write_json(out.with_suffix(".json"), doc)
    md = render_markdown(doc, args.remarks)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

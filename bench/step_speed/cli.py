"""``python -m bench.step_speed``: the options, the checks made before any timing, and the run in resumable parts."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text
from redistill.report import add_page_options, machine, timestamp

PROG = "python -m bench.step_speed"
#: the issue's pairs and targets: (preset, image size, batch) -> least speed-up over the paper's step
TARGETS = {("mobilenetv3_small_x4", 32, 64): 1.5, ("resnext18_x4", 32, 64): 1.5, ("mobilenetv2_x4", 128, 8): 1.3}
#: the paper's config for a (teacher, student) pair, in its base/configs
PAPER_CONFIGS = {
    ("mobilenetv3_small-1-22121111211", "mobilenetv3_small-4-22111111111"): "mobilenetv3_small-red.yaml",
    ("resnext18-1-21222", "resnext18-4-11221"): "resnext18-red.yaml",
    ("mobilenetv2-1-1222121", "mobilenetv2-4-1221111"): "mobilenetv2-red.yaml",
}
PAPER_REPO = "github.com/mengtang-lab/ReDistill"
PARTS = ("pairs", "contention")
#: settings that make recorded parts comparable, by kind of part; a resumed run must keep those of parts it holds
SETUP_KEYS = {"pairs": ("threads", "rounds", "warmup", "steps", "round_seconds", "seed", "pool", "switches",
                        "paper_folder"),
              "contention": ("contention_preset", "epoch_steps", "epoch_batch")}


@dataclass(frozen=True)
class Pair:
    preset: str
    image_size: int
    batch: int

    @property
    def key(self) -> str:
        return f"{self.preset}:{self.image_size}:{self.batch}"


def parse_pair(text: str) -> Pair:
    parts = text.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit() or int(parts[2]) < 1:
        raise UserError(f"--pairs {text!r}: give PRESET:SIZE:BATCH, e.g. mobilenetv3_small_x4:32:64")
    return Pair(parts[0], int(parts[1]), int(parts[2]))


def build_parser() -> argparse.ArgumentParser:
    from bench.step_speed.measure import NEIGHBOURS
    from bench.step_speed.ours import OPTIONAL_SWITCHES, SWITCHES

    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time this project's distillation step against the paper's own code on the same pairs "
        "(interleaved rounds, synthetic inputs), each speed change of the step on its own, and a training epoch "
        "alone and beside a CPU-heavy process; write OUT.md and OUT.json. Resumable: finished parts are kept in "
        "RUN_DIR/state.json.",
        epilog="example:\n  python -m bench.step_speed --paper-code ../paper-ReDistill\n"
               "  python -m bench.step_speed --pages-only --remarks bench/results/step_speed_remarks.md")
    p.add_argument("--paper-code", default=None, metavar="DIR",
                   help=f"a copy of {PAPER_REPO} (its base/ and reed/ folders); without it, or when DIR lacks "
                        "them, the paper's side is skipped and this project's figures are still reported")
    p.add_argument("--pairs", nargs="+", default=[":".join(map(str, k)) for k in TARGETS], metavar="PRESET:SIZE:BATCH",
                   help="presets with image size and batch (default: the issue's three pairs)")
    p.add_argument("--switches", nargs="*", default=None, metavar="CHANGE",
                   help=f"changes timed one at a time, each added to the baseline with all of them off (default: "
                        f"those of {' '.join(SWITCHES)} this checkout's runtime config has; also "
                        f"{' '.join(OPTIONAL_SWITCHES)}; --switches with no name: the trainer's default step only)")
    p.add_argument("--compile-pairs", type=int, default=1, metavar="N",
                   help="time the compile change on the first N pairs only (default 1: its compile takes minutes "
                        "on a CPU)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per side (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per side, discarded (default 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per side per round (default: about --round-seconds of the paper's step)")
    p.add_argument("--round-seconds", type=float, default=1.5, help="target length of one side's round (default 1.5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads set in every process (default: the machine's cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and synthetic batches")
    p.add_argument("--pool", type=int, default=4, help="distinct synthetic batches cycled (default 4)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: both)")
    p.add_argument("--contention-preset", default="quick", help="preset of the training epoch (default quick)")
    p.add_argument("--contention-threads", nargs="+", default=["auto", "2"], metavar="auto|N",
                   help="runtime.threads settings compared beside the neighbour (default: auto 2)")
    p.add_argument("--neighbours", nargs="+", choices=sorted(NEIGHBOURS), default=["spin"],
                   help="CPU-heavy processes run beside the epoch, one at a time (default: spin; "
                        + "; ".join(f"{k}: {v[0]}" for k, v in NEIGHBOURS.items()) + ")")
    p.add_argument("--epoch-steps", type=int, default=200,
                   help="steps of the timed epoch (default 200: the adaptive threads probe on a schedule of steps)")
    p.add_argument("--epoch-batch", type=int, default=32,
                   help="its batch size (default 32, for many steps in little time; 0: the preset's)")
    p.add_argument("--data-root", default="data/cifar10", help="the CIFAR-10 image folder (train/, test/)")
    p.add_argument("--run-dir", default="runs/step_speed", help="state, worker logs and trainer runs")
    p.add_argument("--out", default="bench/results/step_speed", help="results path without extension")
    add_page_options(p, "OUT.json")
    return p


def paper_source(folder: Optional[str]) -> Dict[str, Any]:
    """Where the paper's code is and which copy it is; ``why`` says why its side is skipped."""
    from bench.step_speed.paper import missing_files, source_digest

    if not folder:
        return {"folder": None, "why": "no --paper-code DIR given"}
    root = Path(folder)
    if not root.is_dir():
        return {"folder": folder, "why": f"--paper-code {folder} is not a folder"}
    missing = missing_files(root)
    if missing:
        return {"folder": folder, "why": f"{folder} lacks {missing[0]} (not a copy of {PAPER_REPO})"}
    rec: Dict[str, Any] = {"folder": folder, "why": None, "digest": source_digest(root), "commit": None}
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root.resolve():
            rec["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, check=True).stdout.strip()
            rec["dirty"] = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True,
                                               text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return rec


def check_args(args) -> None:
    """Every option in range and every name known, before anything is timed."""
    from train.config import load_config

    if args.rounds < 2:
        raise UserError(f"--rounds {args.rounds}: give at least 2 (the spread needs several rounds)")
    if args.warmup < 1:
        raise UserError(f"--warmup {args.warmup}: give at least 1 (the first step allocates and compiles)")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: give at least 1, or leave it out to size rounds by --round-seconds")
    if not args.round_seconds > 0:
        raise UserError(f"--round-seconds {args.round_seconds}: give a positive number of seconds")
    if args.threads < 1 or args.pool < 1 or args.compile_pairs < 0:
        raise UserError("--threads and --pool must be at least 1, --compile-pairs at least 0")
    if args.epoch_steps < 1 or args.epoch_batch < 0:
        raise UserError(f"--epoch-steps {args.epoch_steps} / --epoch-batch {args.epoch_batch}: give at least 1 step "
                        "and a batch of at least 1 (or 0: the preset's)")
    for t in args.contention_threads:
        if t != "auto" and not (t.isdigit() and int(t) >= 1):
            raise UserError(f"--contention-threads {t!r}: give auto or a thread count of at least 1")
    for pair in args.pair_list:
        load_config(pair.preset, [f"data.image_size={pair.image_size}", f"data.batch_size={pair.batch}"])
    if "contention" in args.parts:
        load_config(args.contention_preset)
        if not Path(args.data_root, "train").is_dir():
            raise UserError(f"--data-root {args.data_root} has no train/ folder: unpack the CIFAR-10 archive there "
                            "or give the folder that holds train/ and test/")


def command_line(argv: List[str]) -> str:
    return " ".join([PROG, *(shlex.quote(a) for a in argv)])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv)
    except UserError as e:
        print(f"step_speed: error: {e}", file=sys.stderr)
        return 2


def _main(args, argv: List[str]) -> int:
    from bench.step_speed.page import render_markdown

    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    if args.pages_only:
        if not out_json.is_file():
            raise UserError(f"{out_json} not found: --pages-only rewrites the page of an earlier run")
        atomic_write_text(out_md, render_markdown(json.loads(out_json.read_text()), args.remarks))
        print(f"wrote {out_md}")
        return 0
    if args.remarks and not Path(args.remarks).is_file():
        raise UserError(f"--remarks {args.remarks} not found: give the hand-written remarks file (Markdown)")
    args.pair_list = [parse_pair(t) for t in args.pairs]
    check_args(args)
    from bench.step_speed.run import measure_contention, measure_pair, new_doc, setup_of
    from bench.step_speed.ours import check_switches

    switches, left_out = check_switches(args.switches)
    paper = paper_source(args.paper_code)
    if paper["why"] and "pairs" in args.parts:
        print(f"paper side skipped: {paper['why']}; timing this project's step only", flush=True)
    run_dir = Path(args.run_dir).resolve()
    state_path = run_dir / "state.json"
    setup = dict(setup_of(args, switches, paper), left_out=left_out)
    doc = json.loads(state_path.read_text()) if state_path.is_file() else new_doc(setup, paper)
    changed = [k for kind, keys in SETUP_KEYS.items() if doc[kind] for k in keys if doc["setup"].get(k) != setup.get(k)]
    if changed:
        k = changed[0]
        raise UserError(f"{run_dir} holds parts measured with {k} {doc['setup'].get(k)!r} (now {setup.get(k)!r}): "
                        f"rerun with the same settings, or give --run-dir NEW")
    doc["setup"] = setup
    import torch

    doc["command"], doc["machine"], doc["paper"] = command_line(argv), machine(torch=torch.__version__), paper
    t0, done = time.perf_counter(), []

    def save():
        atomic_write_json(state_path, doc)
        atomic_write_json(out_json, doc)
        atomic_write_text(out_md, render_markdown(doc, args.remarks))

    if "pairs" in args.parts:
        for i, pair in enumerate(args.pair_list):
            if pair.key in doc["pairs"]:
                print(f"{pair.key}: done in an earlier run (kept)", flush=True)
                continue
            print(f"{pair.key}: timing", flush=True)
            doc["pairs"][pair.key] = measure_pair(pair, TARGETS.get((pair.preset, pair.image_size, pair.batch)),
                                                  PAPER_CONFIGS, paper, switches, args, run_dir,
                                                  with_compile=i < args.compile_pairs)
            done.append(pair.key)
            save()
    if "contention" in args.parts:
        done += measure_contention(args, run_dir, doc, save)
    doc["runs"].append({"command": doc["command"], "created": timestamp(), "parts": done,
                        "seconds": round(time.perf_counter() - t0, 1)})
    save()
    print(f"wrote {out_json} and {out_md}", flush=True)
    return 0

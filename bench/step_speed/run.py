"""The parts of a step-speed run: one pair (paper and our step variants, interleaved) and the contention epochs."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from bench.step_speed.measure import NEIGHBOURS, THREAD_ENV, Side, epoch_setup, interleaved, machine_load, train_epoch
from bench.step_speed.ours import Switch, overrides, pair_config, runtime_keys, switch_value
from bench.step_speed.paper import missing_files
from redistill.report import timestamp
from train.config import load_config

SCHEMA = "redistill-step-speed"
TEST_PER_CLASS = 20  # the trainer tests after its epoch: a few images keep that short
ABLATION = ("added one at a time to the baseline (every change below off); 'vs baseline' is each side's speed "
            "over the baseline's. `default` is the trainer's step as a run gets it (no runtime overrides). Each of "
            "our rounds starts with the step's `begin_epoch`, as an epoch does: the time between rounds, while other "
            "sides run, is no step to the adaptive thread setting.")


def setup_of(args, switches: List[Switch], paper: Dict[str, Any]) -> Dict[str, Any]:
    """The settings every part of a run shares (a resumed run must keep them)."""
    return {"threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps,
            "round_seconds": args.round_seconds, "seed": args.seed, "pool": args.pool,
            "switches": [s.key for s in switches], "paper_folder": paper.get("folder") if not paper["why"] else None,
            "clock_resolution_s": time.get_clock_info("perf_counter").resolution, "ablation_what": ABLATION,
            "thread_env_removed": list(THREAD_ENV), "left_out": [], "contention_preset": args.contention_preset,
            "epoch_steps": args.epoch_steps, "epoch_batch": args.epoch_batch}


def new_doc(setup: Dict[str, Any], paper: Dict[str, Any]) -> Dict[str, Any]:
    return {"schema": SCHEMA, "version": 1, "command": "", "machine": {}, "paper": paper, "setup": setup,
            "pairs": {}, "contention_setup": None, "contention": {}, "runs": []}


def variants(switches: List[Switch], timed: List[Switch], threads: int) -> List[Side]:
    """Our sides: the trainer's default, the baseline (every change in ``switches`` off), and the baseline plus
    each change in ``timed``."""
    base = {s.key: switch_value(s, False, threads) for s in switches}
    out = [Side("default", "ours", {}, {})]
    if switches:
        out.append(Side("baseline", "ours", {}, base))
        out += [Side(f"+{s.key}", "ours", {}, dict(base, **{s.key: switch_value(s, True, threads)})) for s in timed]
    return out


def left_out(switches: List[Switch], cfg, with_compile: bool, compile_pairs: int) -> Dict[str, str]:
    """The changes not timed on their own for this pair, and why."""
    out = {s.key: "it changes nothing in these networks" for s in switches if not s.applies(cfg)}
    if not with_compile and any(s.key == "compile" for s in switches):
        out["compile"] = (f"timed on the first {compile_pairs} pair(s) only, --compile-pairs, as its compile takes "
                          "minutes on a CPU")
    return out


def measure_pair(pair, target: Optional[float], paper_configs: Dict[tuple, str], paper: Dict[str, Any],
                 switches: List[Switch], args, run_dir: Path, with_compile: bool = True,
                 say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Paper and our variants of one pair, interleaved; the raw record of the part. ``with_compile``: time the
    compile change here too."""
    cfg = pair_config(pair.preset, pair.image_size, pair.batch, {})
    num_classes = 10
    common = {"seed": args.seed, "threads": args.threads, "image_size": pair.image_size, "batch": pair.batch,
              "num_classes": num_classes, "pool": args.pool}
    rec: Dict[str, Any] = {"preset": pair.preset, "image_size": pair.image_size, "batch": pair.batch, "target": target,
                           "teacher": cfg.teacher.arch, "student": cfg.student.arch, "started": timestamp(),
                           "paper_config": paper_configs.get((cfg.teacher.arch, cfg.student.arch)),
                           "paper_skipped": paper["why"], "load": machine_load()}
    sides: List[Side] = []
    if not paper["why"]:
        name = rec["paper_config"]
        if name is None:
            rec["paper_skipped"] = f"no config of the paper's for {cfg.teacher.arch} -> {cfg.student.arch}"
        elif missing_files(paper["folder"], [name]):
            rec["paper_skipped"] = f"{paper['folder']} lacks {missing_files(paper['folder'], [name])[0]}"
        else:
            sides.append(Side("paper", "paper", dict(common, paper_code=str(Path(paper["folder"]).resolve()),
                                                     teacher=cfg.teacher.arch, student=cfg.student.arch, config=name,
                                                     lr=cfg.optim.lr, cutmix=cfg.data.cutmix, mixup=cfg.data.mixup)))
        if rec["paper_skipped"]:
            say(f"  paper side skipped: {rec['paper_skipped']}")
    rec["left_out"] = left_out(switches, cfg, with_compile, args.compile_pairs)
    for side in variants(switches, [s for s in switches if s.key not in rec["left_out"]], args.threads):
        side.spec = dict(common, preset=pair.preset, settings=side.settings)
        sides.append(side)
    rec["overrides"] = {s.label: overrides(s.settings) for s in sides if s.kind == "ours"}
    t0 = time.perf_counter()
    rec.update(interleaved(sides, args.rounds, args.warmup, args.steps, args.round_seconds,
                           run_dir / "logs" / pair.key.replace(":", "_"), say))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def measure_contention(args, run_dir: Path, doc: Dict[str, Any], save: Callable[[], None],
                       say: Callable[[str], None] = print) -> List[str]:
    """The epoch alone and beside each neighbour, per thread setting; each finished run is saved as a part."""
    cfg = load_config(args.contention_preset)
    batch = args.epoch_batch or cfg.data.batch_size
    classes = [d for d in Path(args.data_root, "train").iterdir() if d.is_dir() and not d.name.startswith(".")]
    per_class = math.ceil(args.epoch_steps * batch / (1 - cfg.data.val_fraction) / max(len(classes), 1))
    root = run_dir / "contention"
    root.mkdir(parents=True, exist_ok=True)
    common = epoch_setup(args.contention_preset, args.data_root, root, per_class, TEST_PER_CLASS)
    common.append(f"data.batch_size={batch}")
    has_threads = "threads" in runtime_keys()
    doc["contention_setup"] = {
        "preset": args.contention_preset, "neighbours": {n: NEIGHBOURS[n][0] for n in args.neighbours},
        "what": f"batch {batch}" + ("" if batch == cfg.data.batch_size else f" (the preset's: {cfg.data.batch_size})")
                + f", about {args.epoch_steps} steps: the first {per_class} training images of each class of "
                f"{args.data_root} less the {cfg.data.val_fraction:g} validation split; an untrained teacher "
                "checkpoint",
        "threads_key": has_threads}
    done = []
    for setting in args.contention_threads:
        setting_args = [f"runtime.threads={setting}"] if has_threads else []
        for neighbour in [None, *args.neighbours]:
            key = f"{setting}/{neighbour or 'alone'}"
            if key in doc["contention"]:
                say(f"contention {key}: done in an earlier run (kept)")
                continue
            say(f"contention {key}: one epoch" + (f" beside {neighbour}" if neighbour else " alone"))
            rec = {"setting": setting, "neighbour": neighbour, "started": timestamp(), "load": machine_load()}
            if not has_threads:
                rec["note"] = "this checkout has no runtime.threads: the trainer's own thread choice"
            rec.update(train_epoch(args.contention_preset, common + setting_args, root,
                                   f"{setting}-{neighbour or 'alone'}", neighbour, say))
            doc["contention"][key] = rec
            done.append(f"contention {key}")
            save()
    return done

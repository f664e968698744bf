"""The reproduction benchmark (issue 6): does RED buy back the accuracy, and does the memory hold when measured?

One command, resumable (every finished step is skipped on a re-run), meant for the background:

    nohup python -m bench.reproduce > runs/repro/log.txt 2>&1 &

On the CIFAR-10 archive it trains the MobileNetV3-small teacher, then the x4 student alone, with
KD, with RED and with RED+KD (same epochs, schedule and seed; students with every seed), exports
each to an FP32 bundle, measures each on the loopback device (ONNX Runtime CPU through the real
deploy path), adds memory probes of the same architectures at the paper's 128 px, and runs
``redistill compare``. Step timings go to ``runs/repro/state.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from redistill.io import atomic_write_json

METHODS = ("student", "kd", "red", "red_kd")


class Steps:
    """Runs named shell-free steps once, recording wall time; a finished step is skipped on re-run."""

    def __init__(self, state_path: Path):
        self.path = state_path
        self.state: Dict[str, dict] = json.loads(state_path.read_text()) if state_path.exists() else {}

    def run(self, name: str, argv: List[str], log: Path) -> None:
        if self.state.get(name, {}).get("done"):
            print(f"[repro] {name}: done earlier ({self.state[name]['seconds']:.0f} s), skipped", flush=True)
            return
        print(f"[repro] {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        t0 = time.time()
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.time() - t0
        if rc != 0:
            raise SystemExit(f"[repro] {name} failed (exit {rc}); see {log}; re-run to resume")
        self.state[name] = {"done": True, "seconds": round(seconds, 1), "argv": argv, "log": str(log)}
        atomic_write_json(self.path, self.state)
        print(f"[repro] {name}: {seconds:.0f} s", flush=True)


def make_probes(out: Path, teacher_ckpt: Path, size: int) -> List[Path]:
    """Untrained checkpoints of teacher, student and student+RED at ``size`` px: memory depends on shapes, not weights."""
    import torch

    from train.checkpoint import load_checkpoint, make_payload, save_checkpoint
    from train.config import load_config
    from train.models import build_model
    from train.trainer import build_student

    ref = load_checkpoint(teacher_ckpt)
    torch.manual_seed(0)
    paths = []
    for role, method in (("teacher", "teacher"), ("student", "student"), ("student_red", "red")):
        path = out / f"{role}.pt"
        paths.append(path)
        if path.exists():
            continue
        cfg = load_config("quick", [f"method={method}", f"data.image_size={size}"])
        teacher = build_model(cfg.teacher.arch, ref["num_classes"], size)
        if role == "teacher":
            model, arch, plans = teacher, cfg.teacher.arch, []
        else:
            model, plans = build_student(cfg, ref["num_classes"], teacher)
            arch = cfg.student.arch
        save_checkpoint(make_payload(model.eval(), arch=arch, role=role, method=f"probe-{method}", num_classes=ref["num_classes"],
                                     image_size=size, classes=ref["classes"], mean=ref["mean"], std=ref["std"],
                                     width_mult=1.0, plans=plans, red_distance="cosine", config=cfg.to_dict(),
                                     epoch=0, history=[], best_val=0.0), path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="quick", help="the pair and recipe (default: quick = MobileNetV3-small x4, 32 px)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", default="0,1", help="student seeds; the teacher uses the first")
    ap.add_argument("--prefix", default="repro")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--bundles", default="bundles")
    ap.add_argument("--reports", default="reports/repro")
    ap.add_argument("--probe-size", type=int, default=128, help="input size of the memory probes (0 = none)")
    ap.add_argument("--results", default="bench/results/reproduce")
    ap.add_argument("--data-root", default="data/cifar10")
    a = ap.parse_args(argv)

    cli = [sys.executable, "-m", "redistill.cli"]
    work = Path(a.runs) / a.prefix
    steps = Steps(work / "state.json")
    seeds = [int(s) for s in a.seeds.split(",")]
    common = [f"epochs={a.epochs}", f"out_dir={a.runs}", f"data.root={a.data_root}"]
    t_name = f"{a.prefix}-teacher"
    steps.run("train teacher", cli + ["distill", a.preset, "method=teacher", f"name={t_name}", f"seed={seeds[0]}", *common, "--resume"],
              work / "logs" / "teacher.log")
    teacher_ckpt = Path(a.runs) / t_name / "teacher" / "best.pt"
    names = []
    for seed in seeds:
        for m in METHODS:
            name = f"{a.prefix}-{m}-s{seed}"
            names.append(name)
            steps.run(f"train {name}", cli + ["distill", a.preset, f"method={m}", f"name={name}", f"seed={seed}", *common,
                                               f"teacher.checkpoint={teacher_ckpt}", "--resume"], work / "logs" / f"{name}.log")
    bundles = []
    for name, ckpt in [(t_name, teacher_ckpt)] + [(n, Path(a.runs) / n / "student" / "best.pt") for n in names]:
        out = Path(a.bundles) / f"{name}-fp32"
        bundles.append(str(out))
        steps.run(f"export {name}", cli + ["export", str(ckpt), "--target", "cpu", "--out", str(out), "--data-root", a.data_root],
                  work / "logs" / f"export-{name}.log")
    probe_bundles = []
    if a.probe_size:
        for ck in make_probes(work / f"probe{a.probe_size}", teacher_ckpt, a.probe_size):
            out = Path(a.bundles) / f"{a.prefix}-probe{a.probe_size}-{ck.stem}-fp32"
            probe_bundles.append(str(out))
            steps.run(f"export probe {ck.stem}", cli + ["export", str(ck), "--target", "cpu", "--out", str(out),
                                                        "--data-root", a.data_root, "--eval-subset", "100"],
                      work / "logs" / f"export-probe-{ck.stem}.log")
    steps.run("deploy (loopback)", [sys.executable, "-m", "deploy.loopback_bench", *bundles, "--reports", a.reports,
                                    "--out", a.results + "_deploy"], work / "logs" / "deploy.log")
    if probe_bundles:
        steps.run("deploy probes (loopback)", [sys.executable, "-m", "deploy.loopback_bench", *probe_bundles, "--reports",
                                               a.reports + "-probes", "--out", a.results + f"_probe{a.probe_size}"],
                  work / "logs" / "deploy-probes.log")
    steps.state.pop("compare", None)  # always refresh the tables
    steps.run("compare", cli + ["compare", *[str(Path(a.runs) / n) for n in [t_name] + names], *bundles, a.reports,
                                "--out", a.results], work / "logs" / "compare.log")
    total = sum(v["seconds"] for v in steps.state.values())
    print(f"[repro] all steps done; {total / 60:.1f} min of step time in total (state: {steps.path})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

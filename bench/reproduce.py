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
    write_results(a, steps.state, argv)
    return 0


TARGETS = {
    "recovered": 0.60,  # RED recovers at least 60 % of the teacher - student-alone gap (and more than KD)
    "theory_ratio": 4.5,  # student+RED theoretical peak at least 4.5x below the teacher's
    "measured_ratio": 4.0,  # measured ORT CPU activation memory at least 4x below the teacher's
    "measured_over_theory": 1.5,  # measured / theoretical within 1.5x
    "latency_ratio": 2.0,  # student p50 at most half the teacher's
}


def _fmt_b(n) -> str:
    from redistill.memory import fmt_bytes

    return "n/a" if n is None else fmt_bytes(n)


def _verdict(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def write_results(a, state: Dict[str, dict], argv) -> None:
    """``<results>.md/.json``: the benchmark's choices, timings, accuracy, memory and latency against the targets."""
    from redistill.sysinfo import machine_line
    from redistill.io import atomic_write_text

    cmp = json.loads((Path(a.results) / "compare.json").read_text())
    dep = json.loads(Path(a.results + "_deploy.json").read_text())
    probe_path = Path(a.results + f"_probe{a.probe_size}.json")
    probes = json.loads(probe_path.read_text())["results"] if a.probe_size and probe_path.exists() else []
    pairs = {r["method"]: r for r in cmp["pairs"]}
    deps = {r["bundle"].rstrip("/").split("/")[-1]: r for r in dep["results"]}

    t_dep = deps.get(f"{a.prefix}-teacher-fp32")
    r_deps = [r for n, r in deps.items() if n.startswith(f"{a.prefix}-red-s")]
    s_deps = [r for n, r in deps.items() if n.startswith(f"{a.prefix}-student-s")]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    red_act = mean([r["measured_activation_bytes"] for r in r_deps])
    red_theory = mean([r["theoretical_peak_bytes"] for r in r_deps])
    red_p50 = mean([r["latency_ms"]["p50_ms"] for r in r_deps])
    t_act, t_theory, t_p50 = ((t_dep or {}).get("measured_activation_bytes"), (t_dep or {}).get("theoretical_peak_bytes"),
                              ((t_dep or {}).get("latency_ms") or {}).get("p50_ms"))
    ratio = lambda x, y: (x / y) if x and y else None  # noqa: E731
    red_rec = (pairs.get("red") or {}).get("recovered")
    kd_rec = (pairs.get("kd") or {}).get("recovered")
    facts = {
        "recovered_red": red_rec, "recovered_kd": kd_rec, "recovered_red_kd": (pairs.get("red_kd") or {}).get("recovered"),
        "theory_ratio": ratio(t_theory, red_theory), "measured_ratio": ratio(t_act, red_act),
        "measured_over_theory_teacher": ratio(t_act, t_theory), "measured_over_theory_student_red": ratio(red_act, red_theory),
        "latency_ratio_red": ratio(t_p50, red_p50),
        "latency_ratio_student": ratio(t_p50, mean([r["latency_ms"]["p50_ms"] for r in s_deps])),
    }
    checks = [
        ("RED recovers >= 60 % of the teacher - student-alone gap", f"{red_rec:.0%}" if red_rec is not None else "n/a",
         None if red_rec is None else red_rec >= TARGETS["recovered"]),
        ("... and more than KD", f"RED {red_rec:.0%} vs KD {kd_rec:.0%}" if None not in (red_rec, kd_rec) else "n/a",
         None if None in (red_rec, kd_rec) else red_rec > kd_rec),
        ("student+RED theoretical peak >= 4.5x below the teacher's", f"{facts['theory_ratio']:.2f}x" if facts["theory_ratio"] else "n/a",
         None if not facts["theory_ratio"] else facts["theory_ratio"] >= TARGETS["theory_ratio"]),
        ("measured ORT CPU activation memory >= 4x below the teacher's", f"{facts['measured_ratio']:.2f}x" if facts["measured_ratio"] else "n/a",
         None if not facts["measured_ratio"] else facts["measured_ratio"] >= TARGETS["measured_ratio"]),
        ("measured / theoretical within 1.5x (student+RED)",
         f"{facts['measured_over_theory_student_red']:.1f}x" if facts["measured_over_theory_student_red"] else "n/a",
         None if not facts["measured_over_theory_student_red"] else facts["measured_over_theory_student_red"] <= TARGETS["measured_over_theory"]),
        ("student+RED ORT CPU latency p50 at most half the teacher's", f"{facts['latency_ratio_red']:.2f}x faster" if facts["latency_ratio_red"] else "n/a",
         None if not facts["latency_ratio_red"] else facts["latency_ratio_red"] >= TARGETS["latency_ratio"]),
    ]
    order = sorted((m for m in cmp["models"] if m["top1"] and m["top1"].get("mean") is not None),
                   key=lambda m: -m["top1"]["mean"])
    total_s = sum(v["seconds"] for v in state.values())
    L = [f"# Reproduction benchmark: {cmp['models'][0]['arch'] if cmp['models'] else ''} pair on CIFAR-10", "",
         f"Command: `python -m bench.reproduce {' '.join(argv or [])}`".replace(" `", " `").rstrip() + " (resumable; run in the background)", "",
         f"Machine: {machine_line()}", "",
         f"Wall time: **{total_s / 60:.1f} min** of step time (each step's own wall time, `runs/{a.prefix}/state.json`); "
         "the training ran while other work shared the two cores part of the time, so steps are slower than on an idle machine.", "",
         "## Choices and why", "",
         f"- Pair: the `{a.preset}` preset, MobileNetV3-small teacher `mobilenetv3_small-1-22121111211` and its x4 student "
         "`mobilenetv3_small-4-22111111111` with the paper's five RED sites. Of the two pairs the issue allows it is the one "
         "that fits: ResNeXt18 trains about 4x slower per image here.",
         "- Input size 32 px (CIFAR-10's own), not the paper's 128 px: at 128 px one epoch of the teacher alone takes "
         "about 16x longer, over the whole 2.5 h budget for a few epochs. Memory is also measured at 128 px with probes of "
         "the same architectures (untrained weights: memory depends on shapes, not on values).",
         f"- {a.epochs} epochs for every network (teacher, student alone, KD, RED, RED+KD), Adam 3e-3 with cosine decay and "
         "0.2 epoch warm-up (the quick preset's schedule, chosen on the validation split), batch 128, the full 47,500 "
         "training images (2,500 held out for picking the best epoch), the full 10,000-image test split.",
         f"- Seeds: teacher {a.seeds.split(',')[0]}; every student method with seeds {a.seeds}. Means and spreads are over those seeds.",
         "- Loss weights as the paper: 0.5 CE + 0.5 mean distillation loss, RED alpha 50 with cosine distance, KD T=4.",
         "- Measurement: each network exported to an FP32 bundle (verified against PyTorch) and deployed through the real "
         "ssh path to a loopback sshd; the agent's ONNX Runtime CPU backend measures latency and, in a separate process, "
         "activation memory. This machine is not a Jetson.", "",
         "## Accuracy (test top-1, %)", "",
         "| method | n | mean | std | min - max |", "|---|---|---|---|---|"]
    for m in order:
        t = m["top1"]
        L.append(f"| {m['method']} | {t.get('n')} | {t['mean']:.2f} | {t.get('std') or 0:.2f} | {t.get('min', t['mean']):.2f} - {t.get('max', t['mean']):.2f} |")
    L += ["", "| method | recovered share of the teacher - student-alone gap |", "|---|---|"]
    for meth in ("kd", "red", "red_kd"):
        r = pairs.get(meth)
        if r and r.get("recovered") is not None:
            L.append(f"| {meth} | {r['recovered']:.0%} (gap {r['gap']:.2f} points) |")
    L += ["", "## Memory and latency (ONNX Runtime CPU, batch 1, FP32)", "",
          "| network | input | theoretical peak (liveness) | measured activation | measured / theoretical | latency p50 |", "|---|---|---|---|---|---|"]
    rows = [("teacher", "32 px", t_theory, t_act, t_p50),
            ("student alone (mean of seeds)", "32 px", mean([r["theoretical_peak_bytes"] for r in s_deps]),
             mean([r["measured_activation_bytes"] for r in s_deps]), mean([r["latency_ms"]["p50_ms"] for r in s_deps])),
            ("student+RED (mean of seeds)", "32 px", red_theory, red_act, red_p50)]
    for pr in probes:
        name = pr["bundle"].rstrip("/").split("/")[-1].replace(f"{a.prefix}-probe{a.probe_size}-", "").replace("-fp32", "")
        rows.append((f"{name} (probe)", f"{a.probe_size} px", pr["theoretical_peak_bytes"], pr["measured_activation_bytes"],
                     pr["latency_ms"]["p50_ms"]))
    for name, size, th, me, p50 in rows:
        L.append(f"| {name} | {size} | {_fmt_b(th)} | {_fmt_b(me)} | {ratio(me, th) or 0:.1f}x | {p50 or 0:.3f} ms |")
    L += ["", "## Targets", "", "| target | result | verdict |", "|---|---|---|"]
    L += [f"| {name} | {val} | {_verdict(ok)} |" for name, val, ok in checks]
    L += ["", "## Reading (generated from the figures above)", "",
          "- Ordering by mean test top-1: " + " > ".join(f"{m['method']} ({m['top1']['mean']:.2f})" for m in order) + "."]
    if red_rec is not None:
        L.append(f"- RED recovered {red_rec:.0%} of the {pairs['red']['gap']:.2f}-point gap"
                 + (f", KD {kd_rec:.0%}" if kd_rec is not None else "")
                 + (f", RED+KD {facts['recovered_red_kd']:.0%}" if facts["recovered_red_kd"] is not None else "") + ".")
    if facts["measured_over_theory_student_red"]:
        L.append(f"- Measured ONNX Runtime activation memory is {facts['measured_over_theory_teacher'] or 0:.1f}x the liveness "
                 f"peak for the teacher and {facts['measured_over_theory_student_red']:.1f}x for student+RED at 32 px, where "
                 "the student's whole liveness peak (tens of KiB) is below what the measurement resolves: it counts resident "
                 "pages, buffers under glibc's 64 KiB mmap threshold come from the heap, and the output arrays are "
                 "allocated by the caller. At the probes' larger size the figures follow the theory more closely (table above).")
        L.append("- Where the measurement is below the liveness peak (the teacher at 128 px), the likely cause is that "
                 "ONNX Runtime fuses element-wise activations into the preceding Conv (HardSwish's HardSigmoid + Mul, Clip), "
                 "so tensors the analysis counts on the exported graph never exist at run time; the analysis is of the "
                 "graph as written, before any runtime fusion.")
    if facts["latency_ratio_red"]:
        L.append(f"- Latency: at 32 px the student+RED is {facts['latency_ratio_red']:.2f}x as fast as the teacher and the "
                 f"student alone {facts['latency_ratio_student'] or 0:.2f}x: the RED blocks' convs cost about what the "
                 "aggressive pooling saves when the images are this small. The probes show the larger input's figures.")
    if red_rec is not None:
        beat = "beat" if kd_rec is not None and red_rec > kd_rec else "did not beat"
        L.append(f"- Accuracy: with {a.epochs} epochs at 32 px RED alone {beat} KD here. The "
                 "paper's result is after 300 epochs at 128 px (STL10), where the RED sites' maps are 16x larger than the "
                 "2x2 to 8x8 maps they match here; this benchmark cannot tell whether that closes the difference.")
    L += ["", "Files: `reproduce/compare.md` (full table, per-seed rows), `reproduce/*.png` (plots), "
          "`reproduce_deploy.md` and `reproduce_probe128.md` (device measurements), `reproduce_run/` (each run's "
          "config, metrics and summaries, the step logs and state.json) — every figure above is read from those."]
    atomic_write_text(a.results + ".md", "\n".join(L) + "\n")
    atomic_write_json(a.results + ".json", {"facts": facts, "targets": TARGETS, "checks": [list(c) for c in checks],
                                           "steps": state, "compare": str(Path(a.results) / "compare.json")})
    copy_logs(a, Path(a.results + "_run"))
    print(f"[repro] wrote {a.results}.md", flush=True)


def copy_logs(a, dest: Path) -> None:
    """Copy every run's config, metrics and summaries, the step logs and state.json (no checkpoints)."""
    import shutil

    from bench.distill_report import clean_log

    work = Path(a.runs) / a.prefix
    for run in sorted(Path(a.runs).glob(f"{a.prefix}-*")):
        for f in list(run.glob("*.json")) + list(run.glob("*.yaml")) + list(run.glob("*/*.json*")):
            if f.suffix in (".json", ".yaml", ".jsonl"):
                (dest / run.name / f.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dest / run.name / f.relative_to(run))
    for f in [work / "state.json", *sorted((work / "logs").glob("*.log"))]:
        if f.is_file():
            (dest / f.relative_to(work)).parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".log":
                (dest / f.relative_to(work)).write_text(clean_log(f.read_text(errors="replace")))
            else:
                shutil.copyfile(f, dest / f.relative_to(work))


if __name__ == "__main__":
    raise SystemExit(main())

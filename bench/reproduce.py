"""The reproduction benchmark (issue 6): does RED buy back the accuracy, and does the memory hold when measured?

One command, resumable (every finished step is skipped on a re-run), meant for the background:

    nohup python -m bench.reproduce --remarks bench/results/reproduce_remarks.md > runs/repro/log.txt 2>&1 &

On the data folder it trains the preset's teacher, then its student with every student method of the
method registry (student alone, KD, RED, RED+KD; same epochs, schedule and seed; students with every
seed), exports each to an FP32 bundle, measures each on the loopback device (ONNX Runtime CPU through
the real deploy path), adds memory probes of the same architectures at ``--probe-size`` px, and runs
``redistill compare``. Step timings go to ``runs/repro/state.json``. Every run's config, metrics and
summaries, the step logs and state.json are copied to ``<results>_run/``, and the page is written from
those copies; ``--pages-only`` rewrites the page from them without running anything. ``--stop-after-s S``
stops the step running after S seconds (a training run resumes from its last finished epoch) and exits 0
without writing the page; the next run goes on.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from bench.distill_report import clean_log
from bench.steps import Steps, StopReached, add_stop_option, deadline, run_command, stopped
from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text
from redistill.memory import fmt_bytes
from redistill.report import add_page_options, machine, machine_line, md_table, remarks_section, timestamp
from train.checkpoint import load_checkpoint, make_payload, save_checkpoint
from train.config import load_config
from train.design import build_student
from train.losses import METHODS, methods_in_order
from train.models import build_model

PROG = "python -m bench.reproduce"

TARGETS = {
    "recovered": 0.60,  # RED recovers at least this share of the teacher - student-alone gap (and more than KD)
    "theory_ratio": 4.5,  # student+RED theoretical peak at least this many times below the teacher's
    "measured_ratio": 4.0,  # measured ORT CPU activation memory at least this many times below the teacher's
    "measured_over_theory": 1.5,  # measured / theoretical within this factor
    "latency_ratio": 2.0,  # teacher p50 / student+RED p50 at least this
}


#: the methods this reproduction compares (bench/red_vs_kd.py compares the later baselines: FitNet, AT, ...)
REPRODUCED = ("student", "kd", "red", "red_kd")


def student_methods() -> List[str]:
    """The methods a student is trained with here, in the registry's order."""
    return [m.name for m in methods_in_order() if not m.teacher_only and m.name in REPRODUCED]


def make_probes(out: Path, teacher_ckpt: Path, size: int, preset: str) -> List[Path]:
    """Untrained checkpoints of teacher, student and student+RED at ``size`` px: memory depends on shapes, not weights."""
    import torch

    ref = load_checkpoint(teacher_ckpt)
    torch.manual_seed(0)
    paths = []
    for role, method in (("teacher", "teacher"), ("student", "student"), ("student_red", "red")):
        path = out / f"{role}.pt"
        paths.append(path)
        if path.exists():
            continue
        cfg = load_config(preset, [f"method={method}", f"data.image_size={size}"])
        teacher = build_model(cfg.teacher.arch, ref["num_classes"], size)
        if role == "teacher":
            model, arch, plans = teacher, cfg.teacher.arch, []
        else:
            model, plans = build_student(cfg, ref["num_classes"], teacher)
            arch = cfg.student.arch
        save_checkpoint(make_payload(model.eval(), arch=arch, role=role, method=f"probe-{method}", num_classes=ref["num_classes"],
                                     image_size=size, classes=ref["classes"], mean=ref["mean"], std=ref["std"],
                                     width_mult=1.0, plans=plans, red_distance=cfg.red.distance, config=cfg.to_dict(),
                                     epoch=0, history=[], best_val=0.0), path)
    return paths


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
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
    add_stop_option(ap)
    add_page_options(ap, "<results>_run/, <results>/compare.json, <results>_deploy.json and <results>_probe<size>.json")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_args(argv)
    command = run_command(PROG, argv)
    if not a.pages_only:
        try:
            run_benchmark(a, deadline(a))
        except StopReached as e:
            return stopped("repro", e)
        copy_logs(a, Path(a.results + "_run"))
    write_results(a, command, page_command=" ".join([PROG, *map(shlex.quote, argv)]) if a.pages_only else None)
    return 0


def run_benchmark(a, until: Optional[float] = None) -> None:
    """Every step of the benchmark (finished ones are skipped), ending with ``redistill compare``."""
    cli = [sys.executable, "-m", "redistill.cli"]
    work = Path(a.runs) / a.prefix
    steps = Steps(work / "state.json", until)
    seeds = [int(s) for s in a.seeds.split(",")]
    common = [f"epochs={a.epochs}", f"out_dir={a.runs}", f"data.root={a.data_root}"]
    t_name = f"{a.prefix}-teacher"
    steps.run("train teacher", cli + ["distill", a.preset, "method=teacher", f"name={t_name}", f"seed={seeds[0]}", *common, "--resume"],
              work / "logs" / "teacher.log")
    teacher_ckpt = Path(a.runs) / t_name / "teacher" / "best.pt"
    names = []
    for seed in seeds:
        for m in student_methods():
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
        for ck in make_probes(work / f"probe{a.probe_size}", teacher_ckpt, a.probe_size, a.preset):
            out = Path(a.bundles) / f"{a.prefix}-probe{a.probe_size}-{ck.stem}-fp32"
            probe_bundles.append(str(out))
            steps.run(f"export probe {ck.stem}", cli + ["export", str(ck), "--target", "cpu", "--out", str(out),
                                                        "--data-root", a.data_root, "--eval-subset", "100"],
                      work / "logs" / f"export-probe-{ck.stem}.log")
    loopback = [sys.executable, "-m", "bench.loopback_bench"]
    steps.run("deploy (loopback)", loopback + [*bundles, "--reports", a.reports, "--out", a.results + "_deploy"],
              work / "logs" / "deploy.log")
    if probe_bundles:
        steps.run("deploy probes (loopback)", loopback + [*probe_bundles, "--reports", a.reports + "-probes",
                                                          "--out", a.results + f"_probe{a.probe_size}"],
                  work / "logs" / "deploy-probes.log")
    steps.state.pop("compare", None)  # always refresh the tables
    steps.run("compare", cli + ["compare", *[str(Path(a.runs) / n) for n in [t_name] + names], *bundles, a.reports,
                                "--out", a.results], work / "logs" / "compare.log")
    total = sum(v["seconds"] for v in steps.state.values() if v.get("done"))
    print(f"[repro] all steps done; {total / 60:.1f} min of step time in total (state: {steps.path})", flush=True)


# --- the page, from the run files -----------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path} not found ({what}); run the benchmark first, or give the --results/--prefix it used")
    return json.loads(path.read_text())


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _ratio(x, y):
    return (x / y) if x and y else None


def _label(method: str) -> str:
    return METHODS.get(method).label if method in METHODS else method


def _one(values, fmt=str) -> str:
    """One value when every network had the same, else each network's."""
    distinct = sorted({fmt(v) for v in values})
    if not distinct:
        return "n/a"
    return distinct[0] if len(distinct) == 1 else " / ".join(distinct)


def read_runs(run_copy: Path, prefix: str) -> Dict[str, dict]:
    """Each copied run's config, by run name (``<prefix>-teacher``, ``<prefix>-<method>-s<seed>``)."""
    runs = {p.name: yaml.safe_load((p / "config.yaml").read_text())
            for p in sorted(run_copy.glob(f"{prefix}-*")) if (p / "config.yaml").is_file()}
    if f"{prefix}-teacher" not in runs:
        raise UserError(f"{run_copy}/{prefix}-teacher/config.yaml not found: the run files of the benchmark are missing")
    return runs


def data_counts(run_copy: Path, state: Dict[str, dict]) -> Optional[Dict[str, int]]:
    """Train / val / test image counts from the teacher's step log (the trainer's ``data:`` line), if it has one."""
    log = (state.get("train teacher") or {}).get("log")
    path = run_copy / "logs" / Path(log).name if log else None
    if path is None or not path.is_file():
        return None
    m = re.search(r"(\d+) train, (\d+) val, (\d+) test images", path.read_text(errors="replace"))
    return dict(zip(("train", "val", "test"), map(int, m.groups()))) if m else None


def _setup(a, runs: Dict[str, dict], state: Dict[str, dict], dep: dict, run_copy: Path, has_probes: bool) -> List[str]:
    """The "Setup" bullets: every figure from the runs' configs, the state and the deploy record."""
    teacher = runs[f"{a.prefix}-teacher"]
    students = [c for n, c in runs.items() if n != f"{a.prefix}-teacher"]
    every = [teacher] + students
    argv = (state.get("train teacher") or {}).get("argv") or []
    preset = argv[argv.index("distill") + 1] if "distill" in argv else "?"
    red = next((c for c in students if METHODS.get(c["method"]).needs_sites), None) if students else None
    d = teacher["data"]
    counts = data_counts(run_copy, state)
    if counts:
        images = f"{counts['train']:,} training images ({counts['val']:,} held out for picking the best epoch), " \
                 f"{counts['test']:,} test images"
    else:
        n = f"{d['train_subset']:,}" if d["train_subset"] else "all"
        images = f"{n} training images ({d['val_fraction']:.0%} held out for picking the best epoch)"
    methods = sorted({c["method"] for c in students}, key=lambda m: METHODS.get(m).order)
    seeds = sorted({c["seed"] for c in students})
    optim = _one(every, lambda c: (f"{c['optim']['name']} lr {c['optim']['lr']:g}, {c['optim']['schedule']} schedule, "
                                   f"{c['optim']['warmup_epochs']:g} epoch warm-up, weight decay {c['optim']['weight_decay']:g}"))
    students = students or [teacher]
    rows = dep.get("results") or []
    lines = [
        f"- Pair: the `{preset}` preset, teacher `{teacher['teacher']['arch']}` and student `{teacher['student']['arch']}`"
        + (f" with {len(red['red']['sites'])} RED sites" if red else "") + ".",
        f"- Data: `{d['root']}` ({d['name']}) at {d['image_size']} px; {images}."
        + (f" Memory is also measured at {a.probe_size} px on probes of the same architectures (untrained weights: "
           "memory depends on shapes, not values)." if has_probes else ""),
        f"- Training: {_one(every, lambda c: str(c['epochs']))} epochs for every network (teacher, "
        + ", ".join(_label(m) for m in methods) + f"); {optim}; batch {_one(every, lambda c: str(c['data']['batch_size']))}, "
        f"augmentation {_one(every, lambda c: c['data']['augment'])}.",
        f"- Seeds: teacher {teacher['seed']}; every student method with seeds {', '.join(map(str, seeds))}. "
        "Means and spreads are over those seeds.",
        f"- Loss: {_one(students, lambda c: format(c['loss']['w_ce'], 'g'))} * cross-entropy + "
        f"{_one(students, lambda c: format(c['loss']['w_dist'], 'g'))} * the mean of the method's distillation losses; "
        + (f"RED alpha {red['red']['alpha']:g} with {red['red']['distance']} distance; " if red else "")
        + f"KD temperature {_one(students, lambda c: format(c['loss']['kd_temperature'], 'g'))}.",
        "- Measurement: each network exported to an FP32 bundle (ONNX verified against PyTorch) and deployed through "
        "the loopback deploy bench (ssh to an sshd on this machine, the on-device agent); backend "
        + _one(rows, lambda r: f"{r['backend']} ({', '.join(r.get('providers') or [])})") + ", precision "
        + _one(rows, lambda r: r["precision"]) + ", batch " + _one(rows, lambda r: str(r["batch"]))
        + "; latency and, in a separate process, activation memory."
        + (f" Deploy record: {dep['note']}." if dep.get("note") else ""),
    ]
    return lines


def _checks(facts: Dict[str, Optional[float]]) -> List[list]:
    """[target, result, met (None: not measured)] for each of TARGETS."""
    red, kd = facts["recovered_red"], facts["recovered_kd"]

    def x(v, fmt, test):
        return ["n/a", None] if v is None else [fmt.format(v), test(v)]

    return [
        [f"RED recovers >= {TARGETS['recovered']:.0%} of the teacher - student-alone gap",
         *x(red, "{:.0%}", lambda v: v >= TARGETS["recovered"])],
        ["... and more than KD", *(["n/a", None] if None in (red, kd) else [f"RED {red:.0%} vs KD {kd:.0%}", red > kd])],
        [f"student+RED theoretical peak >= {TARGETS['theory_ratio']:g}x below the teacher's",
         *x(facts["theory_ratio"], "{:.2f}x", lambda v: v >= TARGETS["theory_ratio"])],
        [f"measured activation memory >= {TARGETS['measured_ratio']:g}x below the teacher's",
         *x(facts["measured_ratio"], "{:.2f}x", lambda v: v >= TARGETS["measured_ratio"])],
        [f"measured / theoretical within {TARGETS['measured_over_theory']:g}x (student+RED)",
         *x(facts["measured_over_theory_student_red"], "{:.1f}x", lambda v: v <= TARGETS["measured_over_theory"])],
        [f"student+RED latency p50 at most 1/{TARGETS['latency_ratio']:g} of the teacher's",
         *x(facts["latency_ratio_red"], "{:.2f}x faster", lambda v: v >= TARGETS["latency_ratio"])],
    ]


def _verdict(ok) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def write_results(a, command: str, page_command: Optional[str] = None) -> dict:
    """``<results>.md/.json`` from the run files: the setup, timings, accuracy, memory and latency against TARGETS."""
    run_copy = Path(a.results + "_run")
    state = _read_json(run_copy / "state.json", "the benchmark's step record")
    cmp = _read_json(Path(a.results) / "compare.json", "redistill compare's output")
    dep = _read_json(Path(a.results + "_deploy.json"), "the loopback deploy record")
    probe_path = Path(a.results + f"_probe{a.probe_size}.json")
    probes = json.loads(probe_path.read_text())["results"] if a.probe_size and probe_path.is_file() else []
    old_path = Path(a.results + ".json")
    old = json.loads(old_path.read_text()) if page_command and old_path.is_file() else {}
    runs = read_runs(run_copy, a.prefix)
    teacher_cfg = runs[f"{a.prefix}-teacher"]
    size = teacher_cfg["data"]["image_size"]

    pairs = {r["method"]: r for r in cmp["pairs"]}
    deps = {r["bundle"].rstrip("/").split("/")[-1]: r for r in dep["results"]}
    t_dep = deps.get(f"{a.prefix}-teacher-fp32") or {}
    by_method = {m: [r for n, r in deps.items() if n.startswith(f"{a.prefix}-{m}-s")] for m in student_methods()}

    def avg(method, key):
        return _mean([(r.get("latency_ms") or {}).get("p50_ms") if key == "p50" else r.get(key) for r in by_method[method]])

    t_theory, t_act, t_p50 = t_dep.get("theoretical_peak_bytes"), t_dep.get("measured_activation_bytes"), \
        (t_dep.get("latency_ms") or {}).get("p50_ms")
    red_theory, red_act, red_p50 = avg("red", "theoretical_peak_bytes"), avg("red", "measured_activation_bytes"), avg("red", "p50")
    rec = {m: (pairs.get(m) or {}).get("recovered") for m in student_methods()}
    facts = {
        "recovered_red": rec.get("red"), "recovered_kd": rec.get("kd"), "recovered_red_kd": rec.get("red_kd"),
        "theory_ratio": _ratio(t_theory, red_theory), "measured_ratio": _ratio(t_act, red_act),
        "measured_over_theory_teacher": _ratio(t_act, t_theory), "measured_over_theory_student_red": _ratio(red_act, red_theory),
        "latency_ratio_red": _ratio(t_p50, red_p50), "latency_ratio_student": _ratio(t_p50, avg("student", "p50")),
    }
    checks = _checks(facts)
    order = sorted((m for m in cmp["models"] if m["top1"] and m["top1"].get("mean") is not None),
                   key=lambda m: -m["top1"]["mean"])
    total_s = sum(v["seconds"] for v in state.values() if v.get("done"))
    where = old.get("machine") or (dep.get("machine") if page_command else machine())
    teacher_arch = teacher_cfg["teacher"]["arch"]

    L = [f"# Reproduction benchmark: the {teacher_arch} pair on `{teacher_cfg['data']['root']}`", "",
         f"Command: `{command}` (resumable; run in the background)"
         + (f"; this page rewritten from the run files by `{page_command}`" if page_command else ""), "",
         f"Machine: {machine_line(where)}", "",
         f"Wall time: **{total_s / 60:.1f} min**, the sum of each step's own wall time "
         f"(`{run_copy.name}/state.json`).", "",
         "## Setup", "", *_setup(a, runs, state, dep, run_copy, bool(probes)), "",
         "## Accuracy (test top-1, %)", ""]
    L += md_table(["method", "n", "mean", "std", "min - max"],
                  [[_label(m["method"]), m["top1"].get("n"), f"{m['top1']['mean']:.2f}", f"{m['top1'].get('std') or 0:.2f}",
                    f"{m['top1'].get('min', m['top1']['mean']):.2f} - {m['top1'].get('max', m['top1']['mean']):.2f}"]
                   for m in order])
    L += [""] + md_table(["method", "recovered share of the teacher - student-alone gap"],
                         [[_label(m), f"{pairs[m]['recovered']:.0%} (gap {pairs[m]['gap']:.2f} points)"]
                          for m in student_methods() if (pairs.get(m) or {}).get("recovered") is not None])
    backend = _one(dep["results"], lambda r: f"{r['backend']} {', '.join(r.get('providers') or [])}".strip())
    rows = [("teacher", f"{size} px", t_theory, t_act, t_p50)]
    rows += [(f"{_label(m) if m == 'student' else 'student+' + _label(m)} (mean of seeds)", f"{size} px", avg(m, "theoretical_peak_bytes"), avg(m, "measured_activation_bytes"),
              avg(m, "p50")) for m in ("student", "red") if by_method.get(m)]
    probe_rows = []
    for pr in probes:
        name = pr["bundle"].rstrip("/").split("/")[-1].replace(f"{a.prefix}-probe{a.probe_size}-", "").replace("-fp32", "")
        probe_rows.append((f"{name} (probe)", f"{a.probe_size} px", pr["theoretical_peak_bytes"],
                           pr["measured_activation_bytes"], pr["latency_ms"]["p50_ms"]))
    rows += probe_rows
    L += ["", f"## Memory and latency ({backend}, batch {_one(dep['results'], lambda r: str(r['batch']))}, "
          f"{_one(dep['results'], lambda r: r['precision']).upper()})", ""]
    L += md_table(["network", "input", "theoretical peak (liveness)", "measured activation", "measured / theoretical", "latency p50"],
                  [[n, s, _b(th), _b(me), f"{_ratio(me, th) or 0:.1f}x", f"{p50 or 0:.3f} ms"] for n, s, th, me, p50 in rows])
    L += ["", "## Targets", ""] + md_table(["target", "result", "verdict"], [[n, v, _verdict(ok)] for n, v, ok in checks])
    L += ["", "## Reading (generated from the figures above)", "",
          "- Ordering by mean test top-1: " + " > ".join(f"{_label(m['method'])} ({m['top1']['mean']:.2f})" for m in order) + "."]
    if facts["recovered_red"] is not None:
        others = [f"{_label(m)} {rec[m]:.0%}" for m in student_methods() if m not in ("student", "red") and rec.get(m) is not None]
        L.append(f"- RED recovered {facts['recovered_red']:.0%} of the {pairs['red']['gap']:.2f}-point gap"
                 + (", " + ", ".join(others) if others else "") + ".")
    if facts["measured_over_theory_student_red"]:
        L.append(f"- Measured activation memory is {facts['measured_over_theory_teacher'] or 0:.1f}x the liveness peak for "
                 f"the teacher and {facts['measured_over_theory_student_red']:.1f}x for student+RED at {size} px"
                 + ("; at the probes' size: " + ", ".join(f"{n} {_ratio(me, th) or 0:.1f}x" for n, s, th, me, _ in probe_rows)
                    if probes else "") + ".")
        below = [n for n, _, th, me, _ in rows if th and me and me < th]
        if below:
            L.append("- Measured below the liveness peak: " + ", ".join(below) + ".")
    if facts["latency_ratio_red"]:
        L.append(f"- Latency: at {size} px the student+RED is {facts['latency_ratio_red']:.2f}x as fast as the teacher and "
                 f"the student alone {facts['latency_ratio_student'] or 0:.2f}x.")
    if facts["recovered_red"] is not None and facts["recovered_kd"] is not None:
        beat = "beat" if facts["recovered_red"] > facts["recovered_kd"] else "did not beat"
        L.append(f"- Accuracy: with {_one(runs.values(), lambda c: str(c['epochs']))} epochs at {size} px RED alone "
                 f"{beat} KD here.")
    L += remarks_section(a.remarks)
    L += ["", f"Files: `{Path(a.results).name}/compare.md` (full table, per-seed rows), `{Path(a.results).name}/*.png` "
          f"(plots), `{Path(a.results).name}_deploy.md`" + (f" and `{probe_path.name[:-5]}.md`" if probes else "")
          + f" (device measurements), `{run_copy.name}/` (each run's config, metrics and summaries, the step logs and "
          "state.json): every figure above is read from those."]
    atomic_write_text(a.results + ".md", "\n".join(L) + "\n")
    created = old.get("created") if page_command else timestamp()
    record = {"command": command, "machine": where, **({"created": created} if created else {}), "facts": facts,
              "targets": TARGETS, "checks": checks, "steps": state, "compare": str(Path(a.results) / "compare.json")}
    atomic_write_json(a.results + ".json", record)
    print(f"[repro] wrote {a.results}.md", flush=True)
    return record


def _b(n) -> str:
    return "n/a" if n is None else fmt_bytes(n)


def copy_logs(a, dest: Path) -> None:
    """Copy every run's config, metrics and summaries, the step logs and state.json (no checkpoints)."""
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
                atomic_write_text(dest / f.relative_to(work), clean_log(f.read_text(errors="replace")))
            else:
                shutil.copyfile(f, dest / f.relative_to(work))


if __name__ == "__main__":
    raise SystemExit(main())

"""The RED-vs-KD benchmark's variants and its page (``bench/results/red_vs_kd.{md,json}`` and plot), from run files.

Every figure comes from ``<results>_run/``: each step's config.yaml, summaries, metrics.jsonl, memory.json and
log, and state.json (settings, machine, wall time per step). ``python -m bench.red_vs_kd --pages-only`` rewrites
the page from them; judgement goes in the remarks file it includes.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from redistill.errors import UserError
from redistill.io import atomic_save_figure, atomic_write_json, atomic_write_text
from redistill.memory import fmt_bytes
from redistill.report import machine_line, md_table, remarks_section

#: the plot, beside the page
PAGE_PLOT = "{results}.png"
#: the issue's goals
TEACHER_GOAL = 80.0  # test top-1 (%)
RED_MARGIN = 1.0  # RED at least this many points above the better KD
RED_RECOVERED = 0.5  # ... and recovering at least this share of the teacher - student gap


@dataclass(frozen=True)
class Variant:
    """One student configuration of the benchmark: its method and what it sets beyond the preset."""

    name: str
    label: str
    method: str
    overrides: Tuple[str, ...]
    what: str  # one line for the page's setup table
    rate: str = "distill"  # which measured step rate (RATE_KINDS) its training runs at


VARIANTS: Tuple[Variant, ...] = (
    Variant("student", "student alone", "student", (), "cross-entropy only", "student"),
    Variant("kd", "KD (1:1)", "kd", (), "0.5 CE + 0.5 KD at T=4 (this project's form)"),
    Variant("kd_paper", "KD (paper recipe)", "kd", ("recipe=paper_kd",),
            "the paper's KD-baseline recipe: 0.1 CE + 0.9 KD at T=4, weight decay 5e-4, batch 64, lr/10 at 60/80/90 %",
            "distill_b64"),
    Variant("fitnet", "FitNet", "fitnet", (), "0.5 CE + 0.5 * 100 * hint MSE through a 1x1 regressor at each RED site"),
    Variant("at", "AT", "at", (), "0.5 CE + 0.5 * 1000 * attention-map loss summed over the RED sites"),
    Variant("red_a50", "RED alpha 50", "red", ("red.alpha=50",), "0.5 CE + 0.5 * mean over blocks of 50 * (1 - cos)"),
    Variant("red_a1", "RED alpha 1", "red", ("red.alpha=1",), "0.5 CE + 0.5 * mean over blocks of 1 * (1 - cos)"),
    Variant("red_kd_paper", "RED+KD (paper weighting)", "red_kd_paper", ("red.alpha=50",),
            "0.5 CE + 0.5 * mean of the 5 RED terms (alpha 50) and KD at T=2, as the paper's code weights it"),
)
#: optional: the student alone on the whole training split, to say what the subset cost
REFERENCE = Variant("reference", "student alone, whole training split", "student", ("data.train_subset=0",),
                    "as `student alone` on the whole training split (seed of the first student seed)", "student")
#: the RED variants alpha is chosen among (on the validation split), and the KD variants
RED_VARIANTS, KD_VARIANTS = ("red_a50", "red_a1"), ("kd", "kd_paper")


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _machines(state: Dict[str, Any]) -> List[str]:
    """The machine line, or one per machine when the runs were spread over several (sessions on other hosts)."""
    seen: Dict[str, List[str]] = {}
    for name, v in state.get("steps", {}).items():
        if v.get("done"):
            seen.setdefault(machine_line(v.get("machine") or state.get("machine")), []).append(name)
    if len(seen) <= 1:
        return [f"Machine: {machine_line(state.get('machine'))}"]
    return ["Machines (the runs were spread over several; compare their times only within one):", "",
            *[f"- {line}: {', '.join(names)}" for line, names in seen.items()]]


def _environment(copy: Path) -> List[str]:
    """The software and GPU a run elsewhere recorded (``environment.json``, from bench.red_vs_kd_gpu), if any."""
    if not (copy / "environment.json").is_file():
        return []
    e = _json(copy / "environment.json")
    return [f"Environment: torch {e.get('torch')}, CUDA {e.get('cuda')}, "
            + (f"{e.get('gpu')} ({e.get('gpu_memory_gib')} GiB; nvidia-smi: {e.get('nvidia_smi')})"
               if e.get("cuda_available") else "no GPU visible to torch") + "."]


def _history(path: Path) -> List[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _stats(xs: List[float]) -> Optional[Dict[str, float]]:
    if not xs:
        return None
    return {"n": len(xs), "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def read_step(folder: Path, stage: str) -> Optional[dict]:
    """One finished step's figures from its copied files (None when it has not finished)."""
    summ = folder / stage / "summary.json"
    if not summ.is_file():
        return None
    s, hist = _json(summ), _history(folder / stage / "metrics.jsonl")
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    log = (folder / "log.txt").read_text(errors="replace") if (folder / "log.txt").is_file() else ""
    m = re.search(r"(\d+) train, (\d+) val, (\d+) test images", log)
    return {"config": cfg, "test_top1": s["best"]["test_top1"], "test_top1_last": s["last"]["test_top1"],
            "best_epoch": s["best"]["epoch"], "test_images": s["best"]["test_images"],
            "val_top1": max((h["val_top1"] for h in hist if "val_top1" in h), default=None),
            "val_curve": [h.get("val_top1") for h in hist], "epochs": len(hist),
            "train_s": round(sum(h["train_time_s"] for h in hist), 1),
            "images_per_s": statistics.median([h["train_images_per_s"] for h in hist]) if hist else None,
            "peak_bytes": _json(folder / "memory.json")["peak_bytes"] if (folder / "memory.json").is_file() else None,
            "counts": dict(zip(("train", "val", "test"), map(int, m.groups()))) if m else None}


def build(results: str) -> Dict[str, Any]:
    """Every figure of the page from ``<results>_run/``."""
    copy = Path(results + "_run")
    if not (copy / "state.json").is_file():
        raise UserError(f"{copy}/state.json not found: run the benchmark first (python -m bench.red_vs_kd), or give "
                        "the --results it used")
    state = _json(copy / "state.json")
    settings, steps = state["settings"], state.get("steps", {})
    teacher = read_step(copy / "teacher", "teacher")
    names = [v.name for v in VARIANTS if v.name in settings["variants"]] + (["reference"] if settings["reference"] else [])
    known = {v.name: v for v in (*VARIANTS, REFERENCE)}
    rows: Dict[str, dict] = {}
    for name in names:
        v = known[name]
        seeds = settings["seeds"][:1] if v is REFERENCE else settings["seeds"]
        runs = {seed: read_step(copy / (name if v is REFERENCE else f"{name}-s{seed}"), "student") for seed in seeds}
        done = {k: r for k, r in runs.items() if r}
        step_s = [steps[n]["seconds"] for n in ([name] if v is REFERENCE else [f"{name}-s{s}" for s in seeds])
                  if steps.get(n, {}).get("done")]
        rows[name] = {"label": v.label, "method": v.method, "what": v.what, "planned": len(seeds), "runs": done,
                      "test": _stats([r["test_top1"] for r in done.values()]),
                      "val": _stats([r["val_top1"] for r in done.values() if r["val_top1"] is not None]),
                      "peak_bytes": next((r["peak_bytes"] for r in done.values() if r["peak_bytes"]), None),
                      "step_s": statistics.fmean(step_s) if step_s else None,
                      "train_s": statistics.fmean([r["train_s"] for r in done.values()]) if done else None}
    by_step = {"teacher": teacher, **{(n if known[n] is REFERENCE else f"{n}-s{seed}"): r
                                      for n, row in rows.items() for seed, r in row["runs"].items()}}
    px = settings.get("image_size") or (teacher or {}).get("config", {}).get("data", {}).get("image_size") or 64
    return {"state": state, "teacher": teacher, "rows": rows, "by_step": by_step, "facts": _facts(teacher, rows),
            "px": px}


def _mean(rows, name) -> Optional[float]:
    r = rows.get(name)
    return r["test"]["mean"] if r and r["test"] else None


def _facts(teacher: Optional[dict], rows: Dict[str, dict]) -> Dict[str, Any]:
    """The answer: RED with alpha picked on validation against the better KD (by test mean), and the gap shares."""
    t, alone = (teacher or {}).get("test_top1"), _mean(rows, "student")
    gap = t - alone if t is not None and alone is not None else None
    reds = [n for n in RED_VARIANTS if rows.get(n) and rows[n]["val"]]
    red = max(reds, key=lambda n: (rows[n]["val"]["mean"], n == "red_a50")) if reds else None
    kds = [n for n in KD_VARIANTS if _mean(rows, n) is not None]
    kd = max(kds, key=lambda n: _mean(rows, n)) if kds else None
    recovered = {n: (_mean(rows, n) - alone) / gap for n in rows if gap and _mean(rows, n) is not None}
    f = {"teacher_top1": t, "student_top1": alone, "gap": gap, "recovered": recovered, "red": red, "kd": kd,
         "red_top1": _mean(rows, red) if red else None, "kd_top1": _mean(rows, kd) if kd else None}
    f["red_minus_kd"] = f["red_top1"] - f["kd_top1"] if red and kd else None
    if red and kd:
        a, b = rows[red]["test"], rows[kd]["test"]
        f["ranges_overlap"] = a["min"] <= b["max"] and b["min"] <= a["max"]
    return f


def _checks(f: Dict[str, Any], rows) -> List[list]:
    def verdict(ok):
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    t = f["teacher_top1"]
    red, kd = f["red"], f["kd"]
    out = [[f"teacher >= {TEACHER_GOAL:g} % test top-1", "n/a" if t is None else f"{t:.2f} %",
            verdict(None if t is None else t >= TEACHER_GOAL)]]
    d = f["red_minus_kd"]
    out.append([f"RED (alpha chosen on validation) >= the better KD + {RED_MARGIN:g} point",
                "n/a" if d is None else f"{rows[red]['label']} {f['red_top1']:.2f} vs {rows[kd]['label']} "
                f"{f['kd_top1']:.2f}: {d:+.2f}", verdict(None if d is None else d >= RED_MARGIN)])
    rec = f["recovered"].get(red) if red else None
    out.append([f"RED recovers >= {RED_RECOVERED:.0%} of the teacher - student gap",
                "n/a" if rec is None else f"{rec:.0%} of {f['gap']:.2f} points", verdict(None if rec is None else rec >= RED_RECOVERED)])
    return out


def _fmt(st: Optional[dict], key: str = "mean") -> str:
    return "n/a" if not st else f"{st[key]:.2f}"


def plot(record: Dict[str, Any], path: Path) -> Path:
    """Mean test top-1 (error bars: std over seeds) against the theoretical peak of each variant and the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    t = record["teacher"]
    if t and t["peak_bytes"]:
        ax.scatter([t["peak_bytes"] / 1024], [t["test_top1"]], marker="s", color="k", label="teacher")
    for i, (name, r) in enumerate(record["rows"].items()):
        if r["test"] and r["peak_bytes"]:
            x = r["peak_bytes"] / 1024 * (1 + 0.012 * (i - len(record["rows"]) / 2))  # spread points of one peak
            ax.errorbar([x], [r["test"]["mean"]], yerr=[r["test"]["std"]], fmt="o", capsize=3, label=r["label"])
    ax.set_xscale("log")
    ax.set_xlabel(f"theoretical peak activation memory (KiB, liveness, FP32, batch 1, {record['px']} px; "
                  "points of one peak spread)")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(f"RED vs KD at {record['px']} px: accuracy against peak memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return atomic_save_figure(fig, path)


def write_results(a) -> List[Path]:
    """``<results>.md/.json`` and the plot from the run files (the same page whether the benchmark or
    ``--pages-only`` writes it); returns the paths written."""
    record = build(a.results)
    state, rows, f, t = record["state"], record["rows"], record["facts"], record["teacher"]
    s = state["settings"]
    command = state.get("command", "python -m bench.red_vs_kd")
    page_command = " ".join(["python -m bench.red_vs_kd --pages-only --results", a.results]
                            + (["--remarks", a.remarks] if getattr(a, "remarks", None) else []))
    plot_path = Path(PAGE_PLOT.format(results=a.results))
    done = [n for n, v in state.get("steps", {}).items() if v.get("done")]
    planned = 1 + sum(r["planned"] for r in rows.values())
    total_s = sum(state["steps"][n]["seconds"] for n in done)
    jobs = max((state["steps"][n].get("jobs", 1) for n in done), default=1)
    px = record["px"]
    L = [f"# RED vs KD at {px} px: `{s['preset']}` with a strong teacher", "",
         f"Command: `{command}` (resumable" + ("; each finished run committed as it finished)" if "--commit" in command
                                              else ")") + f"; the page is rewritten from the run files by `{page_command}`.",
         "",
         *_machines(state), *_environment(Path(a.results + "_run")), "",
         f"Machine time: **{total_s / 3600:.2f} h**, the sum of the finished runs' wall time over their attempts "
         f"({len(done)} of {planned} planned runs finished; `{Path(a.results).name}_run/state.json`)"
         + (f"; students ran up to {jobs} at once (`--jobs`), sharing the machine, so a run's wall time is not "
            "its own machine time and the sum exceeds the elapsed time." if jobs > 1 else "."), "",
         "## Does RED beat KD here?", ""]
    L += md_table(["target", "result", "verdict"], _checks(f, rows))
    if f["red"] and f["kd"]:
        r, k = rows[f["red"]], rows[f["kd"]]
        picks = ", ".join(f"{rows[n]['label']} val top-1 {rows[n]['val']['mean']:.2f}" for n in RED_VARIANTS
                          if rows.get(n) and rows[n]["val"])
        L += ["", f"RED's alpha is picked on the validation split: {picks}; "
              f"the better KD is the one with the higher mean test top-1 (the stricter bar for RED). "
              f"{r['label']}: {r['test']['mean']:.2f} ± {r['test']['std']:.2f} ({r['test']['n']} seeds, "
              f"{r['test']['min']:.2f} - {r['test']['max']:.2f}); {k['label']}: {k['test']['mean']:.2f} ± "
              f"{k['test']['std']:.2f} ({k['test']['n']} seeds, {k['test']['min']:.2f} - {k['test']['max']:.2f}); "
              f"the seeds' ranges {'overlap' if f['ranges_overlap'] else 'do not overlap'}."]
    L += ["", "## Setup", "", *_setup(a, record), "", "## Accuracy (test top-1 %, the epoch picked on the validation split)", ""]
    L += md_table(["variant", "seeds", "mean", "std", "min - max", "val top-1 (mean)", "gap recovered", "peak memory",
                   "machine time per run"],
                  [[r["label"], f"{r['test']['n'] if r['test'] else 0}/{r['planned']}", _fmt(r["test"]),
                    _fmt(r["test"], "std"), f"{_fmt(r['test'], 'min')} - {_fmt(r['test'], 'max')}", _fmt(r["val"]),
                    f"{f['recovered'][n]:.0%}" if n in f["recovered"] else "n/a",
                    fmt_bytes(r["peak_bytes"]) if r["peak_bytes"] else "n/a",
                    f"{r['step_s'] / 60:.1f} min" if r["step_s"] else "n/a"] for n, r in rows.items()])
    L += ["", f"Gap: teacher {_num(f['teacher_top1'])} - student alone {_num(f['student_top1'])} = {_num(f['gap'])} "
          "points; a variant's share is (its mean - student alone) / gap. Peak memory: the theoretical liveness peak "
          f"of the student as exported (RED blocks included), FP32, batch 1, {px} px, exact to the byte (`redistill "
          "memory`); not measured on a device. Machine time: wall time of the run's `redistill distill` process "
          "(training, validation every epoch, the test set twice, the memory analysis)."]
    L += ["", f"![accuracy against peak memory]({plot_path.name})", "", "## Teacher", ""]
    L += _teacher(t)
    L += ["", "## What the subset and epochs cost", "", *_cost(record), "",
          "## Machine time per run", ""]
    L += ["Wall time sums a run's attempts that ended (finished or failed); an attempt ended with its session "
          "records none, so a run of several attempts may read short (its training column sums every epoch).", ""]
    L += md_table(["run", "wall time", "training (sum of epochs)", "estimated", "load (1 min) at start", "attempts"],
                  [[n, f"{v['seconds'] / 60:.1f} min", _train_s(record, n), f"{v.get('estimate_s', 0) / 60:.1f} min",
                    f"{v.get('load_1min_at_start', 0):.2f}", v.get("attempts", 1)]
                   for n, v in state["steps"].items() if v.get("done")])
    L += ["", "## What this benchmark cannot tell", "", *_cannot(record)]
    L += remarks_section(getattr(a, "remarks", None))
    L += ["", f"Files: `{Path(a.results).name}_run/` (each run's config, metrics, summaries, log and memory figure; "
          "state.json; the teacher's weights): every figure above is read from those."]
    md, js = Path(a.results + ".md"), Path(a.results + ".json")
    atomic_write_text(md, "\n".join(L) + "\n")
    atomic_write_json(js, {"command": command, "machine": state.get("machine"), "created": state.get("created"),
                           "settings": s, "facts": f, "checks": _checks(f, rows),
                           "variants": {n: {k: r[k] for k in ("label", "method", "test", "val", "peak_bytes", "step_s", "train_s")}
                                        for n, r in rows.items()}})
    plot(record, plot_path)
    print(f"[red_vs_kd] wrote {md}", flush=True)
    return [md, js, plot_path]


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _train_s(record, name: str) -> str:
    r = record["by_step"].get(name)
    return f"{r['train_s'] / 60:.1f} min" if r else "n/a"


def _setup(a, record) -> List[str]:
    s, t, rows = record["state"]["settings"], record["teacher"], record["rows"]
    any_run = next((r for row in rows.values() for r in row["runs"].values()), None)
    sites = next((len(r["config"]["red"]["sites"]) for row in rows.values() for r in row["runs"].values()
                  if r["config"]["red"]["sites"]), None)
    lines = []
    if t:
        c, d = t["config"], t["config"]["data"]
        counts = t["counts"]
        lines.append(f"- Pair: teacher `{c['teacher']['arch']}`, student `{c['student']['arch']}`; "
                     f"`{d['root']}` ({d['name']}) at {d['image_size']} px"
                     + (f", {counts['test']:,} test images (the whole test split)" if counts else "") + ".")
        o = c["optim"]
        lines.append(f"- Teacher: trained once, seed {c['seed']}, {_n(c['epochs'], 'epoch')} on "
                     + (f"{counts['train']:,} training images ({counts['val']:,} held out to pick the epoch)" if counts
                        else "the whole training split") + f"; {o['name']} lr {o['lr']:g}, {o['schedule']} schedule, "
                     f"{o['warmup_epochs']:g} epoch warm-up, weight decay {o['weight_decay']:g}, batch "
                     f"{d['batch_size']}, augmentation {d['augment']}, "
                     + (f"CutMix {d['cutmix']:g} / MixUp {d['mixup']:g}" if d["cutmix"] or d["mixup"] else "no CutMix/MixUp")
                     + ". Every student reads its weights.")
    if any_run:
        c, d, o = any_run["config"], any_run["config"]["data"], any_run["config"]["optim"]
        counts = any_run["counts"]
        lines.append(f"- Students: recipe `{c['recipe']}` (train/recipes.py), {_n(c['epochs'], 'epoch')} on "
                     + (f"{counts['train']:,} training images ({counts['val']:,} held out to pick the epoch)"
                        if counts else f"a balanced subset of {d['train_subset']:,} training images")
                     + f": {o['name']} lr {o['lr']:g}, momentum {o['momentum']:g}, weight decay {o['weight_decay']:g}, "
                     f"{o['schedule']} schedule (x{o['gamma']:g} at {', '.join(f'{m:.0%}' for m in o['milestones'])}), "
                     f"batch {d['batch_size']}, augmentation {d['augment']}, CutMix {d['cutmix']:g} / MixUp "
                     f"{d['mixup']:g} (one per batch; the teacher sees the mixed images)"
                     + (f"; {sites} RED sites (`sites: auto`), where FitNet and AT tap the same tensors" if sites else "")
                     + ".")
    lines.append(f"- Seeds: students {', '.join(map(str, s['seeds']))}; means and spreads (sample std) over those.")
    if s.get("overrides"):
        lines.append(f"- Every run (teacher and students) also sets {', '.join(f'`{o}`' for o in s['overrides'])}.")
    lines += ["", *md_table(["variant", "method", "what it trains with"],
                            [[r["label"], f"`{r['method']}`", r["what"]] for r in rows.values()])]
    return lines


def _teacher(t: Optional[dict]) -> List[str]:
    if not t:
        return ["Not trained yet."]
    return [f"Test top-1 {t['test_top1']:.2f} % (epoch {t['best_epoch']} of {t['epochs']}, picked on the validation "
            f"split; last epoch {t['test_top1_last']:.2f} %), {t['train_s'] / 60:.1f} min of training at a median "
            f"{t['images_per_s']:.0f} images/s; theoretical peak {fmt_bytes(t['peak_bytes']) if t['peak_bytes'] else 'n/a'}.",
            "", "Validation top-1 by epoch: " + ", ".join(f"{v:.2f}" for v in t["val_curve"] if v is not None) + "."]


def _cost(record) -> List[str]:
    t, rows, s = record["teacher"], record["rows"], record["state"]["settings"]
    out = []
    if t and len([v for v in t["val_curve"] if v is not None]) >= 2:
        vc = [v for v in t["val_curve"] if v is not None]
        k = min(3, len(vc) - 1)
        out.append(f"- Teacher: validation top-1 rose {vc[-1] - vc[-1 - k]:+.2f} points over its last {k} epochs "
                   f"({vc[-1 - k]:.2f} -> {vc[-1]:.2f}).")
    alone, ref = rows.get("student"), rows.get("reference")
    if alone and alone["test"] and ref and ref["test"]:
        out.append(f"- Students: the student alone reached {ref['test']['mean']:.2f} % on the whole training split and "
                   f"{alone['test']['mean']:.2f} % on the {s['train_subset']:,}-image subset with the same epochs "
                   f"({ref['test']['mean'] - alone['test']['mean']:+.2f} points for the whole split).")
    elif s["reference"]:
        out.append("- Students: the reference run (student alone on the whole training split) has not finished.")
    else:
        out.append("- Students: no reference run was planned (`--reference`), so the subset's cost is not measured.")
    out.append(f"- Scale: each student trained {_n(s['epochs'], 'epoch')} on "
               + (f"{s['train_subset']:,}" if s["train_subset"] else "all the") + " training images; the "
               "paper trains 300 epochs at 128 px (STL10).")
    return out


def _cannot(record) -> List[str]:
    s = record["state"]["settings"]
    n = len(s["seeds"])
    return [f"- With {n} seed{'s' if n != 1 else ''} per variant the spread is a rough figure: a difference smaller than "
            "the seeds' own range is not resolved.",
            f"- One teacher, one pair (MobileNetV3-small x4), one data set (CIFAR-10 upsampled to {record['px']} px, JPEG): not the "
            "paper's STL10 at 128 px, nor its 300 epochs.",
            "- RED's alpha is chosen among 50 and 1 only; FitNet's and AT's weights are the paper zoo's defaults, untuned.",
            "- Peak memory is the theoretical liveness peak; nothing here is measured on a device."]

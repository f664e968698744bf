"""The step-speed results page, computed from the run record alone (``render_markdown(doc)``)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from redistill.report import machine_line, md_table, remarks_section

SLOWDOWN_MAX = 2.5  # target: a training epoch beside a CPU-heavy process at most this much slower than alone


def images_per_s(side: Dict[str, Any], batch: int) -> Dict[int, float]:
    """Images per second of each timed round, by round number."""
    return {r["round"]: r["steps"] * batch / r["seconds"] for r in side["rounds"] if r["seconds"] > 0}


def spread(xs: Sequence[float]) -> Optional[Tuple[float, float, float]]:
    """(median, min, max), or None without values."""
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def paired(a: Dict[int, float], b: Dict[int, float]) -> List[float]:
    """a / b of each round both sides finished (the two were timed back to back)."""
    return [a[r] / b[r] for r in sorted(set(a) & set(b)) if b[r] > 0]


def speedup(a: Dict[int, float], b: Dict[int, float]) -> Optional[Dict[str, float]]:
    """median(a) / median(b), with the range of the per-round ratios."""
    if not a or not b:
        return None
    ratios = paired(a, b)
    return {"ratio": statistics.median(a.values()) / statistics.median(b.values()),
            "low": min(ratios) if ratios else math.nan, "high": max(ratios) if ratios else math.nan}


def _ips_cell(ips: Dict[int, float]) -> str:
    s = spread(list(ips.values()))
    return f"{s[0]:.0f} ({s[1]:.0f}-{s[2]:.0f})" if s else "-"


def _ratio_cell(sp: Optional[Dict[str, float]]) -> str:
    if sp is None:
        return "-"
    return f"{sp['ratio']:.2f}x ({sp['low']:.2f}-{sp['high']:.2f})"


def _mark(met: Optional[bool]) -> str:
    return "-" if met is None else "met" if met else "**missed**"


def steady_step_s(side: Dict[str, Any]) -> Optional[float]:
    """Median seconds per step over the timed rounds."""
    xs = [r["seconds"] / r["steps"] for r in side["rounds"] if r["steps"]]
    return statistics.median(xs) if xs else None


def compile_cost(pair: Dict[str, Any], label: str) -> Optional[Dict[str, Any]]:
    """For a side with ``compile`` on: the warm-up time above its steady step (the compile), and the steps after
    which it pays against the side with the same settings but compile off (when that side was timed)."""
    side = pair["sides"][label]
    if not side["settings"].get("compile") or not side["rounds"]:
        return None
    steady = steady_step_s(side)
    cost = sum(max(0.0, t - steady) for t in side["warmup_s"])
    want = dict(side["settings"], compile=False)
    twin = next((lab for lab, s in pair["sides"].items()
                 if s["kind"] == "ours" and s["settings"] == want and s["rounds"]), None)
    out = {"compile_s": cost, "against": twin, "break_even_steps": None}
    if twin:
        gain = steady_step_s(pair["sides"][twin]) - steady
        out["gain_s"] = gain
        out["break_even_steps"] = math.ceil(cost / gain) if gain > 0 else "never"
    return out


def _settings_cell(settings: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "(trainer defaults)"


def pair_rows(doc: Dict[str, Any]) -> List[List[str]]:
    """The headline table: paper against our trainer's default step, per pair."""
    rows = []
    for key, p in doc["pairs"].items():
        ours = p["sides"].get("default")
        paper = p["sides"].get("paper")
        o = images_per_s(ours, p["batch"]) if ours else {}
        q = images_per_s(paper, p["batch"]) if paper else {}
        sp = speedup(o, q)
        target = p.get("target")
        met = None if sp is None or target is None else sp["ratio"] >= target
        why = p.get("paper_skipped") or (paper or {}).get("error")
        rows.append([p["preset"], p["image_size"], p["batch"], _ips_cell(q) if q else f"skipped: {why}" if why else "-",
                     _ips_cell(o), _ratio_cell(sp), f">= {target}x" if target else "-", _mark(met)])
    return rows


def variant_rows(p: Dict[str, Any]) -> List[List[str]]:
    rows = []
    base = images_per_s(p["sides"]["baseline"], p["batch"]) if "baseline" in p["sides"] else {}
    for label, side in p["sides"].items():
        ips = images_per_s(side, p["batch"])
        info = side.get("info") or {}
        cc = compile_cost(p, label)
        threads = sorted({r["threads"] for r in side["rounds"]})
        if side.get("error") and not ips:
            rows.append([label, _settings_cell(side["settings"]) if side["kind"] == "ours" else "the paper's code",
                         f"failed: {side['error']}", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([
            label, _settings_cell(side["settings"]) if side["kind"] == "ours" else "the paper's code",
            _ips_cell(ips), _ratio_cell(speedup(ips, base)) if base and label != "baseline" else "-",
            ",".join(map(str, threads)) or "-",
            f"{info['trainable_params']:,}" if info.get("trainable_params") else "-",
            f"{info['build_s']:.1f}" if info.get("build_s") is not None else "-",
            f"{side['warmup_s'][0]:.2f}" if side["warmup_s"] else "-",
            "-" if cc is None else f"{cc['compile_s']:.1f} s; pays after "
            + (f"{cc['break_even_steps']} steps" if isinstance(cc["break_even_steps"], int)
               else "never (no gain over " + str(cc["against"]) + ")" if cc["break_even_steps"] == "never"
               else "? (no compile-off twin timed)"),
        ])
    return rows


def contention_rows(doc: Dict[str, Any]) -> List[List[str]]:
    rows = []
    runs = doc.get("contention", {})
    for key, rec in runs.items():
        if rec.get("neighbour") is None:
            continue
        alone = runs.get(f"{rec['setting']}/alone")
        ok = alone and "images_per_s" in alone and "images_per_s" in rec
        slow = alone["images_per_s"] / rec["images_per_s"] if ok else None
        rows.append([rec["setting"], rec["neighbour"],
                     f"{alone['images_per_s']:.0f} ({alone['train_time_s']:.1f} s)" if ok else "-",
                     f"{rec['images_per_s']:.0f} ({rec['train_time_s']:.1f} s)" if ok else rec.get("error", "-"),
                     f"{slow:.2f}x" if slow else "-", _mark(None if slow is None else slow <= SLOWDOWN_MAX),
                     f"{_or(alone and alone.get('threads_at_end'))} / {_or(rec.get('threads_at_end'))}",
                     rec.get("neighbour_rate") or "-"])
    return rows


def _or(value: Any) -> str:
    return "-" if value is None else str(value)


def load_rows(doc: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for kind in ("pairs", "contention"):
        for key, rec in doc.get(kind, {}).items():
            load = rec.get("load") or {}
            busy = "; ".join(f"{b['command'][:60]} ({b['cpu_percent']} %)" for b in load.get("busy", [])) or "none"
            rows.append([f"{kind} {key}", rec.get("started", "-"),
                         " / ".join(f"{x:.2f}" for x in load.get("loadavg", [])), busy])
    return rows


def _pair_facts(p: Dict[str, Any]) -> str:
    """RED blocks and optimizer of each side, from the workers' own accounts."""
    out = []
    for label in ("paper", "default"):
        info = (p["sides"].get(label) or {}).get("info") or {}
        if info:
            opt = f"{info.get('optim') or info.get('optimizer')} lr {info['lr']}" if info.get("lr") \
                else info.get("optimizer")
            out.append(f"{'paper' if label == 'paper' else 'ours'}: {info.get('red_blocks')} RED blocks, {opt}")
    return "; ".join(out) or "no side started"


def _shortest_round(doc: Dict[str, Any]) -> str:
    xs = [r["seconds"] for p in doc["pairs"].values() for side in p["sides"].values() for r in side["rounds"]]
    return f"{min(xs):.2f} s" if xs else "-"


def render_markdown(doc: Dict[str, Any], remarks: Optional[str] = None) -> str:
    """The page, from the ``.json`` record alone."""
    s, paper = doc["setup"], doc["paper"]
    if paper.get("digest"):
        where = (f"git commit {paper['commit']}" + (" (uncommitted changes)" if paper.get("dirty") else "")
                 if paper.get("commit") else "source folder, no git metadata")
        code = f"`{paper['folder']}`, {where}; sha256 of its model, RED and training-loop files {paper['digest'][:16]}"
    else:
        code = f"skipped: {paper['why']}"
    lines = ["# Distillation step speed: this project's trainer step against the paper's own code", "",
             f"Command: `{doc['command']}`", "", f"Machine: {machine_line(doc['machine'])}.", "",
             f"Paper code: {code}.", "",
             f"Threads: {s['threads']} intra-op threads set in every process (both sides)"
             + (f", {' and '.join(s['thread_env_removed'])} removed from their environment"
                if s.get("thread_env_removed") else "")
             + "; the `threads` columns show what each side ran with at the end of its rounds (the adaptive setting "
             "may change it).", "",
             "## What is timed", "",
             f"- **The same pairs and inputs**: each preset's teacher and student with its RED blocks, untrained, at "
             f"the image size and batch below (each pair's section gives both sides' block and parameter counts and "
             f"optimizers); {s['pool']} seeded synthetic batches (normal images, uniform labels over 10 classes, seed "
             f"{s['seed']}) cycled, identical on both sides; on the CPU.",
             "- **The paper's step**: its `RunManager.distillation` (base/utils/run_manager.py) over the round's "
             "batches, each passed through its `train_loader`'s CutMix/MixUp first: ReED forward (frozen teacher, "
             "student with RED blocks), 0.5 CE + 0.5 RED, backward, SGD step, `loss.item()` and its tqdm bar.",
             "- **This project's step**: the trainer's step (" + ", ".join(sorted(
                 {(x.get('info') or {}).get('step_source', '?') for p in doc['pairs'].values()
                  for x in p['sides'].values() if x['kind'] == 'ours'}) or ["-"]) + ") on the same batches: "
             "CutMix/MixUp as configured, teacher, student, 0.5 CE + 0.5 RED, backward, optimizer step.",
             f"- **Rounds**: every side runs in its own process; after {s['warmup']} warm-up steps (timed one by one, "
             f"then discarded), {s['rounds']} rounds in which each side runs the same number of steps in turn, the "
             "order rotated every round (interleaved, so a change of machine load hits all sides alike).",
             f"- **images/s** = batch x steps of a round / its wall time (`time.perf_counter`, resolution "
             f"{s['clock_resolution_s']:.0e} s; the shortest round took {_shortest_round(doc)}): median over rounds "
             "(min-max). "
             "A speed-up is the ratio of medians (the range of the ratios of rounds timed back to back).",
             f"- **Each change on its own**: {s['ablation_what']}",
             "- **compile**: the warm-up time above the steady step is the compile time; it pays after that time "
             "divided by the per-step gain over the same settings with compile off.", ""]
    if s.get("left_out"):
        lines += [f"Changes not timed (this checkout's runtime section lacks them): {', '.join(s['left_out'])}.", ""]
    lines += ["## This project's step against the paper's", ""]
    lines += md_table(["pair", "px", "batch", "paper img/s", "ours (trainer default) img/s", "speed-up", "target",
                       "result"], pair_rows(doc)) if doc["pairs"] else ["(no pair measured)"]
    for key, p in doc["pairs"].items():
        lines += ["", f"### {p['preset']}, {p['image_size']} px, batch {p['batch']}: each change on its own", "",
                  f"`{p['teacher']}` -> `{p['student']}`; paper config `{p.get('paper_config') or '-'}`; "
                  f"{_pair_facts(p)}; {p.get('steps_per_round', 0)} steps per round; part took {p['seconds']:.0f} s."
                  + "".join(f" Not timed on its own here: {k} ({why})." for k, why in p.get("left_out", {}).items()),
                  ""]
        lines += md_table(["side", "runtime settings", "img/s", "vs baseline", "threads", "trainable params",
                           "start (s)", "first step (s)", "compile"], variant_rows(p))
        resolved = ((p["sides"].get("default") or {}).get("info") or {}).get("resolved_runtime")
        if resolved:
            keys = [k for k in resolved if k in s["switches"] or k == "adaptive"]
            lines += ["", "`default` resolved here to: " + ", ".join(f"{k}={resolved[k]}" for k in keys) + "."]
    lines += ["", "## A training epoch beside a CPU-heavy process", ""]
    c = doc.get("contention_setup")
    if c:
        lines += [f"`redistill distill {c['preset']}` for one student epoch ({c['what']}), in a new process, "
                  "timed by the trainer itself (the epoch's training loop, data loading included; validation and "
                  "test excluded), alone and then beside the neighbour process, once per thread setting. "
                  "Neighbours: " + "; ".join(f"`{k}` = {v}" for k, v in c["neighbours"].items()) + ". "
                  f"Target: at most {SLOWDOWN_MAX}x slower than alone.", ""]
        lines += md_table(["runtime.threads", "neighbour", "alone img/s (epoch)", "beside img/s (epoch)", "slowdown",
                           f"<= {SLOWDOWN_MAX}x", "threads at the end (alone / beside)", "neighbour's own rate"],
                          contention_rows(doc))
        notes = sorted({r["note"] for r in doc["contention"].values() if r.get("note")})
        lines += ["", *[f"Note: {n}." for n in notes]] if notes else []
    else:
        lines.append("(not measured)")
    lines += ["", "## What else ran on the machine", "",
              "At the start of each part: the 1/5/15-minute load averages and every other process that used at least "
              "10 % of a core over one second.", ""]
    lines += md_table(["part", "started", "load average", "other busy processes"], load_rows(doc))
    lines += remarks_section(remarks)
    lines += ["", "## Runs", ""]
    lines += [f"- `{r['command']}` at {r['created']}: {', '.join(r['parts']) or 'nothing new'} in {r['seconds']:.0f} s"
              for r in doc["runs"]]
    return "\n".join(lines) + "\n"

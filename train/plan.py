"""``redistill plan``: the students of a teacher's family that fit an activation-memory budget.

Every student schedule moves strides earlier than the teacher's (its running stride never behind the teacher's,
the total unchanged); each gets its RED blocks by the paper's rule (``train.red.auto_sites``) and is sized by
``train.plan_memory``. The fitting ones are ranked by the MACs of their own layers, the Pareto front of peak
against those MACs is marked, and the first is written out as a preset that ``redistill distill`` runs.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import yaml
from torch import nn

from redistill.errors import UserError
from redistill.io import atomic_save_figure
from redistill.memory import DTYPES, fmt_bytes
from redistill.report import timestamp
from train.config import load_config, paper_pairs, presets
from train.design import analyze_model, export_for_analysis
from train.models import FAMILIES, ArchName, build_model, parse_arch
from train.plan_memory import Figures, ScheduleAnalyzer
from train.red import auto_sites, insert_red_blocks, plan_sites

#: budget units: decimal (SI) and binary
UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_FORMS = ("bytes (1048576) or a number with a unit: B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB (powers of 1024), "
          "e.g. 1MiB, 1.5MB, 900KiB")


def parse_budget(text: str) -> int:
    """Bytes from ``1048576``, ``1MiB``, ``1.5MB``, ``900 KiB`` ...; anything else is refused naming the forms."""
    m = _BUDGET.match(str(text))
    unit = m.group(2).lower() if m else ""
    if not m or (unit and unit not in UNITS):
        raise UserError(f"budget {text!r} not understood: give {_FORMS}")
    value = int(float(m.group(1)) * UNITS.get(unit, 1))
    if value < 1:
        raise UserError(f"budget {text!r} is below one byte: give {_FORMS}")
    return value


def student_schedules(teacher: ArchName) -> List[ArchName]:
    """Every schedule of the teacher's family with strides moved earlier: the same total stride, a running stride
    never below the teacher's, stage strides up to the teacher's largest (at least 2); the teacher's own left out."""
    digits = (teacher.stem,) + teacher.strides
    total, running = 1, []
    for d in digits:
        total *= d
        running.append(total)
    stage_max = max(2, *teacher.strides)
    found: List[tuple] = []

    def extend(prefix: tuple, product: int) -> None:
        k = len(prefix)
        if k == len(digits):
            if product == total and prefix != digits:
                found.append(prefix)
            return
        for d in (range(1, total + 1) if k == 0 else range(1, stage_max + 1)):
            p = product * d
            if p >= running[k] and total % p == 0:
                extend(prefix + (d,), p)

    extend((), 1)
    return [ArchName(teacher.family, s[0], s[1:]) for s in found]


@dataclass
class Candidate:
    """One student schedule: its RED sites and figures (plain and with RED), and its latency when measured."""

    arch: str
    sites: List[dict]
    plain: Figures
    red: Figures
    latency_ms: Optional[float] = None

    def peak(self, inplace: bool) -> int:
        return self.red.report.inplace_peak_bytes if inplace else self.red.report.peak_bytes

    def plain_peak(self, inplace: bool) -> int:
        return self.plain.report.inplace_peak_bytes if inplace else self.plain.report.peak_bytes


@dataclass
class Plan:
    """The teacher, every candidate in enumeration order, and the settings they were sized with."""

    teacher: str
    image_size: int
    budget: int
    batch: int
    dtype: Optional[str]
    inplace: bool
    teacher_figures: Figures
    candidates: List[Candidate]
    seconds: float = 0.0  # analysis time, imports excluded
    exports: int = 0  # whole-graph exports made
    teacher_latency_ms: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def figure(self) -> str:
        return "in-place peak" if self.inplace else "liveness peak"

    def fitting(self) -> List[Candidate]:
        """The candidates within the budget, most MACs of the student's own layers first (then the lower peak): the
        more of the teacher's resolution and computation kept, the more accuracy to hope for (none is predicted)."""
        fit = [c for c in self.candidates if c.peak(self.inplace) <= self.budget]
        return sorted(fit, key=lambda c: (-c.plain.macs, c.peak(self.inplace), c.arch))

    def front(self) -> List[str]:
        """The Pareto front of peak (lower is better) against the student's own MACs (higher is better)."""
        out, best = [], -1
        for c in sorted(self.candidates, key=lambda c: (c.peak(self.inplace), -c.plain.macs, c.arch)):
            if c.plain.macs > best:
                out.append(c.arch)
                best = c.plain.macs
        return out

    def smallest(self) -> Candidate:
        return min(self.candidates, key=lambda c: (c.peak(self.inplace), -c.plain.macs, c.arch))

    def to_dict(self) -> Dict[str, Any]:
        front = set(self.front())

        def figs(f: Figures) -> Dict[str, Any]:
            r = f.report
            return {"peak_bytes": r.peak_bytes, "inplace_peak_bytes": r.inplace_peak_bytes, "peak_node": r.peak_node,
                    "macs": f.macs, "params": f.params}

        return {
            "teacher": self.teacher, "image_size": self.image_size, "budget_bytes": self.budget, "batch": self.batch,
            "dtype": self.dtype or "fp32", "inplace": self.inplace, "seconds": round(self.seconds, 3),
            "exports": self.exports, "teacher_figures": figs(self.teacher_figures),
            "teacher_latency_ms": self.teacher_latency_ms,
            "candidates": [{"arch": c.arch, "sites": c.sites, "red_blocks": len(c.sites), "plain": figs(c.plain),
                            "red": figs(c.red), "fits": c.peak(self.inplace) <= self.budget, "pareto": c.arch in front,
                            "latency_ms": c.latency_ms} for c in self.candidates],
            **self.extra,
        }


def make_plan(teacher: str, image_size: int, budget: int, batch: int = 1, dtype: Optional[str] = None,
              inplace: bool = False, exact: bool = False, num_classes: int = 10) -> Plan:
    """Size every student schedule of ``teacher`` (see ``student_schedules``) at ``image_size``."""
    t = parse_arch(teacher)
    if FAMILIES.get(t.family).task != "classify":
        raise UserError(f"plan sizes classifier students; {t.family} is a denoiser: list its student and RED sites "
                        "by hand (e.g. the ddpm_cifar10_x2 preset)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    build_model(str(t), num_classes, image_size)  # a teacher that does not fit the image size fails here, in one line
    schedules = student_schedules(t)
    if not schedules:
        raise UserError(f"{t} already downsamples by its whole stride {t.total_stride} in its stem: no schedule moves "
                        "a stride earlier; plan from a teacher with a smaller stem stride")
    start = time.perf_counter()
    analyzer = ScheduleAnalyzer(image_size, batch=batch, dtype=dtype, num_classes=num_classes, exact=exact)
    teacher_figures = analyzer.analyze(str(t), [])[0]
    candidates = []
    for s in schedules:
        sites = auto_sites(str(s), str(t), image_size)
        plain, red = analyzer.analyze(str(s), sites)
        candidates.append(Candidate(str(s), sites, plain, red))
    return Plan(str(t), image_size, budget, batch, dtype, inplace, teacher_figures, candidates,
                seconds=time.perf_counter() - start, exports=analyzer.exports)


def check_budget(plan: Plan) -> List[Candidate]:
    """The fitting candidates, ranked; none fitting is a one-line error naming the smallest achievable."""
    fit = plan.fitting()
    if not fit:
        s = plan.smallest()
        hints = ["raise the budget", "lower --image-size"] + ([] if plan.inplace else ["add --inplace"])
        raise UserError(
            f"no student of {plan.teacher} fits {fmt_bytes(plan.budget)} ({plan.budget} B) at {plan.image_size} px: "
            f"the smallest {plan.figure} is {fmt_bytes(s.peak(plan.inplace))} ({s.peak(plan.inplace)} B), "
            f"{s.arch} with {red_blocks(len(s.sites))}; " + ", ".join(hints[:-1]) + " or " + hints[-1])
    return fit


def build_candidate(plan: Plan, cand: Candidate, num_classes: int = 10) -> nn.Module:
    """The student with its RED blocks, as training builds it (sites checked against the teacher's H x W)."""
    teacher = build_model(plan.teacher, num_classes, plan.image_size)
    student = build_model(cand.arch, num_classes, plan.image_size)
    insert_red_blocks(student, plan_sites(student, teacher, cand.sites, plan.image_size, 1.0))
    student.arch_name = f"{cand.arch}+RED"
    return student


def verify(plan: Plan, cand: Candidate, num_classes: int = 10):
    """Export ``cand`` with its RED blocks and analyse it as ``redistill memory`` does; the fast figures must agree."""
    report = analyze_model(build_candidate(plan, cand, num_classes), plan.image_size, batch=plan.batch,
                           dtype=plan.dtype, inplace=True)
    fast = cand.red.report
    if (report.peak_bytes, report.inplace_peak_bytes) != (fast.peak_bytes, fast.inplace_peak_bytes):
        raise UserError(f"the fast analysis of {cand.arch} ({fast.peak_bytes} B, in-place {fast.inplace_peak_bytes} B) "
                        f"disagrees with its export ({report.peak_bytes} B, in-place {report.inplace_peak_bytes} B): "
                        "rerun with --exact, and report it")
    return report


def ort_latency_ms(model: nn.Module, image_size: int, runs: int = 30, warmup: int = 5) -> float:
    """Median ONNX Runtime CPU latency of one image, one intra-op thread, in milliseconds."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="redistill-plan-") as tmp:
        path = export_for_analysis(model, image_size, Path(tmp) / "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, image_size, image_size)).astype(np.float32)
    name = sess.get_inputs()[0].name
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_latency(plan: Plan, cands: Sequence[Candidate], num_classes: int = 10) -> None:
    """Fill in the latency of the teacher and of ``cands`` (each built with its RED blocks, random weights)."""
    plan.teacher_latency_ms = ort_latency_ms(build_model(plan.teacher, num_classes, plan.image_size), plan.image_size)
    for c in cands:
        c.latency_ms = ort_latency_ms(build_candidate(plan, c, num_classes), plan.image_size)


# --- what the command prints and writes --------------------------------------------------------------


def red_blocks(n: int) -> str:
    return f"{n} RED block{'s' * (n != 1)}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def format_plan(plan: Plan, top: int) -> str:
    """The header, the teacher, and the ``top`` fitting candidates, ranked, the Pareto front starred."""
    fit, front = plan.fitting(), set(plan.front())
    tf = plan.teacher_figures
    t_peak = tf.report.inplace_peak_bytes if plan.inplace else tf.report.peak_bytes
    lat = plan.teacher_latency_ms is not None
    lines = [
        f"teacher {plan.teacher} at {plan.image_size} px, batch {plan.batch}, {plan.dtype or 'fp32'}: {plan.figure} "
        f"{fmt_bytes(t_peak)}, {_count(tf.macs)} MACs, {_count(tf.params)} parameters"
        + (f", {plan.teacher_latency_ms:.2f} ms (ONNX Runtime, 1 CPU thread)" if lat else ""),
        f"budget {fmt_bytes(plan.budget)} ({plan.budget} B) on the {plan.figure} with RED blocks: "
        f"{len(fit)} of {len(plan.candidates)} student schedules fit "
        f"(strides moved earlier, total stride {parse_arch(plan.teacher).total_stride})",
        "ranked by MACs without the RED blocks (the more of the teacher's resolution kept, the more accuracy to "
        "hope for); * = on the Pareto front of peak vs those MACs; MACs+RED and params: as deployed",
        "",
    ]
    header = ["#", "student", "RED", "peak+RED", "in-place+RED", "peak, no RED", "vs teacher", "MACs", "MACs+RED",
              "params"]
    if lat:
        header.append("ORT ms")
    rows = []
    for i, c in enumerate(fit[:top], 1):
        row = [f"{i}{'*' if c.arch in front else ''}", c.arch, str(len(c.sites)), fmt_bytes(c.red.report.peak_bytes),
               fmt_bytes(c.red.report.inplace_peak_bytes), fmt_bytes(c.plain_peak(plan.inplace)),
               f"{t_peak / c.peak(plan.inplace):.1f}x lower", _count(c.plain.macs), _count(c.red.macs),
               _count(c.red.params)]
        if lat:
            row.append(f"{c.latency_ms:.2f}" if c.latency_ms is not None else "-")
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    right = {0, 2, 3, 4, 5, 7, 8, 9, 10}
    for cells in [header, ["-" * w for w in widths]] + rows:
        lines.append("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    if len(fit) > top:
        lines.append(f"... {len(fit) - top} more fit (--top N lists more)")
    return "\n".join(lines)


def _recipe_preset(family: str) -> str:
    """The paper pair preset whose recipe a written plan copies: one of the teacher's family, else the first."""
    pairs = paper_pairs()
    if not pairs:
        raise UserError("no paper pair preset in train/configs to copy the training recipe from")
    same = [p for p in pairs if parse_arch(load_config(p).teacher.arch).family == family]
    return (same or pairs)[0]


def preset_yaml(plan: Plan, cand: Candidate, command: str) -> str:
    """A preset for ``cand``: teacher, student, its RED sites and the paper recipe of the shipped 128 px presets."""
    recipe = _recipe_preset(parse_arch(plan.teacher).family)
    doc = yaml.safe_load(presets()[recipe].read_text())
    sites = [{k: v for k, v in s.items() if v is not None} for s in cand.sites]
    doc.update(name=f"plan-{cand.arch}", method="red", teacher={"arch": plan.teacher}, student={"arch": cand.arch})
    doc["red"] = {**doc.get("red", {}), "sites": sites}
    doc["data"] = {**doc.get("data", {}), "image_size": plan.image_size}
    tf = plan.teacher_figures.report
    head = [
        f"Written by `{command}` ({timestamp()}).",
        f"Student {cand.arch} for teacher {plan.teacher} at {plan.image_size} px, batch {plan.batch}, "
        f"{(plan.dtype or 'fp32').upper()}: peak activation memory with its {red_blocks(len(cand.sites))} "
        f"{fmt_bytes(cand.red.report.peak_bytes)} (in-place {fmt_bytes(cand.red.report.inplace_peak_bytes)}; "
        f"budget {fmt_bytes(plan.budget)} on the {plan.figure}), {fmt_bytes(cand.plain.report.peak_bytes)} without "
        f"them, teacher {fmt_bytes(tf.peak_bytes)}; {_count(cand.plain.macs)} MACs ({_count(cand.red.macs)} with the "
        f"RED blocks), {_count(cand.red.params)} parameters.",
        "RED sites: the paper's rule (train/red.py auto_sites; `sites: auto` places the same ones).",
        f"Recipe: the paper's, as in the shipped 128 px presets (copied from train/configs/{recipe}.yaml).",
    ]
    comment = "".join(f"# {line}\n" for line in head)
    return comment + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)


def plot_plan(plan: Plan, path, chosen: Optional[Candidate] = None) -> Path:
    """Peak (with RED blocks) against own MACs of every candidate, the Pareto front, the budget line, the teacher and
    the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = float(1 << 20)
    front = set(plan.front())
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for fits, color, label in ((False, "0.6", "over budget"), (True, "tab:blue", "fits")):
        pts = [c for c in plan.candidates if (c.peak(plan.inplace) <= plan.budget) == fits]
        ax.scatter([c.plain.macs / 1e6 for c in pts], [c.peak(plan.inplace) / mib for c in pts], s=22, color=color,
                   label=f"student + RED, {label} ({len(pts)})", zorder=3)
    fr = sorted((c for c in plan.candidates if c.arch in front), key=lambda c: c.plain.macs)
    ax.step([c.plain.macs / 1e6 for c in fr], [c.peak(plan.inplace) / mib for c in fr], where="post", color="tab:green",
            lw=1.2, label="Pareto front (peak vs MACs)", zorder=2)
    tf = plan.teacher_figures
    t_peak = tf.report.inplace_peak_bytes if plan.inplace else tf.report.peak_bytes
    ax.scatter([tf.macs / 1e6], [t_peak / mib], marker="^", s=90, color="tab:red", edgecolor="black", zorder=4,
               label=f"teacher {plan.teacher}")
    ax.axhline(plan.budget / mib, color="tab:orange", ls="--", lw=1.2, label=f"budget {fmt_bytes(plan.budget)}")
    if chosen is not None:
        ax.scatter([chosen.plain.macs / 1e6], [chosen.peak(plan.inplace) / mib], marker="*", s=220, color="gold",
                   edgecolor="black", zorder=5, label=f"chosen {chosen.arch}")
    ax.set_yscale("log")
    ax.set_xlabel("MACs per image (millions) of the network's own layers (RED blocks not counted)")
    ax.set_ylabel(f"{plan.figure} (MiB, log scale)")
    ax.set_title(f"Students of {plan.teacher} at {plan.image_size} px, batch {plan.batch}, {(plan.dtype or 'fp32').upper()}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return atomic_save_figure(fig, path)

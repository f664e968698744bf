"""The compare plots: theory vs measured memory, each task's quality figure vs peak memory, teacher vs RED footprint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from bench.compare.join import TEACHER, analyze_checkpoint, key_of, method_label, model_key, pair_order, task_order
from bench.compare.measures import activation_measure, method_title, methods_in
from redistill.io import atomic_save_figure
from redistill.memory import MemoryReport, NodeRow, analyze_onnx
from redistill.memory.plot import plot_reports
from train.losses import METHODS, methods_in_order
from train.tasks import TaskMetric, metric_of, task_metrics

MEMORY_PLOT = "memory_theory_vs_measured.png"
MEASURES_PLOT = "memory_measured_vs_theory.png"
FOOTPRINT_PLOT = "footprint_teacher_vs_student_red.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axis(ax, which: str) -> None:
    """Log scale with plain tick labels (4, 10, 40 rather than 4x10^0)."""
    from matplotlib.ticker import FuncFormatter

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))


def _empty_plot(path, title: str, note: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3), dpi=110)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True)
    return atomic_save_figure(fig, path)


def plot_memory(res: Dict[str, Any], path) -> Path:
    """Bars per model: theoretical peaks (liveness, in-place, layer-wise) and each measured activation figure,
    the measured bars annotated with measured / theoretical (liveness)."""
    plt = _pyplot()
    models = [m for m in res["models"] if m["theory"] or m["deployments"]]
    title = "Peak activation memory: theory vs measured (batch 1)"
    if not models:
        return _empty_plot(path, title, "no theoretical or measured memory figures found")
    series = [("liveness (theory)", lambda m: (m["theory"] or {}).get("peak_bytes"), None),
              ("in-place (theory)", lambda m: (m["theory"] or {}).get("inplace_peak_bytes"), None),
              ("layer-wise, paper (theory)", lambda m: (m["theory"] or {}).get("layerwise_peak_bytes"), None)]
    dkeys = sorted({(d["host"], str(d["backend"]), str(d["precision"])) for m in models for d in m["deployments"]})
    for k in dkeys:
        def get(m, k=k):
            d = next((d for d in m["deployments"] if (d["host"], str(d["backend"]), str(d["precision"])) == k), None)
            return d["activation_bytes"] if d else None

        def rat(m, k=k):
            d = next((d for d in m["deployments"] if (d["host"], str(d["backend"]), str(d["precision"])) == k), None)
            act = activation_measure(d) if d else None
            if act is not None:  # a record with resolutions: no bare ratio for a figure below its method's
                return "below res." if act["below_resolution"] else act["ratio_liveness"]
            return d["ratio_measured_theoretical"] if d else None

        series.append((f"measured: {k[0]} {k[1]} {k[2]}", get, rat))
    series = [s for s in series if any(s[1](m) for m in models)]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(models) * max(1, len(series)) / 3 + 3), 5.5), dpi=110)
    width = 0.8 / max(1, len(series))
    vals = []
    for i, (label, get, rat) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(models))]
        ys = [(get(m) or 0) / 1024 for m in models]
        vals += [y for y in ys if y]
        bars = ax.bar(xs, ys, width, label=label, hatch="//" if rat else None, edgecolor="black", lw=0.5)
        if rat:
            for b, m in zip(bars, models):
                r = rat(m)
                if r is not None:
                    ax.annotate(r if isinstance(r, str) else f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center",
                                va="bottom", fontsize=8, rotation=90 if len(series) > 4 else 0)
    log = bool(vals) and max(vals) / max(min(vals), 1e-9) > 20
    if log:
        _log_axis(ax, "y")
    ax.set_ylim(top=max(vals or [1]) * (4 if log else 1.2))  # room for the annotations
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([m["label"].replace(" (", "\n(") for m in models], fontsize=8)
    ax.set_ylabel("activation memory (KiB)")
    sub = "" if dkeys else " (no device reports: theory only)"
    ax.set_title(title + sub + "\nannotation: measured / theoretical liveness peak")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return atomic_save_figure(fig, path)


def plot_measures(res: Dict[str, Any], path) -> Path:
    """Log-log scatter of every measured figure against its theoretical liveness peak (batch 1; a batch-B figure
    against B x theory), one marker per method, y = x dashed; error bars = the method's resolution, and a hollow
    marker for a figure below it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
    deployments = [d for m in res["models"] for d in m["deployments"]]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^v<>ph*"
    xs_all, ys_all, left = [], [], 0
    for i, method in enumerate(methods_in(deployments)):
        pts = []
        for d in deployments:
            for x in d.get("measures") or []:
                if x["method"] != method or x["ratio_liveness"] is None:
                    continue
                if x["bytes"] <= 0:  # a slope lost in its noise: no place on a log axis
                    left += 1
                    continue
                pts.append((x["bytes"] / x["ratio_liveness"] / 1024, x["bytes"] / 1024,
                            (x["resolution_bytes"] or 0) / 1024, x["below_resolution"]))
        if not pts:
            continue
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        for below in (False, True):
            sel = [p for p in pts if p[3] == below]
            if not sel:
                continue
            x, y, r = ([p[k] for p in sel] for k in range(3))
            ax.errorbar(x, y, yerr=[[min(e, 0.9 * v) for e, v in zip(r, y)], r], fmt=marker, ms=8, capsize=3,
                        color=color, mfc="none" if below else color, mec=color,
                        label=method_title(method, deployments) + (" (below resolution)" if below else ""))
        xs_all += [p[0] for p in pts]
        ys_all += [p[1] for p in pts]
    title = "Measured against theoretical peak activation memory"
    if not xs_all:
        plt.close(fig)
        return _empty_plot(path, title, "no measured figure with a theoretical peak to compare with")
    lo, hi = min(xs_all + ys_all) / 2, max(xs_all + ys_all) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = theory")
    _log_axis(ax, "x")
    _log_axis(ax, "y")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("theoretical liveness peak (KiB; x batch for a batch figure)"
                  + (f"\nnot drawn: {left} figure(s) of 0 bytes or less" if left else ""))
    ax.set_ylabel("measured (KiB; per image for a slope)")
    ax.set_title(title + "\nerror bar: the method's resolution; hollow: below it")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return atomic_save_figure(fig, path)


def quality_plots(res: Dict[str, Any]) -> List[TaskMetric]:
    """The metrics that get a quality plot: the default task's always, every other task's when it has models."""
    metrics = list(dict.fromkeys(task_metrics().values()))
    present = {metric_of(m["task"]) for m in res["models"]}
    return metrics[:1] + [mt for mt in metrics[1:] if mt in present]


def plot_quality(res: Dict[str, Any], metric: TaskMetric, path) -> Path:
    """The paper's Figure 1 for one task's models: its quality figure (mean, error bar = sample std over seeds)
    against the theoretical peak. The default task's plot names the other tasks' models (drawn in their own plots)."""
    plt = _pyplot()
    mine = [m for m in res["models"] if metric_of(m["task"]) is metric]
    pts = [m for m in mine if m[metric.key]["n"] and (m["theory"] or {}).get("peak_bytes")]
    skipped = ""
    if metric is quality_plots(res)[0]:
        others = dict.fromkeys(metric_of(m["task"]) for m in res["models"] if metric_of(m["task"]) is not metric)
        skipped = "".join(f"\n{o.plural} not shown (their quality is a {o.title}, not {metric.title}): see {o.plot_file}"
                          for o in others)
    if not pts:
        return _empty_plot(path, metric.plot_title, f"no model with both {metric.plot_what} and a theoretical peak" + skipped)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    known = [x.name for x in methods_in_order()]
    for i, method in enumerate(known + sorted({m["method"] for m in pts} - set(known))):
        sel = [m for m in pts if m["method"] == method]
        if not sel:
            continue
        marker = METHODS.get(method).marker if method in METHODS else "o"
        xs = [m["theory"]["peak_bytes"] / 1024 for m in sel]
        ys = [m[metric.key]["mean"] for m in sel]
        err = [m[metric.key]["std"] or 0 for m in sel]
        ax.errorbar(xs, ys, yerr=err, fmt=marker, ms=11 if marker == "*" else 8, capsize=4,
                    color=colors[i % len(colors)], label=method_label(method), mec="black")
        for m, x, y in zip(sel, xs, ys):
            ax.annotate(f"{m['arch']}\nn={m[metric.key]['n']}", (x, y), textcoords="offset points", xytext=(8, -4),
                        fontsize=7)
    xs = [m["theory"]["peak_bytes"] for m in pts]
    if max(xs) / min(xs) > 8:
        _log_axis(ax, "x")
    ax.margins(x=0.25, y=0.1)
    left = [m["label"] for m in mine if m[metric.key]["n"] and not any(m is x for x in pts)]
    ax.set_xlabel("theoretical peak activation memory, liveness (KiB)"
                  + ("\nnot shown (no theoretical peak): " + "; ".join(left) if left else "") + skipped, fontsize=9)
    ax.set_ylabel(metric.plot_ylabel)
    ax.set_title(metric.plot_title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return atomic_save_figure(fig, path)


def footprint_reports(res: Dict[str, Any]) -> Tuple[list, Any]:
    """[(label, MemoryReport)] for the first pair with a teacher and a RED student (a method that needs RED sites):
    FP32 bundles' graphs first, else analyses of the checkpoints. Returns ([], note) when there is no such pair."""
    red = [x.name for x in methods_in_order() if x.needs_sites]
    by_key = {model_key(m): m for m in res["models"]}
    candidates = []
    for (t_arch, s_arch, size, task) in sorted({p for m in res["models"] for p in m["pairs"] if p[0] and p[1]},
                                               key=pair_order):
        t = by_key.get(key_of(t_arch, TEACHER, size, task))
        s = next((by_key[k] for k in (key_of(s_arch, x, size, task) for x in red) if k in by_key), None)
        candidates.append((t, s))
    if not candidates:  # no runs: bundles alone can still make the pair (never across tasks)
        for task in sorted({m["task"] for m in res["models"]}, key=task_order):
            t = next((m for m in res["models"] if m["method"] == TEACHER and m["task"] == task), None)
            s = next((m for m in res["models"] if m["method"] in red and m["task"] == task), None)
            candidates.append((t, s))
    for t, s in candidates:
        if not (t and s):
            continue
        out = []
        for m in (t, s):
            label = "teacher" if m is t else f"student+RED ({method_label(m['method'])})"
            rep = res["analyses"].get(model_key(m))
            if rep is None and m["fp32_bundle"]:
                b = m["fp32_bundle"]
                onnx = Path(b.dir) / b.manifest.onnx_file
                if onnx.is_file():
                    rep = analyze_onnx(onnx, inplace=True, name=m["label"])
            if rep is None and m["checkpoint"]:
                try:
                    rep = analyze_checkpoint(m["checkpoint"], name=m["label"])
                except Exception:  # unreadable: no footprint for this pair, not a failed compare
                    rep = None
            if rep is None:
                break
            out.append((f"{label}: {m['arch']}", rep))
        if len(out) == 2:
            return out, None
    return [], f"no teacher and RED student (method {' or '.join(red)}) with a bundle or checkpoint to analyse"


def footprint_record(label: str, r: MemoryReport) -> Dict[str, Any]:
    """One footprint curve as compare.json keeps it: what ``plot_reports`` draws (per-node live bytes, in-place
    too, the peak node), so ``--pages-only`` redraws the plot from the record alone."""
    row = r.peak_row
    return {"label": label, "model": r.model, "peak_bytes": r.peak_bytes, "inplace_peak_bytes": r.inplace_peak_bytes,
            "batch": r.batch, "dtype": r.dtype, "peak_node": r.peak_node, "peak_op": row.op if row else None,
            "peak_index": r.nodes.index(row) if row else None, "live_bytes": [x.live_bytes for x in r.nodes],
            "inplace_live_bytes": None if r.inplace_peak_bytes is None else [x.inplace_live_bytes for x in r.nodes]}


def _report_of(c: Dict[str, Any]) -> MemoryReport:
    """The MemoryReport ``plot_reports`` needs, rebuilt from a footprint record (other nodes stay unnamed)."""
    inplace = c["inplace_live_bytes"] or [None] * len(c["live_bytes"])
    nodes = [NodeRow(i, c["peak_node"] if i == c["peak_index"] else "", c["peak_op"] if i == c["peak_index"] else "",
                     live, [], inplace_live_bytes=ip) for i, (live, ip) in enumerate(zip(c["live_bytes"], inplace))]
    return MemoryReport(model=c["model"], batch=c["batch"], dtype=c["dtype"], peak_bytes=c["peak_bytes"],
                        peak_node=c["peak_node"], layerwise_peak_bytes=None, layerwise_peak_node=None, weights_bytes=0,
                        input_bytes=0, output_bytes=0, activation_types=[], nodes=nodes,
                        inplace_peak_bytes=c["inplace_peak_bytes"])


def plot_footprint(res: Dict[str, Any], path) -> Path:
    """Per-node live memory of teacher vs student+RED, via redistill.memory.plot (the `redistill memory --plot` figure).
    Sets ``res["footprint"]`` (the curves' records, or why there are none) and draws the plot from it."""
    pairs, note = footprint_reports(res)
    res["footprint"] = [footprint_record(lab, r) for lab, r in pairs] or note
    return draw_footprint(res["footprint"], path)


def draw_footprint(footprint, path) -> Optional[Path]:
    """The footprint plot from compare.json's ``footprint``; None (nothing written) for a record from before it
    kept the curves."""
    title = "Per-layer footprint: teacher vs student+RED"  # the first pair: classifiers before denoisers
    if isinstance(footprint, str):
        return _empty_plot(path, title, footprint)
    if not all("live_bytes" in c for c in footprint):
        return None
    reports = [_report_of(c) for c in footprint]
    return plot_reports(reports, path, title=f"{title} (batch 1, {reports[0].dtype})",
                        labels=[c["label"] for c in footprint])

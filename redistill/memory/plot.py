"""PNG of live activation memory over the execution order, several models overlaid, peaks marked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from redistill.io import atomic_save_figure

from redistill.memory.analysis import MemoryReport, fmt_bytes

_MIB = float(1 << 20)


@dataclass
class Overlay:
    """A measured curve drawn over one report's liveness curve: bytes at positions on its node axis."""

    label: str
    x: List[float]  # positions on the report's node axis (0 .. len(nodes) - 1)
    y: List[int]  # bytes
    style: str = ":"  # matplotlib line style
    mark_peak: bool = True


def plot_reports(reports: Sequence[MemoryReport], path: Union[str, Path], title: Optional[str] = None,
                 labels: Optional[Sequence[str]] = None, log: Optional[bool] = None,
                 overlays: Optional[Sequence[Sequence[Overlay]]] = None) -> Path:
    """Write one line per report (live MiB vs node index); in-place curves dashed when present.

    ``overlays[k]`` are measured curves (e.g. an eager allocator trace) drawn in report k's colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [r.model for r in reports]
    overlays = list(overlays or [])
    peaks = [r.peak_bytes for r in reports if r.peak_bytes] + [max(o.y) for os_ in overlays for o in os_ if o.y]
    # a log axis keeps a 20x smaller student visible next to its teacher
    if log is None:
        log = len(peaks) > 1 and max(peaks) / max(min(peaks), 1) > 8
    n_curves = len(reports) * (2 if any(r.inplace_peak_bytes is not None for r in reports) else 1) \
        + sum(len(o) for o in overlays)
    below = n_curves > 6  # many curves: the legend goes under the axes, where it hides none of them
    fig, ax = plt.subplots(figsize=(11, 5.5 + (0.22 * n_curves if below else 0)), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (r, label) in enumerate(zip(reports, labels)):
        c = colors[k % len(colors)]
        x = list(range(len(r.nodes)))
        y = [row.live_bytes / _MIB for row in r.nodes]
        where = ""
        row = r.peak_row
        if row is not None:
            where = f" at {_short(row.name)} ({row.op})"
        # earlier curves drawn wider so that they still show where a later model's curve coincides
        lw = max(3.0 - 0.9 * k, 1.0)
        ax.step(x, y, where="mid", color=c, lw=lw, label=f"{label}: peak {fmt_bytes(r.peak_bytes)}{where}")
        if row is not None:
            ax.plot([r.nodes.index(row)], [row.live_bytes / _MIB], marker="v", ms=10, color=c, mec="black",
                    zorder=5, ls="none")
        if r.inplace_peak_bytes is not None:
            yi = [row.inplace_live_bytes / _MIB for row in r.nodes]
            ax.step(x, yi, where="mid", color=c, lw=1.0, ls="--", alpha=0.8,
                    label=f"{label}, in-place reuse: peak {fmt_bytes(r.inplace_peak_bytes)}")
        for o in (overlays[k] if k < len(overlays) else ()):
            if not o.y:
                continue
            top = max(o.y)
            ax.step(o.x, [v / _MIB for v in o.y], where="mid", color=c, lw=1.4, ls=o.style, alpha=0.9,
                    label=f"{label}, {o.label}: peak {fmt_bytes(top)}")
            if o.mark_peak:
                ax.plot([o.x[o.y.index(top)]], [top / _MIB], marker="^", ms=8, color=c, mec="black", zorder=5,
                        ls="none")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("compute node, in ONNX execution order (constant-only nodes omitted)"
                  + ("; measured ops placed by matching convs" if overlays else ""))
    ax.set_ylabel("live activation memory (MiB)" + (", log scale" if log else ""))
    b = reports[0].batch if reports else 1
    dt = reports[0].dtype if reports else ""
    ax.set_title(title or f"Live activation memory per node (batch {b}, {dt})")
    ax.grid(True, which="both", alpha=0.3)
    ax.plot([], [], marker="v", ms=8, color="gray", mec="black", ls="none", label="peak node")
    if any(any(o.mark_peak for o in os_) for os_ in overlays):
        ax.plot([], [], marker="^", ms=8, color="gray", mec="black", ls="none", label="measured peak")
    if below:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    else:
        ax.legend(fontsize=8, loc="upper right")
    return atomic_save_figure(fig, path)


def _short(name: str, width: int = 40) -> str:
    """Trim exporter scope prefixes: '/features/features.2/conv/conv.0/conv.0.2/Clip' -> 'features.2/conv/conv.0/conv.0.2/Clip'."""
    parts = [p for p in name.split("/") if p]
    # drop a scope segment when the next one repeats it ('features/features.2' -> 'features.2')
    kept = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    s = "/".join(kept) or name
    return s if len(s) <= width else "..." + s[-(width - 3):]

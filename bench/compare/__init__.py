"""``redistill compare``: join distillation runs, bundles and device reports into tables and plots.

``collect`` (find and read the files into ``bench.compare.records``) -> ``build`` (model, deployment, run and
pair rows; join.py) -> ``render_markdown`` / ``write_csv`` / ``to_json`` (tables.py) -> the plots (plots.py).
compare.json is the whole result: ``rewrite_pages`` (``--pages-only``) reads it back (``from_json``) and rewrites
the tables and plots from it alone.
Every model, pair and plot is keyed by its task too; what a task's quality figure is (top-1, higher is better;
denoising loss, lower is better...) comes from its ``TaskMetric`` in train/tasks.py, so a new task needs no edit
here. See docs/compare.md for what every column means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from bench.compare.collect import Collected, collect
from bench.compare.join import analyze_checkpoint, build, pair_rows
from bench.compare.measures import has_measures
from bench.compare.plots import (FOOTPRINT_PLOT, MEASURES_PLOT, MEMORY_PLOT, draw_footprint, plot_footprint, plot_measures,
                                 plot_memory, plot_quality, quality_plots)
from bench.compare.tables import csv_rows, from_json, mem, render_markdown, to_json, write_csv
from redistill.errors import UserError
from redistill.io import atomic_write_json, atomic_write_text

__all__ = ["Collected", "collect", "build", "pair_rows", "analyze_checkpoint", "render_markdown", "csv_rows",
           "write_csv", "to_json", "from_json", "plot_memory", "plot_measures", "plot_quality", "plot_footprint", "compare",
           "rewrite_pages"]


def compare(paths: Sequence[str] = (), runs: Optional[str] = None, bundles: Optional[str] = None,
            reports: Optional[str] = None, out: str = "bench/results/compare", analyze: bool = True,
            quality: Sequence[str] = ()) -> Dict[str, Path]:
    """collect -> build -> write the tables and plots under ``out``; returns {file name: path}.
    The default task's quality plot is always written, another task's when its models were found."""
    res = build(collect(paths, runs, bundles, reports, quality), analyze=analyze)
    o = Path(out)
    files = _write_pages(res, o, plot_footprint)
    files["compare.json"] = atomic_write_json(o / "compare.json", to_json(res))
    return files


def rewrite_pages(out: str = "bench/results/compare") -> Dict[str, Path]:
    """``--pages-only``: compare.md, compare.csv and the plots rewritten from ``out``/compare.json alone, as the
    full run writes them; returns {file name: path}. The footprint plot is left as it is (and not returned) when
    the record predates its curves."""
    o = Path(out)
    if not (o / "compare.json").is_file():
        raise UserError(f"{o / 'compare.json'} not found: --pages-only rewrites the pages of an earlier compare run")
    res = from_json(json.loads((o / "compare.json").read_text()))
    return _write_pages(res, o, lambda r, path: draw_footprint(r["footprint"], path))


def _write_pages(res: Dict[str, Any], o: Path, footprint: Callable[[Dict[str, Any], Path], Optional[Path]]) -> Dict[str, Path]:
    """The plots, compare.md and compare.csv from the rows; ``footprint`` draws the footprint plot (and, in a full
    run, sets ``res["footprint"]``, which the page lists)."""
    plots = quality_plots(res)
    files = {MEMORY_PLOT: plot_memory(res, o / MEMORY_PLOT)}
    measures = has_measures(res)  # a record from before the per-method figures keeps its pages as they were
    if measures:
        files[MEASURES_PLOT] = plot_measures(res, o / MEASURES_PLOT)
    files[plots[0].plot_file] = plot_quality(res, plots[0], o / plots[0].plot_file)
    drawn = footprint(res, o / FOOTPRINT_PLOT)
    if drawn is not None:
        files[FOOTPRINT_PLOT] = drawn
    for mt in plots[1:]:
        files[mt.plot_file] = plot_quality(res, mt, o / mt.plot_file)
    fp = res.get("footprint")
    listed = f"`{plots[0].plot_file}`" + (f" ({plots[0].plural})" + "".join(
        f", `{mt.plot_file}` ({mt.plural})" for mt in plots[1:]) if len(plots) > 1 else "")
    md = render_markdown(res) + f"\n## Plots\n\n- `{MEMORY_PLOT}`, {listed}\n" + (
        f"- `{MEASURES_PLOT}`: every measured figure against its theoretical liveness peak, one marker per method\n"
        if measures else "") + f"- `{FOOTPRINT_PLOT}`: " + (
        ", ".join(f"{x['label']} (peak {mem(x['peak_bytes'])})" for x in fp) if isinstance(fp, list) else str(fp)) + "\n"
    files["compare.md"] = atomic_write_text(o / "compare.md", md)
    files["compare.csv"] = write_csv(res, o / "compare.csv")
    return files

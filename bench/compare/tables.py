"""compare.md, compare.csv and compare.json from ``build``'s rows (``from_json`` reads compare.json back into them).

Every task gets its own models, pairs and runs tables, titled and formatted by its ``TaskMetric``; the CSV has
each task's figure columns side by side (the other task's cells empty), in the tasks registry's order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePath
from typing import Any, Dict, List, Optional, Sequence

from bench.compare.join import method_label, model_label
from bench.compare.measures import (activation_measure, flag, has_measures, measure_cell, method_title, methods_in,
                                    pair_method_text)
from redistill.io import atomic_write_text
from redistill.memory import fmt_bytes
from redistill.report import md_table
from train.tasks import DEFAULT_TASK, TaskMetric, metric_of, task_metrics


def _fmt(v, spec=".2f", suffix="") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def mem(v) -> str:
    return "" if v is None else fmt_bytes(v)


def _stats_cell(s: Dict[str, Any], spec: str) -> str:
    if not s["n"]:
        return ""
    if s["n"] == 1:
        return f"{s['mean']:{spec}}"
    return f"{s['mean']:{spec}} ± {_fmt(s['std'], spec)} [{s['min']:{spec}}-{s['max']:{spec}}]"


def _gen_cell(gens: List[Dict[str, Any]]) -> str:
    """CFD / precision / recall (and FID when computed) of each quality result, with its sampler."""
    out = []
    for g in gens:
        how = ", ".join(x for x in (g.get("sampler") and f"{g['sampler']} {g.get('steps')} steps",
                                    g.get("n_generated") and f"n={g['n_generated']}",
                                    g.get("guidance") and f"guidance {g['guidance']}") if x)
        fid = f", FID {g['fid']:.2f}" if g.get("fid") is not None else ""
        out.append(f"{_fmt(g['cfd'])} / {_fmt(g['precision'], '.3f')} / {_fmt(g['recall'], '.3f')}{fid}"
                   + (f" ({how})" if how else ""))
    return "; ".join(out)


def _table(header: Sequence[str], rows) -> str:
    esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    return "\n".join(md_table(header, [[esc(c) for c in r] for r in rows]))


def by_metric(items: List[Dict[str, Any]]) -> List[tuple]:
    """[(metric, the items of its tasks)] in the tasks registry's order, metrics with no item left out."""
    groups = []
    for mt in dict.fromkeys(task_metrics().values()):
        mine = [x for x in items if metric_of(x["task"]) is mt]
        if mine:
            groups.append((mt, mine))
    return groups


def _default_metric() -> TaskMetric:
    return next(iter(task_metrics().values()))


def _models_table(mt: TaskMetric, models: List[Dict[str, Any]]) -> str:
    o = mt.onnx
    rows = []
    for m in models:
        th, n = m["theory"] or {}, m[mt.key]["n"]
        rows.append([m["label"], _fmt(n, "d") if n else "", _stats_cell(m[mt.key], mt.fmt),
                     _fmt(m[f"onnx_fp32_{o.name}"], mt.fmt), _fmt(m[f"onnx_int8_{o.name}"], mt.fmt),
                     mem(th.get("peak_bytes")), mem(th.get("inplace_peak_bytes")), mem(th.get("layerwise_peak_bytes")),
                     m["theory_source"] or ""] + ([_gen_cell(m["generation"])] if mt.generative else [])
                    + ["; ".join(m["notes"])])
    return _table(["model", "n", mt.column, f"ONNX FP32 {o.title}", f"INT8 {o.title}", "liveness peak", "in-place peak",
                   "layer-wise peak (paper)", "theory from"] + (["CFD / precision / recall"] if mt.generative else [])
                  + ["notes"], rows)


def _pairs_table(mt: TaskMetric, pairs: List[Dict[str, Any]]) -> str:
    k, spec, rows = mt.key, mt.fmt, []
    for p in pairs:
        meas = "; ".join(f"{x['host']}/{x['backend']}/{x['precision']}: " + (
            ", ".join(filter(None, map(pair_method_text, x["methods"]))) if "methods" in x
            else f"memory {_fmt(x['activation_ratio'], '.2f', 'x')}") + f", p50 {_fmt(x['latency_p50_ratio'], '.2f', 'x')}"
            for x in p["measured"])
        rows.append([f"{p['teacher']} -> {p['student']} ({p['image_size']} px)", method_label(p["method"]),
                     _fmt(p[k], spec), _fmt(p[f"teacher_{k}"], spec), _fmt(p[f"student_alone_{k}"], spec),
                     _fmt(p["gap"], spec), _fmt(None if p["recovered"] is None else 100 * p["recovered"], ".1f", " %"),
                     _fmt(p["theory_ratio"], ".2f", "x"), meas, "; ".join(p["notes"])])
    return _table(["pair", "method", mt.title, f"teacher {mt.short}", f"student-alone {mt.short}", f"gap ({mt.gap_unit})",
                   "gap recovered", "theoretical peak teacher/student", "measured teacher/student (activation, p50)",
                   "notes"], rows)


def _runs_table(mt: TaskMetric, entries: List[Dict[str, Any]]) -> str:
    rows = [[e["run"], str(e["seed"] if e["seed"] is not None else ""), e["role"], method_label(e["method"]), e["arch"],
             str(e["image_size"] or ""), _fmt(e[mt.key], mt.fmt), _fmt(e[f"last_{mt.key}"], mt.fmt), str(e["epoch"])]
            + ([_gen_cell(e["generation"])] if mt.generative else []) + [e["run_dir"]] for e in entries]
    return _table(["run", "seed", "role", "method", "arch", "px", f"{mt.title} (best)", f"{mt.title} (last)", "epoch"]
                  + (["CFD / precision / recall"] if mt.generative else []) + ["folder"], rows)


def render_markdown(res: Dict[str, Any]) -> str:
    """compare.md: models (each task's quality figure, theory), deployments (measured vs theory, latency), pairs,
    per-run rows, notes. Each task gets its own table wherever its quality figure appears."""
    default = _default_metric()
    model_groups = by_metric(res["models"])
    intro = [default.intro] + [mt.intro for mt, _ in model_groups if mt is not default]
    out = ["# Theory against measurement", "",
           "Generated by `redistill compare` from " + (", ".join(f"`{s}`" for s in res["sources"]) or "the given paths")
           + ". Sizes in KiB/MiB (binary), " + "; ".join(intro) + ". See docs/compare.md for where each figure comes from.",
           "", "## Models", ""]
    for i, (mt, models) in enumerate(model_groups or [(default, [])]):
        if i:
            out += ["", mt.models_heading, ""]
        out.append(_models_table(mt, models))
    out += ["", "## Measured on devices", ""]
    measured = has_measures(res)
    rows = []
    for m in res["models"]:
        if not m["deployments"]:
            rows.append([m["label"]] + [""] * (12 if measured else 11) + ["not deployed (no device report)"])
        for d in m["deployments"]:
            act = activation_measure(d)
            resolution = ([mem(act["resolution_bytes"]) if act else ""] if measured else [])
            ratio = _fmt(d["ratio_measured_theoretical"], ".2f", "x")
            if act is not None:
                ratio = flag(act) if act["below_resolution"] else _fmt(act["ratio_liveness"], ".2f", "x")
            elif measured and ratio:
                ratio += " (resolution unknown)"
            rows.append([m["label"], d["host"], d["device"] or "", d["backend"] or "", d["precision"] or "", d["bundle"],
                         mem(d["theoretical_peak_bytes"]), mem(d["activation_bytes"])] + resolution +
                        [ratio, mem(d["process_peak_bytes"]),
                         _fmt(d["latency_p50_ms"], ".3f"), _fmt(d["latency_p99_ms"], ".3f"),
                         "; ".join(deployment_notes(d))])
    out.append(_table(["model", "host", "device", "backend", "precision", "bundle", "theoretical peak",
                       "measured activation"] + (["resolution"] if measured else []) +
                      ["measured / theoretical", "process peak (VmHWM)", "p50 (ms)", "p99 (ms)", "notes"], rows))
    if measured:
        out += ["", "## Theory against each measurement", "", MEASURES_INTRO, "", _measures_table(res)]
    out += ["", "## Pairs: accuracy gap recovered and teacher/student ratios", ""]
    for i, (mt, pairs) in enumerate(by_metric(res["pairs"])):
        if i:
            out.append("")
        if mt.rule:
            out += [mt.rule, ""]
        out.append(_pairs_table(mt, pairs))
    if not res["pairs"]:
        out.append("No teacher/student pair among the runs found.")
    out += ["", "## Runs", ""]
    for i, (mt, entries) in enumerate(by_metric(res["entries"])):
        if i:
            out += ["", mt.runs_heading, ""]
        out.append(_runs_table(mt, entries))
    if not res["entries"]:
        out.append("No distillation runs found.")
    if res["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(out) + "\n"


MEASURES_INTRO = (
    "Each measured figure beside the theory (batch 1; a batch-B figure is compared with B x theory), as "
    "`measured: / liveness / in-place (resolution)`. A figure below its method's resolution is flagged instead of "
    "given a ratio. Per-image figures are the slope of peak memory over batch size (docs/deploy.md).")


def _measures_table(res: Dict[str, Any]) -> str:
    """One row per deployment: the three theoretical peaks, then one column per measured method."""
    deployments = [d for m in res["models"] for d in m["deployments"]]
    methods = methods_in(deployments)
    rows = []
    for m in res["models"]:
        for d in m["deployments"]:
            by = {x["method"]: x for x in d.get("measures") or []}
            notes = [f"per image not measured: {d['per_image_skipped']}"] if d.get("per_image_skipped") else []
            rows.append([m["label"], d["host"], d["backend"] or "", d["precision"] or "",
                         mem(d["theoretical_peak_bytes"]), mem(d["theoretical_inplace_peak_bytes"]),
                         mem(d.get("theoretical_layerwise_peak_bytes"))]
                        + [measure_cell(by.get(x)) for x in methods] + ["; ".join(notes)])
    return _table(["model", "host", "backend", "precision", "liveness", "in-place", "layer-wise (paper)"]
                  + [method_title(x, deployments) for x in methods] + ["notes"], rows)


def deployment_notes(d: Dict[str, Any]) -> List[str]:
    """What a deployment row's figures need said: a failed output check, a manifest edited after export."""
    return (["output check FAILED"] if d["output_check_passed"] is False else []) + list(d.get("notes") or [])


GENERATION_COLUMNS = ["cfd", "gen_precision", "gen_recall"]
DEPLOYMENT_COLUMNS = ["host", "device", "backend", "precision", "bundle", "bundle_theoretical_peak_bytes",
                      "activation_bytes", "process_peak_bytes", "ratio_measured_theoretical", "ratio_measured_inplace",
                      "latency_p50_ms", "latency_p99_ms", "output_check_passed"]


#: kind=measure rows (one per deployment and measured method); only in a record that has them
MEASURE_COLUMNS = ["measure", "measure_label", "measured_bytes", "per_image", "measure_batch", "resolution_bytes",
                   "below_resolution", "ratio_liveness", "ratio_inplace", "ratio_layerwise", "fit_max_abs_residual_bytes",
                   "fit_r2"]


def csv_columns(res: Optional[Dict[str, Any]] = None) -> List[str]:
    """The CSV header: per task (registry order) its figure, spread and ONNX columns, and its pair columns; the
    measure columns when ``res`` has per-method figures."""
    return _base_columns() + (MEASURE_COLUMNS if res is not None and has_measures(res) else [])


def _base_columns() -> List[str]:
    metrics = list(dict.fromkeys(task_metrics().values()))
    figures = [c for mt in metrics for c in (mt.key, f"{mt.key}_std", f"{mt.key}_min", f"{mt.key}_max",
                                               f"onnx_fp32_{mt.onnx.name}", f"int8_{mt.onnx.name}")]
    pair = [c for mt in metrics for c in (f"teacher_{mt.key}", f"student_alone_{mt.key}")]
    return (["kind", "task", "model", "arch", "method", "image_size", "run", "seed", "n"] + figures + GENERATION_COLUMNS
            + ["theoretical_peak_bytes", "theoretical_inplace_peak_bytes", "theoretical_layerwise_peak_bytes",
               "theory_source"] + DEPLOYMENT_COLUMNS + pair
            + ["gap", "recovered", "theory_ratio", "activation_ratio", "latency_p50_ratio", "notes"])


def _gen(gens) -> Dict[str, Any]:
    """The last quality result joined (CFD, precision, recall)."""
    g = gens[-1] if gens else {}
    return {"cfd": g.get("cfd"), "gen_precision": g.get("precision"), "gen_recall": g.get("recall")}


def csv_rows(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    """kind=model: one row per model and deployment (deployment cells empty when not deployed);
    kind=run: one row per run and role (each seed); kind=pair: one per pair, method and common deployment.
    Each row fills its task's figure columns (``task`` says which); a pair's ``gap`` is in its figure's units."""
    metrics = list(dict.fromkeys(task_metrics().values()))
    rows = []
    for m in res["models"]:
        th = m["theory"] or {}
        base = {"kind": "model", "task": m["task"], "model": m["label"], "arch": m["arch"], "method": m["method"],
                "image_size": m["image_size"], "n": m[metric_of(m["task"]).key]["n"],
                "seed": " ".join(str(s) for s in m["seeds"]), **_gen(m["generation"]),
                "theoretical_peak_bytes": th.get("peak_bytes"), "theoretical_inplace_peak_bytes": th.get("inplace_peak_bytes"),
                "theoretical_layerwise_peak_bytes": th.get("layerwise_peak_bytes"), "theory_source": m["theory_source"],
                "notes": "; ".join(m["notes"])}
        for mt in metrics:
            s, name = m[mt.key], mt.onnx.name
            base.update({mt.key: s["mean"], f"{mt.key}_std": s["std"], f"{mt.key}_min": s["min"],
                         f"{mt.key}_max": s["max"], f"onnx_fp32_{name}": m[f"onnx_fp32_{name}"],
                         f"int8_{name}": m[f"onnx_int8_{name}"]})
        for d in m["deployments"] or [None]:
            row = dict(base)
            if d:
                row.update({k: d[k] for k in DEPLOYMENT_COLUMNS if k in d})
                row["bundle_theoretical_peak_bytes"] = d["theoretical_peak_bytes"]
                row["notes"] = "; ".join(filter(None, [row["notes"], *(d.get("notes") or [])]))
            rows.append(row)
    for m in res["models"]:
        for d in m["deployments"]:
            for x in d.get("measures") or []:
                rows.append({"kind": "measure", "task": m["task"], "model": m["label"], "arch": m["arch"],
                             "method": m["method"], "image_size": m["image_size"],
                             **{k: d[k] for k in ("host", "device", "backend", "precision", "bundle")},
                             "bundle_theoretical_peak_bytes": d["theoretical_peak_bytes"],
                             "measure": x["method"], "measure_label": x["label"], "measured_bytes": x["bytes"],
                             "measure_batch": x["batch"], **{k: x[k] for k in MEASURE_COLUMNS if k in x},
                             "notes": x["resolution_how"] or ""})
    for e in res["entries"]:
        rows.append({"kind": "run", "task": e["task"], "model": model_label(e["arch"], e["method"], e["image_size"], e["task"]),
                     "arch": e["arch"], "method": e["method"], "image_size": e["image_size"], "run": e["run"],
                     "seed": e["seed"], "n": 1, **{mt.key: e[mt.key] for mt in metrics}, **_gen(e["generation"]),
                     "notes": e["run_dir"]})
    for p in res["pairs"]:
        base = {"kind": "pair", "task": p["task"], "model": f"{p['teacher']} -> {p['student']}", "arch": p["student"],
                "method": p["method"], "image_size": p["image_size"], "gap": p["gap"], "recovered": p["recovered"],
                "theory_ratio": p["theory_ratio"], "notes": "; ".join(p["notes"])}
        for mt in metrics:
            base.update({c: p[c] for c in (mt.key, f"teacher_{mt.key}", f"student_alone_{mt.key}")})
        for x in p["measured"] or [None]:
            row = dict(base)
            if x:
                row.update(x)
            rows.append(row)
    return rows


def write_csv(res: Dict[str, Any], path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=csv_columns(res), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in csv_rows(res):
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def to_json(res: Dict[str, Any]) -> Dict[str, Any]:
    """Everything in compare.md, in bytes and raw numbers (no manifests or report bodies)."""
    metrics = list(dict.fromkeys(task_metrics().values()))
    fields = (["label", "task", "arch", "method", "image_size", "role"] + [mt.key for mt in metrics] + ["seeds"]
              + [f"onnx_{p}_{mt.onnx.name}" for mt in metrics for p in ("fp32", "int8")]
              + ["generation", "theory", "theory_source", "deployments", "notes"])
    models = []
    for m in res["models"]:
        d = {k: m[k] for k in fields}
        d["pairs"] = [list(p) for p in sorted(m["pairs"], key=str)]
        d["runs"] = [{k: v for k, v in e.items() if k != "pair"} for e in m["runs"]]
        d["bundles"] = [{"dir": b.dir, "id": b.id, "name": b.manifest.name, "precision": b.manifest.precision,
                         "task": b.manifest.task, **{mt.onnx.section: b.manifest.raw.get(mt.onnx.section) for mt in metrics},
                         "memory": b.manifest.memory, "from_run": b.from_run} for b in m["bundles"]]
        models.append(d)
    return {"sources": res["sources"], "notes": res["notes"], "models": models, "pairs": res["pairs"],
            "footprint": res.get("footprint"), "run_order": [[e["run_dir"], e["role"]] for e in res["entries"]]}


_NO_STATS = {"n": 0, "mean": None, "std": None, "min": None, "max": None}


def from_json(doc: Dict[str, Any]) -> Dict[str, Any]:
    """``to_json``'s record back into the rows the tables and plots read, so ``--pages-only`` rewrites them from
    compare.json alone. A record from before tasks (no ``task``, denoiser keys or ``run_order``) gets the default
    task, empty figures, and its runs in the order ``collect`` found them (by source, then path, teacher first)."""
    metrics = list(dict.fromkeys(task_metrics().values()))
    blank = {mt.key: None for mt in metrics}
    models = []
    for m in doc["models"]:
        m = {"task": DEFAULT_TASK, "generation": [], **{mt.key: dict(_NO_STATS) for mt in metrics},
             **{f"onnx_{p}_{mt.onnx.name}": None for mt in metrics for p in ("fp32", "int8")}, **m}
        m["runs"] = [{"task": m["task"], "generation": [], **blank, **{f"last_{k}": None for k in blank}, **e}
                     for e in m["runs"]]
        models.append(m)
    pairs = [{"task": DEFAULT_TASK, **blank, **{f"{w}_{k}": None for k in blank for w in ("teacher", "student_alone")},
              **p} for p in doc["pairs"]]
    runs = [e for m in models for e in m["runs"]]
    if doc.get("run_order") is not None:
        by_key = {(e["run_dir"], e["role"]): e for e in runs}
        entries = [by_key[(d, role)] for d, role in doc["run_order"]]
    else:
        sources = [PurePath(s).parts for s in doc["sources"]]

        def found(e):
            parts = PurePath(e["run_dir"]).parts
            return (next((i for i, s in enumerate(sources) if parts[:len(s)] == s), len(sources)), parts,
                    e["role"] != "teacher")

        entries = sorted(runs, key=found)
    return {"sources": doc["sources"], "notes": doc["notes"], "models": models, "pairs": pairs, "entries": entries,
            "footprint": doc.get("footprint")}

"""Join what ``collect`` read into rows: one per model (quality figure, theory, deployments), run and pair.

A model is (architecture, method, image size, task), so tasks never pool. Its quality figure is its task's
``TaskMetric`` (train/tasks.py): the figure's key, which way is better and the gap-recovered rule come from there.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from bench.compare.collect import Bundle, Collected, Quality, Report, Run
from bench.compare.measures import measure_row, pair_methods
from redistill.io import sha256_file
from bench.compare.records import BundleModel, Peaks, StageSummary
from train.checkpoint import load_checkpoint, model_from_checkpoint
from train.design import analyze_model
from train.losses import METHODS, methods_in_order
from train.tasks import DEFAULT_TASK, TASKS, metric_of, task_metrics

ModelKey = Tuple[str, str, Optional[int], str]  # (arch, method, image size, task)
#: the methods every pair is measured against: the teacher and the student trained alone
TEACHER, ALONE = "teacher", "student"


def method_label(method: str) -> str:
    return METHODS.get(method).label if method in METHODS else method


def _method_order(method: str) -> int:
    return METHODS.get(method).order if method in METHODS else len(METHODS.names())


def task_order(task: str) -> tuple:
    """Tables and plots list the default task (classifiers) first."""
    return (task != DEFAULT_TASK, task)


def model_label(arch, method: str, size, task: str) -> str:
    """``RED (unet-2-221, 32 px, denoiser)``: the task's label suffix, or an unknown task's name."""
    suffix = metric_of(task).label_suffix if task in TASKS else task
    return f"{method_label(method)} ({arch}, {size} px{', ' + suffix if suffix else ''})"


def _stage_task(st: Optional[StageSummary]) -> Optional[str]:
    """A stage's task: its ``task`` key, else the task whose test figure its ``best`` holds (None: unknown)."""
    if st is None:
        return None
    if st.task:
        return str(st.task)
    best = st.best.raw if st.best else {}
    return next((name for name, mt in task_metrics().items() if mt.summary_key in best), None)


def run_entries(run: Run) -> List[Dict[str, Any]]:
    """One entry per model a run trained (its teacher unless reused, its student): its task's quality figure
    (best and last), seed, checkpoint."""
    s, rdir = run.summary, Path(run.dir)
    task = next((t for t in (_stage_task(s.stage(r)) for r in ("student", "teacher")) if t), None) \
        or run.config_value("task") or DEFAULT_TASK
    size = run.config_value("data", "image_size") or s.memory.image_size
    t_arch = (s.teacher.arch if s.teacher else None) or run.config_value("teacher", "arch")
    s_arch = (s.student.arch if s.student else None) or run.config_value("student", "arch")
    out = []
    for role in ("teacher", "student"):
        st = s.stage(role)
        if st is None or st.best is None:
            continue  # not trained here (a reused teacher, or a teacher-only run's student)
        ck = rdir / role / "best.pt"
        e = {"run": s.name or rdir.name, "run_dir": str(rdir), "seed": run.config_value("seed"), "role": role,
             "arch": st.arch, "method": st.method or (TEACHER if role == "teacher" else s.method),
             "image_size": size, "task": task, "pair": (t_arch, s_arch, size, task)}
        for mt in task_metrics().values():
            e[mt.key] = st.best.get(mt.summary_key)
            e[f"last_{mt.key}"] = st.last.get(mt.summary_key) if st.last else None
        e.update({"generation": [], "epoch": st.best.epoch, "test_images": st.best.test_images,
                  "picked_by": st.picked_by, "checkpoint": str(ck) if ck.is_file() else None,
                  "summary_peak_bytes": s.memory.peak_of(role)})
        out.append(e)
    return out


def key_of(arch, method, size, task=DEFAULT_TASK) -> ModelKey:
    return (str(arch), str(method), int(size) if size else None, str(task or DEFAULT_TASK))


def model_key(m: Dict[str, Any]) -> ModelKey:
    return (m["arch"], m["method"], m["image_size"], m["task"])


def _stats(values: List[float]) -> Dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def integrity_notes(r) -> List[str]:
    """A report whose bundle id (computed on the device) differs from the id the server verified at deploy time
    or from the one export recorded measured a manifest edited after export: its figures are not the bundle's."""
    ids = {"verified at deploy": r.deploy.bundle_id, "recorded at export": r.deploy.exported_bundle_id}
    return [f"manifest differs from the one {what} (device {str(r.bundle.id)[:12]}, {what} {i[:12]})"
            for what, i in ids.items() if i and i != r.bundle.id]


def deployment_row(item: Report, bundles_by_id: Dict[str, Bundle]) -> Dict[str, Any]:
    """One device report flattened: where, on what, measured memory and latency, theory from its bundle."""
    r, path = item.report, Path(item.path)
    b = r.bundle
    found = bundles_by_id.get(b.id)
    manifest = found.manifest if found else None
    theory = (manifest.memory if manifest else None) or r.memory.theoretical_detail or {}
    theo = theory.get("peak_bytes") or r.memory.theoretical_peak_bytes
    act = r.memory.activation_bytes
    peaks = {"peak_bytes": theo, "inplace_peak_bytes": theory.get("inplace_peak_bytes"),
             "layerwise_peak_bytes": theory.get("layerwise_peak_bytes")}
    return {
        "host": r.deploy.host or path.parent.parent.name, "device": r.device.model or r.device.machine,
        "backend": r.backend.name, "precision": r.backend.precision or b.precision, "bundle": b.name or path.parent.name,
        "bundle_id": b.id, "bundle_precision": b.precision,
        "theoretical_peak_bytes": theo, "theoretical_inplace_peak_bytes": theory.get("inplace_peak_bytes"),
        "activation_bytes": act, "process_peak_bytes": r.memory.process_peak_bytes,
        "ratio_measured_theoretical": ratio(act, theo),
        "ratio_measured_inplace": ratio(act, theory.get("inplace_peak_bytes")),
        "latency_p50_ms": r.latency.p50_ms, "latency_p99_ms": r.latency.p99_ms,
        "output_check_passed": r.output_check_passed,
        "created": r.created or r.deploy.server_time or path.stem, "report": str(path),
        "model": b.model or (manifest.model.raw if manifest else None) or {},
        "task": b.task or (manifest.task if manifest else None) or DEFAULT_TASK,
        "notes": integrity_notes(r),
        "theoretical_layerwise_peak_bytes": theory.get("layerwise_peak_bytes"),
        "measures": [measure_row(f, peaks) for f in r.memory.figures],
        "per_image_skipped": r.memory.per_image_skipped,
    }


def newest_reports(c: Collected) -> List[Dict[str, Any]]:
    """The newest report per (host, bundle, backend, precision), flattened by ``deployment_row``."""
    by_id = {b.id: b for b in c.bundles}
    newest: Dict[tuple, Dict[str, Any]] = {}
    for item in c.reports:
        row = deployment_row(item, by_id)
        k = (row["host"], row["bundle_id"] or row["bundle"], row["backend"], row["precision"])
        if k not in newest or (row["created"], row["report"]) > (newest[k]["created"], newest[k]["report"]):
            newest[k] = row
    return sorted(newest.values(), key=lambda r: (r["host"], r["bundle"], str(r["backend"]), str(r["precision"])))


def build(c: Collected, analyze: bool = True) -> Dict[str, Any]:
    """Join everything into model rows (quality figure, theory, deployments), per-run rows and pair rows."""
    entries = [e for run in c.runs for e in run_entries(run)]
    deployments = newest_reports(c)
    sha_to_entry = {sha256_file(e["checkpoint"]): e for e in entries if e["checkpoint"]}
    models: Dict[ModelKey, Dict[str, Any]] = {}

    def model(key: ModelKey, role=None) -> Dict[str, Any]:
        if key not in models:
            models[key] = {"arch": key[0], "method": key[1], "image_size": key[2], "task": key[3], "role": role,
                           "label": model_label(*key), "generation": [], "runs": [], "bundles": [], "deployments": [],
                           "notes": [], "pairs": set(), "theory": None, "theory_source": None, "checkpoint": None}
        if role and not models[key]["role"]:
            models[key]["role"] = role
        return models[key]

    notes = list(c.notes)
    _join_quality(c.quality, entries, sha_to_entry, notes)
    for e in entries:
        m = model(key_of(e["arch"], e["method"], e["image_size"], e["task"]), e["role"])
        m["runs"].append(e)
        m["generation"] += e["generation"]
        m["pairs"].add(e["pair"])
        m["checkpoint"] = m["checkpoint"] or e["checkpoint"]
    for b in sorted(c.bundles, key=lambda b: str(b.manifest.created), reverse=True):
        mm = b.manifest.model
        src = sha_to_entry.get(mm.checkpoint.sha256)
        b.from_run = f"{src['run']} (seed {src['seed']})" if src else None
        model(key_of(mm.arch, mm.method, mm.image_size, b.manifest.task), mm.role)["bundles"].append(b)
    for d in deployments:
        mm = BundleModel.from_dict(d["model"])
        model(key_of(mm.arch, mm.method, mm.image_size, d["task"]), mm.role)["deployments"].append(d)

    analyses: Dict[ModelKey, Any] = {}
    for key, m in models.items():
        _quality_figures(m)
        _theory(key, m, analyses, analyze)
        if not m["deployments"]:
            m["notes"].append("not deployed (no device report)")
    _share_theory(models)
    pairs = pair_rows(models)
    ordered = sorted(models.values(), key=lambda m: (*task_order(m["task"]), str(m["image_size"]),
                                                     _method_order(m["method"]), m["arch"]))
    return {"models": ordered, "pairs": pairs, "analyses": analyses, "notes": notes,
            "sources": list(c.sources), "entries": entries}


def _generation_of(q: Quality) -> Dict[str, Any]:
    """The figures of one `redistill quality` result that the tables show."""
    r, st = q.result, q.result.samples
    return {"cfd": r.cfd, "precision": r.precision, "recall": r.recall, "fid": r.fid, "n_generated": r.n_generated,
            "n_real": r.n_real, "k": r.k, "sampler": st.sampler, "steps": st.steps, "guidance": st.guidance,
            "classifier": r.classifier_arch, "file": q.path}


def _join_quality(quality: List[Quality], entries, sha_to_entry, notes: List[str]) -> None:
    """Attach each quality result to the run entry whose checkpoint was sampled (by sha256, else by path)."""
    by_path = {str(Path(e["checkpoint"]).resolve()): e for e in entries if e["checkpoint"]}
    for q in quality:
        r, st = q.result, q.result.samples
        e = sha_to_entry.get(st.checkpoint_sha256)
        for cand in (st.checkpoint, r.input):
            if e is None and cand:
                e = by_path.get(str(Path(cand).resolve()))
        if e is None:
            notes.append(f"quality {q.path}: its checkpoint ({st.checkpoint or r.input}) is not a best.pt of the runs "
                         f"found; not shown")
        else:
            e["generation"].append(_generation_of(q))


def _quality_figures(m: Dict[str, Any]) -> None:
    """Every task's figure over the model's runs (one per seed; only its own task's is filled), and the FP32/INT8
    ONNX figures of its newest bundles (``onnx_fp32_NAME``, ``onnx_int8_NAME``)."""
    metrics = task_metrics().values()
    for mt in metrics:
        m[mt.key] = _stats([e[mt.key] for e in m["runs"] if e[mt.key] is not None])
    m["seeds"] = [e["seed"] for e in m["runs"]]
    fp32 = next((b for b in m["bundles"] if b.manifest.precision == "fp32"), None)
    int8 = next((b for b in m["bundles"] if b.manifest.precision == "int8"), None)
    for mt in metrics:
        o = mt.onnx
        m[f"onnx_fp32_{o.name}"] = (fp32 or int8).manifest.section(o.section).get(o.fp32) if fp32 or int8 else None
        m[f"onnx_int8_{o.name}"] = int8.manifest.section(o.section).get(o.int8) if int8 else None
    m["fp32_bundle"], m["int8_bundle"] = fp32, int8
    if not m["runs"]:
        m["notes"].append(f"no distillation run found ({metric_of(m['task']).noun} from the bundle only)"
                          if m["bundles"] else "no distillation run found")
    if not m["bundles"]:
        m["notes"].append("no bundle (not exported)")
    elif not int8:
        m["notes"].append("no INT8 bundle")


def _theory(key: ModelKey, m: Dict[str, Any], analyses: Dict[ModelKey, Any], analyze: bool) -> None:
    """Theoretical peaks (FP32 graph): the FP32 bundle's manifest, else an analysis of the checkpoint, else the run summary."""
    b = m["fp32_bundle"]
    if b and b.manifest.peaks.peak_bytes:
        m["theory"] = b.manifest.peaks.to_dict()
        m["theory_source"] = f"bundle {b.manifest.name or Path(b.dir).name} manifest"
        return
    if analyze and m["checkpoint"]:
        try:
            report = analyze_checkpoint(m["checkpoint"], name=m["label"])
        except Exception as e:  # an unreadable checkpoint must not stop the table
            m["notes"].append(f"could not analyse {m['checkpoint']}: {e}")
        else:
            analyses[key] = report
            m["theory"] = Peaks(report.peak_bytes, report.inplace_peak_bytes, report.layerwise_peak_bytes).to_dict()
            m["theory_source"] = f"analysis of {m['checkpoint']}"
            return
    peaks = [e["summary_peak_bytes"] for e in m["runs"] if e["summary_peak_bytes"]]
    if peaks:
        m["theory"] = Peaks(peaks[0]).to_dict()
        m["theory_source"] = "run summary.json (liveness only)"
    else:
        m["notes"].append("no theoretical peak (no bundle, checkpoint or run memory figure)")


def _share_theory(models: Dict[ModelKey, Dict[str, Any]]) -> None:
    """Methods with the same graph (student alone and KD: no RED blocks; RED and RED+KD: with them) share a
    theoretical figure: a model without its own takes its twin's."""
    students = [x for x in methods_in_order() if not x.teacher_only]
    for (arch, method, size, task), m in models.items():
        if m["theory"] is not None or method not in METHODS or METHODS.get(method).teacher_only:
            continue
        sites = METHODS.get(method).needs_sites
        twin = next((t for t in (models.get((arch, x.name, size, task)) for x in students
                                 if x.name != method and x.needs_sites == sites) if t and t["theory"]), None)
        if twin:
            m["theory"] = dict(twin["theory"])
            m["theory_source"] = f"same graph as {method_label(twin['method'])} ({twin['theory_source']})"
            m["notes"] = [n for n in m["notes"] if not n.startswith("no theoretical peak")]


def analyze_checkpoint(path: str, name: Optional[str] = None):
    """redistill.memory analysis (in-place included) of a checkpoint's network, rebuilt with its RED blocks."""
    ck = load_checkpoint(path)
    return analyze_model(model_from_checkpoint(ck).eval(), ck["image_size"], inplace=True, name=name or ck["arch"])


def pair_order(p) -> tuple:
    return (task_order(p[3])[0], str(p))


def pair_rows(models: Dict[ModelKey, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (teacher, student arch, size, task) pair and student method: the gap recovered and teacher/student ratios.

    gap = how much better the teacher's figure is than the student alone's; recovered = the fraction of it a method
    closes (``TaskMetric.gap`` / ``recovered``): 0 is no better than the student alone, 1 matches the teacher.
    """
    rows = []
    pairs = sorted({p for m in models.values() for p in m["pairs"] if p[0] and p[1]}, key=pair_order)
    students = [x.name for x in methods_in_order() if not x.teacher_only]
    metrics = task_metrics().values()
    for t_arch, s_arch, size, task in pairs:
        mt = metric_of(task)
        k = mt.key
        t = models.get(key_of(t_arch, TEACHER, size, task))
        alone = models.get(key_of(s_arch, ALONE, size, task))
        t_q = (t or {}).get(k, {}).get("mean")
        a_q = (alone or {}).get(k, {}).get("mean")
        gap = mt.gap(t_q, a_q)
        for method in students:
            s = models.get(key_of(s_arch, method, size, task))
            if s is None:
                continue
            q = s[k]["mean"]
            row = {"teacher": t_arch, "student": s_arch, "image_size": size, "task": task, "method": method, "metric": k}
            for x in metrics:
                row.update({f"teacher_{x.key}": None, f"student_alone_{x.key}": None, x.key: None})
            row.update({f"teacher_{k}": t_q, f"student_alone_{k}": a_q, k: q, "gap": gap,
                        "recovered": mt.recovered(q, a_q, gap) if method != ALONE else None,
                        "theory_ratio": ratio(((t or {}).get("theory") or {}).get("peak_bytes"),
                                              (s.get("theory") or {}).get("peak_bytes")),
                        "measured": [], "notes": []})
            if t is None:
                row["notes"].append("no teacher run")
            if alone is None:
                row["notes"].append("no student-alone run: gap and recovery need one")
            t_dep = {(d["host"], d["backend"], d["precision"]): d for d in (t or {}).get("deployments", [])}
            for d in s["deployments"]:
                td = t_dep.get((d["host"], d["backend"], d["precision"]))
                if td:
                    row["measured"].append({"host": d["host"], "backend": d["backend"], "precision": d["precision"],
                                            "activation_ratio": ratio(td["activation_bytes"], d["activation_bytes"]),
                                            "latency_p50_ratio": ratio(td["latency_p50_ms"], d["latency_p50_ms"]),
                                            **({"methods": pair_methods(td, d)} if "measures" in d else {})})
            if not row["measured"]:
                row["notes"].append("teacher and student not measured on the same device/backend")
            rows.append(row)
    return rows

"""``redistill compare``: join distillation runs, bundles and device reports into tables and plots.

Classifiers and DDPM denoisers are both handled: every model, pair and plot is keyed by the task too
(``classify`` or ``denoise``), a classifier's quality figure is its test top-1 (higher is better), a
denoiser's its test denoising loss (lower is better), and the two never share a column or an axis.

Pipeline, one function each: ``collect`` (find and read the files) -> ``build`` (model, deployment,
run and pair rows) -> ``render_markdown`` / ``write_csv`` / ``write_json`` -> the three ``plot_*``
functions. ``compare`` runs it all. See docs/compare.md for what every column means.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from redistill.errors import UserError
from redistill.io import atomic_write, atomic_write_json, atomic_write_text, sha256_file

BUNDLE_SCHEMA = "redistill-bundle"
REPORT_SCHEMA = "redistill-device-report"
METHOD_ORDER = ("teacher", "student", "kd", "red", "red_kd")
METHOD_LABEL = {"teacher": "teacher", "student": "student alone", "kd": "KD", "red": "RED", "red_kd": "RED+KD"}
RED_METHODS = ("red", "red_kd")
OUTPUT_FILES = ("compare.md", "compare.csv", "compare.json", "memory_theory_vs_measured.png",
                "accuracy_vs_peak_memory.png", "footprint_teacher_vs_student_red.png")
DENOISER_PLOT = "denoising_loss_vs_peak_memory.png"  # written only when denoisers were found
CLASSIFY, DENOISE = "classify", "denoise"

_WRITER = {"runs": "distill", "bundles": "export", "reports": "deploy"}
ModelKey = Tuple[str, str, Optional[int], str]  # (arch, method, image size, task)


# --- collect ------------------------------------------------------------------------------------


@dataclass
class Collected:
    """Every run, bundle and device report found, as read from disk (plus where each came from)."""

    runs: List[Dict[str, Any]] = field(default_factory=list)
    bundles: List[Dict[str, Any]] = field(default_factory=list)
    reports: List[Dict[str, Any]] = field(default_factory=list)
    quality: List[Dict[str, Any]] = field(default_factory=list)  # `redistill quality --json` results
    sources: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _is_run_summary(d: Optional[Dict[str, Any]]) -> bool:
    return bool(d) and "method" in d and "run_dir" in d and "role" not in d


def _is_quality(d: Optional[Dict[str, Any]]) -> bool:
    """A `redistill quality --json` result (CFD, precision and recall of a denoiser's samples)."""
    return bool(d) and "cfd" in d and "cfd_name" in d and "precision" in d and "recall" in d


def read_quality(path: Path) -> Dict[str, Any]:
    d = _read_json(path)
    if not _is_quality(d):
        raise UserError(f"{path} is not a quality report: give a file written by `redistill quality --json`")
    return {"path": str(path), "quality": d}


def _hidden(path: Path, root: Path) -> bool:
    """Temp folders of atomic writes (``.name.xxx.tmp``) and other dot folders are skipped."""
    return any(p.startswith(".") for p in path.relative_to(root).parts)


def read_run(run_dir: Path) -> Dict[str, Any]:
    """A run folder's summary.json, its config.yaml (seed, image size, pair) and its checkpoints' paths."""
    summary = _read_json(run_dir / "summary.json")
    if not _is_run_summary(summary):
        raise UserError(f"{run_dir} is not a finished run (no run-level summary.json): give runs/NAME of a "
                        f"`redistill distill` run that completed")
    config: Dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return {"dir": str(run_dir), "summary": summary, "config": config}


def read_bundle(bundle_dir: Path) -> Dict[str, Any]:
    """A bundle's manifest (plus its id, the sha256 of manifest.json, which device reports carry)."""
    from export.bundle import bundle_id, read_manifest

    manifest = read_manifest(bundle_dir)
    return {"dir": str(bundle_dir), "id": bundle_id(bundle_dir), "manifest": manifest}


def read_report(path: Path) -> Dict[str, Any]:
    d = _read_json(path)
    if not d or d.get("schema") != REPORT_SCHEMA:
        raise UserError(f"{path} is not a device report ({REPORT_SCHEMA}): give a file written by `redistill deploy`")
    return {"path": str(path), "report": d}


def _scan(root: Path, c: Collected) -> int:
    """Add every run, bundle and report under ``root``; returns how many were found."""
    found = 0
    for p in sorted(root.rglob("*.json")):
        if _hidden(p, root):
            continue
        if p.name == "summary.json":
            if _is_run_summary(_read_json(p)):
                c.runs.append(read_run(p.parent))
                found += 1
        elif p.name == "manifest.json":
            d = _read_json(p)
            if d and d.get("schema") == BUNDLE_SCHEMA:
                c.bundles.append(read_bundle(p.parent))
                found += 1
        else:
            d = _read_json(p)
            if d and d.get("schema") == REPORT_SCHEMA:
                c.reports.append({"path": str(p), "report": d})
                found += 1
            elif _is_quality(d):  # joins a run only; not counted as something found
                c.quality.append({"path": str(p), "quality": d})
    return found


def collect(paths: Sequence[str] = (), runs: Optional[str] = None, bundles: Optional[str] = None,
            reports: Optional[str] = None, quality: Sequence[str] = ()) -> Collected:
    """Read runs, bundles and reports from ``paths`` and the given folders; with neither, the default folders.

    A folder named explicitly must exist; a default one that is missing only adds a note. ``quality``:
    `redistill quality --json` files (also accepted among ``paths``, and found when scanning folders),
    joined to the denoiser run whose checkpoint was sampled.
    """
    c = Collected()
    for q in map(Path, quality):
        if not q.is_file():
            raise UserError(f"{q} not found: give a JSON file written by `redistill quality --json`")
        c.quality.append(read_quality(q))
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} not found: give a run folder (runs/NAME), a bundle folder (bundles/NAME), a "
                            f"device report file or folder (reports/HOST) or a quality JSON file")
        c.sources.append(str(p))
        if p.is_file():
            d = _read_json(p)
            if _is_quality(d):
                c.quality.append({"path": str(p), "quality": d})
            else:
                c.reports.append(read_report(p))
        elif (p / "manifest.json").is_file():
            c.bundles.append(read_bundle(p))
        elif (p / "summary.json").is_file() and _is_run_summary(_read_json(p / "summary.json")):
            c.runs.append(read_run(p))
        elif not _scan(p, c):
            c.notes.append(f"{p}: no runs, bundles or device reports found")
    explicit = {"runs": runs, "bundles": bundles, "reports": reports}
    defaults = {k: v or k for k, v in explicit.items()} if not paths else {k: v for k, v in explicit.items() if v}
    for kind, folder in defaults.items():
        p = Path(folder)
        if not p.is_dir():
            if explicit[kind]:
                raise UserError(f"--{kind} {folder} is not a folder: give the folder `redistill {_WRITER[kind]}` wrote to")
            c.notes.append(f"no {kind} folder at {folder}: nothing from that stage")
            continue
        c.sources.append(str(p))
        _scan(p, c)
    _dedupe(c)
    if not (c.runs or c.bundles or c.reports):
        raise UserError("no runs, bundles or device reports found in " + (", ".join(c.sources) or "the default folders")
                        + ": run `make distill` (and `make export`, `make deploy`) first, or give their paths")
    return c


def _dedupe(c: Collected) -> None:
    """The same file reached twice (a PATH inside a scanned folder) counts once."""
    for attr, key in (("runs", "dir"), ("bundles", "dir"), ("reports", "path"), ("quality", "path")):
        seen, kept = set(), []
        for item in getattr(c, attr):
            k = str(Path(item[key]).resolve())
            if k not in seen:
                seen.add(k)
                kept.append(item)
        setattr(c, attr, kept)


# --- rows ---------------------------------------------------------------------------------------


def _stage_task(st: Dict[str, Any]) -> Optional[str]:
    """A stage summary's task: its ``task`` key, else ``denoise`` when it has a denoising loss (None: unknown)."""
    if st.get("task"):
        return str(st["task"])
    if "test_diffusion_loss" in (st.get("best") or {}):
        return DENOISE
    return CLASSIFY if "test_top1" in (st.get("best") or {}) else None


def run_entries(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One entry per model a run trained (its teacher unless reused, its student): quality figure (test top-1 of a
    classifier, test denoising loss of a denoiser), seed, checkpoint."""
    s, cfg, rdir = run["summary"], run["config"], Path(run["dir"])
    task = next((t for t in (_stage_task(s.get(r) or {}) for r in ("student", "teacher")) if t), None) \
        or cfg.get("task") or CLASSIFY
    size = (cfg.get("data") or {}).get("image_size") or (s.get("memory") or {}).get("image_size")
    t_arch = (s.get("teacher") or {}).get("arch") or (cfg.get("teacher") or {}).get("arch")
    s_arch = (s.get("student") or {}).get("arch") or (cfg.get("student") or {}).get("arch")
    out = []
    for role in ("teacher", "student"):
        st = s.get(role) or {}
        if not st.get("best"):
            continue  # not trained here (a reused teacher, or a teacher-only run's student)
        ck = rdir / role / "best.pt"
        mem = s.get("memory") or {}
        out.append({
            "run": s.get("name") or rdir.name, "run_dir": str(rdir), "seed": cfg.get("seed"), "role": role,
            "arch": st.get("arch"), "method": st.get("method") or ("teacher" if role == "teacher" else s.get("method")),
            "image_size": size, "task": task, "pair": (t_arch, s_arch, size, task),
            "top1": st["best"].get("test_top1"), "last_top1": (st.get("last") or {}).get("test_top1"),
            "diffusion_loss": st["best"].get("test_diffusion_loss"),
            "last_diffusion_loss": (st.get("last") or {}).get("test_diffusion_loss"), "generation": [],
            "epoch": st["best"].get("epoch"), "test_images": st["best"].get("test_images"),
            "picked_by": st.get("picked_by"), "checkpoint": str(ck) if ck.is_file() else None,
            "summary_peak_bytes": mem.get(f"{role}_peak_bytes"),
        })
    return out


def _key(arch, method, size, task=CLASSIFY) -> ModelKey:
    return (str(arch), str(method), int(size) if size else None, str(task or CLASSIFY))


def _mkey(m: Dict[str, Any]) -> ModelKey:
    return (m["arch"], m["method"], m["image_size"], m["task"])


def _stats(values: List[float]) -> Dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def _memory_of(report) -> Dict[str, Any]:
    return {"peak_bytes": report.peak_bytes, "inplace_peak_bytes": report.inplace_peak_bytes,
            "layerwise_peak_bytes": report.layerwise_peak_bytes}


def deployment_row(item: Dict[str, Any], bundles_by_id: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """One device report flattened: where, on what, measured memory and latency, theory from its bundle."""
    r, path = item["report"], Path(item["path"])
    b = r.get("bundle") or {}
    dep = r.get("deploy") or {}
    backend = r.get("backend") or {}
    mem = r.get("memory") or {}
    lat = r.get("latency") or {}
    manifest = (bundles_by_id.get(b.get("id")) or {}).get("manifest") or {}
    theory = (manifest.get("memory") or (mem.get("theoretical_peak") or {}).get("detail") or {})
    theo = theory.get("peak_bytes") or (mem.get("theoretical_peak") or {}).get("bytes")
    act = (mem.get("activation") or {}).get("bytes")
    return {
        "host": dep.get("host") or path.parent.parent.name, "device": (r.get("device") or {}).get("model")
        or (r.get("device") or {}).get("machine"), "backend": backend.get("name"),
        "precision": backend.get("precision") or b.get("precision"), "bundle": b.get("name") or path.parent.name,
        "bundle_id": b.get("id"), "bundle_precision": b.get("precision"),
        "theoretical_peak_bytes": theo, "theoretical_inplace_peak_bytes": theory.get("inplace_peak_bytes"),
        "activation_bytes": act, "process_peak_bytes": (mem.get("process_peak") or {}).get("bytes"),
        "ratio_measured_theoretical": _ratio(act, theo),
        "ratio_measured_inplace": _ratio(act, theory.get("inplace_peak_bytes")),
        "latency_p50_ms": lat.get("p50_ms"), "latency_p99_ms": lat.get("p99_ms"),
        "output_check_passed": (r.get("output_check") or {}).get("passed"),
        "created": r.get("created") or dep.get("server_time") or path.stem, "report": str(path),
        "model": b.get("model") or manifest.get("model") or {}, "task": b.get("task") or manifest.get("task") or CLASSIFY,
    }


def newest_reports(c: Collected) -> List[Dict[str, Any]]:
    """The newest report per (host, bundle, backend, precision), flattened by ``deployment_row``."""
    by_id = {b["id"]: b for b in c.bundles}
    newest: Dict[tuple, Dict[str, Any]] = {}
    for item in c.reports:
        row = deployment_row(item, by_id)
        k = (row["host"], row["bundle_id"] or row["bundle"], row["backend"], row["precision"])
        if k not in newest or (row["created"], row["report"]) > (newest[k]["created"], newest[k]["report"]):
            newest[k] = row
    return sorted(newest.values(), key=lambda r: (r["host"], r["bundle"], str(r["backend"]), str(r["precision"])))


def build(c: Collected, analyze: bool = True) -> Dict[str, Any]:
    """Join everything into model rows (accuracy, theory, deployments), per-run rows and pair rows."""
    entries = [e for run in c.runs for e in run_entries(run)]
    deployments = newest_reports(c)
    sha_to_entry = {}
    for e in entries:
        if e["checkpoint"]:
            sha_to_entry[sha256_file(e["checkpoint"])] = e
    models: Dict[ModelKey, Dict[str, Any]] = {}

    def model(key: ModelKey, role=None) -> Dict[str, Any]:
        if key not in models:
            kind = ", denoiser" if key[3] == DENOISE else "" if key[3] == CLASSIFY else f", {key[3]}"
            models[key] = {"arch": key[0], "method": key[1], "image_size": key[2], "task": key[3], "role": role,
                           "label": f"{METHOD_LABEL.get(key[1], key[1])} ({key[0]}, {key[2]} px{kind})",
                           "generation": [], "runs": [], "bundles": [], "deployments": [], "notes": [], "pairs": set(),
                           "theory": None, "theory_source": None, "checkpoint": None}
        if role and not models[key]["role"]:
            models[key]["role"] = role
        return models[key]

    notes = list(c.notes)
    _join_quality(c, entries, sha_to_entry, notes)
    for e in entries:
        m = model(_key(e["arch"], e["method"], e["image_size"], e["task"]), e["role"])
        m["runs"].append(e)
        m["generation"] += e["generation"]
        m["pairs"].add(e["pair"])
        m["checkpoint"] = m["checkpoint"] or e["checkpoint"]
    for b in sorted(c.bundles, key=lambda b: str(b["manifest"].get("created")), reverse=True):
        mm = b["manifest"].get("model") or {}
        sha = (mm.get("checkpoint") or {}).get("sha256")
        src = sha_to_entry.get(sha)
        b["from_run"] = f"{src['run']} (seed {src['seed']})" if src else None
        task = b["manifest"].get("task") or CLASSIFY
        m = model(_key(mm.get("arch"), mm.get("method"), mm.get("image_size"), task), mm.get("role"))
        m["bundles"].append(b)
    for d in deployments:
        mm = d["model"]
        model(_key(mm.get("arch"), mm.get("method"), mm.get("image_size"), d["task"]),
              mm.get("role"))["deployments"].append(d)

    analyses: Dict[ModelKey, Any] = {}
    for key, m in models.items():
        _accuracy(m)
        _theory(key, m, analyses, analyze)
        if not m["deployments"]:
            m["notes"].append("not deployed (no device report)")
    _share_theory(models)
    pairs = pair_rows(models)
    ordered = sorted(models.values(), key=lambda m: (m["task"] != CLASSIFY, m["task"],
        str(m["image_size"]), METHOD_ORDER.index(m["method"]) if m["method"] in METHOD_ORDER else 9, m["arch"]))
    return {"models": ordered, "pairs": pairs, "analyses": analyses, "notes": notes,
            "sources": list(c.sources), "entries": entries}


def _generation_of(q: Dict[str, Any]) -> Dict[str, Any]:
    """The figures of one `redistill quality` result that the tables show."""
    d, st = q["quality"], q["quality"].get("samples") or {}
    return {"cfd": d.get("cfd"), "precision": d.get("precision"), "recall": d.get("recall"), "fid": d.get("fid"),
            "n_generated": d.get("n_generated"), "n_real": d.get("n_real"), "k": d.get("k"),
            "sampler": st.get("sampler"), "steps": st.get("steps"), "guidance": st.get("guidance"),
            "classifier": (d.get("classifier") or {}).get("arch"), "file": q["path"]}


def _join_quality(c: Collected, entries, sha_to_entry, notes: List[str]) -> None:
    """Attach each quality result to the run entry whose checkpoint was sampled (by sha256, else by path)."""
    by_path = {str(Path(e["checkpoint"]).resolve()): e for e in entries if e["checkpoint"]}
    for q in c.quality:
        d = q["quality"]
        st = d.get("samples") or {}
        e = sha_to_entry.get(st.get("checkpoint_sha256"))
        for cand in (st.get("checkpoint"), d.get("input")):
            if e is None and cand:
                e = by_path.get(str(Path(cand).resolve()))
        if e is None:
            notes.append(f"quality {q['path']}: its checkpoint ({st.get('checkpoint') or d.get('input')}) is not a "
                         f"best.pt of the runs found; not shown")
        else:
            e["generation"].append(_generation_of(q))


def _accuracy(m: Dict[str, Any]) -> None:
    """Test top-1 (classifiers) or test denoising loss (denoisers) over the model's runs (one per seed), and the
    FP32/INT8 ONNX top-1 (classifiers) or denoising MSE (denoisers) of its newest bundles."""
    m["top1"] = _stats([e["top1"] for e in m["runs"] if e["top1"] is not None])
    m["diffusion_loss"] = _stats([e["diffusion_loss"] for e in m["runs"] if e["diffusion_loss"] is not None])
    m["seeds"] = [e["seed"] for e in m["runs"]]
    fp32 = next((b for b in m["bundles"] if b["manifest"].get("precision") == "fp32"), None)
    int8 = next((b for b in m["bundles"] if b["manifest"].get("precision") == "int8"), None)
    m["onnx_fp32_top1"] = ((fp32 or int8 or {}).get("manifest", {}).get("accuracy") or {}).get("fp32_top1")
    m["onnx_int8_top1"] = ((int8 or {}).get("manifest", {}).get("accuracy") or {}).get("int8_top1")
    m["onnx_fp32_mse"] = ((fp32 or int8 or {}).get("manifest", {}).get("denoising") or {}).get("fp32_onnx_mse")
    m["onnx_int8_mse"] = ((int8 or {}).get("manifest", {}).get("denoising") or {}).get("int8_onnx_mse")
    m["fp32_bundle"], m["int8_bundle"] = fp32, int8
    what = "denoising MSE" if m["task"] == DENOISE else "accuracy"
    if not m["runs"]:
        m["notes"].append(f"no distillation run found ({what} from the bundle only)" if m["bundles"]
                          else "no distillation run found")
    if not m["bundles"]:
        m["notes"].append("no bundle (not exported)")
    elif not int8:
        m["notes"].append("no INT8 bundle")


def _theory(key: ModelKey, m: Dict[str, Any], analyses: Dict[ModelKey, Any], analyze: bool) -> None:
    """Theoretical peaks (FP32 graph): the FP32 bundle's manifest, else an analysis of the checkpoint, else the run summary."""
    b = m["fp32_bundle"]
    if b and (b["manifest"].get("memory") or {}).get("peak_bytes"):
        m["theory"] = {k: b["manifest"]["memory"].get(k) for k in ("peak_bytes", "inplace_peak_bytes", "layerwise_peak_bytes")}
        m["theory_source"] = f"bundle {b['manifest'].get('name') or Path(b['dir']).name} manifest"
        return
    if analyze and m["checkpoint"]:
        try:
            report = analyze_checkpoint(m["checkpoint"], name=m["label"])
        except Exception as e:  # an unreadable checkpoint must not stop the table
            m["notes"].append(f"could not analyse {m['checkpoint']}: {e}")
        else:
            analyses[key] = report
            m["theory"] = _memory_of(report)
            m["theory_source"] = f"analysis of {m['checkpoint']}"
            return
    peaks = [e["summary_peak_bytes"] for e in m["runs"] if e["summary_peak_bytes"]]
    if peaks:
        m["theory"] = {"peak_bytes": peaks[0], "inplace_peak_bytes": None, "layerwise_peak_bytes": None}
        m["theory_source"] = "run summary.json (liveness only)"
    else:
        m["notes"].append("no theoretical peak (no bundle, checkpoint or run memory figure)")


def _share_theory(models: Dict[ModelKey, Dict[str, Any]]) -> None:
    """Student alone and KD run one graph (no RED blocks), RED and RED+KD another: a model without its own
    theoretical figure takes its twin's."""
    twins = {"student": "kd", "kd": "student", "red": "red_kd", "red_kd": "red"}
    for (arch, method, size, task), m in models.items():
        twin = models.get((arch, twins.get(method, ""), size, task))
        if m["theory"] is None and twin and twin["theory"]:
            m["theory"] = dict(twin["theory"])
            m["theory_source"] = f"same graph as {METHOD_LABEL[twin['method']]} ({twin['theory_source']})"
            m["notes"] = [n for n in m["notes"] if not n.startswith("no theoretical peak")]


def analyze_checkpoint(path: str, name: Optional[str] = None):
    """redistill.memory analysis (in-place included) of a checkpoint's network, rebuilt with its RED blocks."""
    from train.design import analyze_model
    from train.checkpoint import load_checkpoint, model_from_checkpoint

    ck = load_checkpoint(path)
    return analyze_model(model_from_checkpoint(ck).eval(), ck["image_size"], inplace=True, name=name or ck["arch"])


def _pair_order(p) -> tuple:
    return (p[3] != CLASSIFY, str(p))


def pair_rows(models: Dict[ModelKey, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (teacher, student arch, size, task) pair and student method: the gap recovered and teacher/student ratios.

    Classifiers: gap = teacher top-1 - student-alone top-1 (points), recovered = (method - alone) / gap.
    Denoisers (test denoising loss, lower is better): gap = student-alone loss - teacher loss,
    recovered = (alone - method) / gap. Either way 0 is no better than the student alone, 1 matches the teacher.
    """
    rows = []
    pairs = sorted({p for m in models.values() for p in m["pairs"] if p[0] and p[1]}, key=_pair_order)
    for t_arch, s_arch, size, task in pairs:
        metric = "diffusion_loss" if task == DENOISE else "top1"
        sign = -1.0 if task == DENOISE else 1.0  # so that a positive gap is always "the teacher is better"
        t = models.get(_key(t_arch, "teacher", size, task))
        alone = models.get(_key(s_arch, "student", size, task))
        t_q = (t or {}).get(metric, {}).get("mean")
        a_q = (alone or {}).get(metric, {}).get("mean")
        gap = sign * (t_q - a_q) if t_q is not None and a_q is not None else None
        for method in METHOD_ORDER[1:]:
            s = models.get(_key(s_arch, method, size, task))
            if s is None:
                continue
            q = s[metric]["mean"]
            row = {"teacher": t_arch, "student": s_arch, "image_size": size, "task": task, "method": method,
                   "metric": metric, "teacher_top1": None, "student_alone_top1": None, "top1": None,
                   "teacher_diffusion_loss": None, "student_alone_diffusion_loss": None, "diffusion_loss": None,
                   "gap": gap,
                   "recovered": sign * (q - a_q) / gap if gap and q is not None and method != "student" else None,
                   "theory_ratio": _ratio(((t or {}).get("theory") or {}).get("peak_bytes"),
                                          (s.get("theory") or {}).get("peak_bytes")),
                   "measured": [], "notes": []}
            row.update({f"teacher_{metric}": t_q, f"student_alone_{metric}": a_q, metric: q})
            if t is None:
                row["notes"].append("no teacher run")
            if alone is None:
                row["notes"].append("no student-alone run: gap and recovery need one")
            t_dep = {(d["host"], d["backend"], d["precision"]): d for d in (t or {}).get("deployments", [])}
            for d in s["deployments"]:
                td = t_dep.get((d["host"], d["backend"], d["precision"]))
                if td:
                    row["measured"].append({"host": d["host"], "backend": d["backend"], "precision": d["precision"],
                                            "activation_ratio": _ratio(td["activation_bytes"], d["activation_bytes"]),
                                            "latency_p50_ratio": _ratio(td["latency_p50_ms"], d["latency_p50_ms"])})
            if not row["measured"]:
                row["notes"].append("teacher and student not measured on the same device/backend")
            rows.append(row)
    return rows


# --- tables -------------------------------------------------------------------------------------


def _fmt(v, spec=".2f", suffix="") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


def _mem(v) -> str:
    from redistill.memory import fmt_bytes

    return "" if v is None else fmt_bytes(v)


def _acc_cell(s: Dict[str, Any], spec: str = ".2f") -> str:
    if not s["n"]:
        return ""
    if s["n"] == 1:
        return f"{s['mean']:{spec}}"
    return f"{s['mean']:{spec}} ± {_fmt(s['std'], spec)} [{s['min']:{spec}}-{s['max']:{spec}}]"


LOSS = ".4f"  # denoising losses and MSEs


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


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(res: Dict[str, Any]) -> str:
    """compare.md: models (accuracy or denoising loss, theory), deployments (measured vs theory, latency), pairs,
    per-run rows, notes. Classifiers and denoisers get separate tables wherever the quality figure appears."""
    cls = [m for m in res["models"] if m["task"] != DENOISE]
    den = [m for m in res["models"] if m["task"] == DENOISE]
    intro = ("Sizes in KiB/MiB (binary), accuracy in % test top-1 (mean ± sample std [min-max] over seeds)"
             + ("; denoisers: test denoising loss, the mean squared error of the predicted noise (lower is better)"
                if den else "") + ". ")
    out = ["# Theory against measurement", "",
           "Generated by `redistill compare` from " + (", ".join(f"`{s}`" for s in res["sources"]) or "the given paths")
           + ". " + intro + "See docs/compare.md for where each figure comes from.", "", "## Models", ""]
    if cls or not den:
        rows = []
        for m in cls:
            th = m["theory"] or {}
            rows.append([m["label"], _fmt(m["top1"]["n"], "d") if m["top1"]["n"] else "", _acc_cell(m["top1"]),
                         _fmt(m["onnx_fp32_top1"]), _fmt(m["onnx_int8_top1"]), _mem(th.get("peak_bytes")),
                         _mem(th.get("inplace_peak_bytes")), _mem(th.get("layerwise_peak_bytes")),
                         m["theory_source"] or "", "; ".join(m["notes"])])
        out.append(_md_table(["model", "n", "top-1 (%)", "ONNX FP32 top-1", "INT8 top-1", "liveness peak",
                              "in-place peak", "layer-wise peak (paper)", "theory from", "notes"], rows))
    if den:
        if cls:
            out += ["", "Denoisers (one denoising step: inputs x and t):", ""]
        rows = []
        for m in den:
            th = m["theory"] or {}
            n = m["diffusion_loss"]["n"]
            rows.append([m["label"], _fmt(n, "d") if n else "", _acc_cell(m["diffusion_loss"], LOSS),
                         _fmt(m["onnx_fp32_mse"], LOSS), _fmt(m["onnx_int8_mse"], LOSS), _mem(th.get("peak_bytes")),
                         _mem(th.get("inplace_peak_bytes")), _mem(th.get("layerwise_peak_bytes")),
                         m["theory_source"] or "", _gen_cell(m["generation"]), "; ".join(m["notes"])])
        out.append(_md_table(["model", "n", "test denoising loss (lower is better)", "ONNX FP32 MSE", "INT8 MSE",
                              "liveness peak", "in-place peak", "layer-wise peak (paper)", "theory from",
                              "CFD / precision / recall", "notes"], rows))
    out += ["", "## Measured on devices", ""]
    rows = []
    for m in res["models"]:
        if not m["deployments"]:
            rows.append([m["label"]] + [""] * 11 + ["not deployed (no device report)"])
        for d in m["deployments"]:
            rows.append([m["label"], d["host"], d["device"] or "", d["backend"] or "", d["precision"] or "", d["bundle"],
                         _mem(d["theoretical_peak_bytes"]), _mem(d["activation_bytes"]),
                         _fmt(d["ratio_measured_theoretical"], ".2f", "x"), _mem(d["process_peak_bytes"]),
                         _fmt(d["latency_p50_ms"], ".3f"), _fmt(d["latency_p99_ms"], ".3f"),
                         "" if d["output_check_passed"] is not False else "output check FAILED"])
    out.append(_md_table(["model", "host", "device", "backend", "precision", "bundle", "theoretical peak",
                          "measured activation", "measured / theoretical", "process peak (VmHWM)",
                          "p50 (ms)", "p99 (ms)", "notes"], rows))
    out += ["", "## Pairs: accuracy gap recovered and teacher/student ratios", ""]
    cpairs = [p for p in res["pairs"] if p["task"] != DENOISE]
    dpairs = [p for p in res["pairs"] if p["task"] == DENOISE]

    def pair_table(pairs, metric, spec, header):
        rows = []
        for p in pairs:
            meas = "; ".join(f"{x['host']}/{x['backend']}/{x['precision']}: memory {_fmt(x['activation_ratio'], '.2f', 'x')}, "
                             f"p50 {_fmt(x['latency_p50_ratio'], '.2f', 'x')}" for x in p["measured"])
            rows.append([f"{p['teacher']} -> {p['student']} ({p['image_size']} px)", METHOD_LABEL.get(p["method"], p["method"]),
                         _fmt(p[metric], spec), _fmt(p[f"teacher_{metric}"], spec),
                         _fmt(p[f"student_alone_{metric}"], spec), _fmt(p["gap"], spec),
                         _fmt(None if p["recovered"] is None else 100 * p["recovered"], ".1f", " %"),
                         _fmt(p["theory_ratio"], ".2f", "x"), meas, "; ".join(p["notes"])])
        return _md_table(header + ["gap recovered", "theoretical peak teacher/student",
                                   "measured teacher/student (activation, p50)", "notes"], rows)

    if cpairs:
        out.append(pair_table(cpairs, "top1", ".2f", ["pair", "method", "top-1", "teacher top-1", "student-alone top-1",
                                                      "gap (points)"]))
    if dpairs:
        if cpairs:
            out += [""]
        out += ["Denoisers: gap = student-alone loss - teacher loss; recovered = (student-alone loss - method loss) / gap.",
                ""]
        out.append(pair_table(dpairs, "diffusion_loss", LOSS, ["pair", "method", "denoising loss", "teacher loss",
                                                                 "student-alone loss", "gap (loss)"]))
    if not res["pairs"]:
        out.append("No teacher/student pair among the runs found.")
    out += ["", "## Runs", ""]
    centries = [e for e in res["entries"] if e["task"] != DENOISE]
    dentries = [e for e in res["entries"] if e["task"] == DENOISE]

    def run_cells(e):
        return [e["run"], str(e["seed"] if e["seed"] is not None else ""), e["role"],
                METHOD_LABEL.get(e["method"], e["method"]), e["arch"], str(e["image_size"] or "")]

    head = ["run", "seed", "role", "method", "arch", "px"]
    if centries:
        out.append(_md_table(head + ["top-1 (best)", "top-1 (last)", "epoch", "folder"],
                             [run_cells(e) + [_fmt(e["top1"]), _fmt(e["last_top1"]), str(e["epoch"]), e["run_dir"]]
                              for e in centries]))
    if dentries:
        if centries:
            out += ["", "Denoiser runs:", ""]
        out.append(_md_table(head + ["denoising loss (best)", "denoising loss (last)", "epoch", "CFD / precision / recall",
                                     "folder"],
                             [run_cells(e) + [_fmt(e["diffusion_loss"], LOSS), _fmt(e["last_diffusion_loss"], LOSS),
                                              str(e["epoch"]), _gen_cell(e["generation"]), e["run_dir"]]
                              for e in dentries]))
    if not res["entries"]:
        out.append("No distillation runs found.")
    if res["notes"]:
        out += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["kind", "task", "model", "arch", "method", "image_size", "run", "seed", "n", "top1", "top1_std", "top1_min",
               "top1_max", "onnx_fp32_top1", "int8_top1", "diffusion_loss", "diffusion_loss_std", "diffusion_loss_min",
               "diffusion_loss_max", "onnx_fp32_mse", "int8_mse", "cfd", "gen_precision", "gen_recall",
               "theoretical_peak_bytes", "theoretical_inplace_peak_bytes",
               "theoretical_layerwise_peak_bytes", "theory_source", "host", "device", "backend", "precision", "bundle",
               "bundle_theoretical_peak_bytes", "activation_bytes", "process_peak_bytes", "ratio_measured_theoretical",
               "ratio_measured_inplace", "latency_p50_ms", "latency_p99_ms", "output_check_passed",
               "teacher_top1", "student_alone_top1", "teacher_diffusion_loss", "student_alone_diffusion_loss", "gap", "recovered", "theory_ratio", "activation_ratio",
               "latency_p50_ratio", "notes"]


def csv_rows(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    """kind=model: one row per model and deployment (deployment cells empty when not deployed);
    kind=run: one row per run and role (each seed); kind=pair: one per pair, method and common deployment.
    Classifiers fill the top-1 columns, denoisers the diffusion_loss / mse / generation ones (``task`` says which);
    a pair's ``gap`` is in points of top-1 for classifiers and in denoising loss for denoisers."""

    def gen(gens):  # the last quality result joined (CFD, precision, recall)
        g = gens[-1] if gens else {}
        return {"cfd": g.get("cfd"), "gen_precision": g.get("precision"), "gen_recall": g.get("recall")}

    rows = []
    for m in res["models"]:
        th = m["theory"] or {}
        dl = m["diffusion_loss"]
        n = dl["n"] if m["task"] == DENOISE else m["top1"]["n"]
        base = {"kind": "model", "task": m["task"], "model": m["label"], "arch": m["arch"], "method": m["method"],
                "image_size": m["image_size"], "n": n, "top1": m["top1"]["mean"],
                "diffusion_loss": dl["mean"], "diffusion_loss_std": dl["std"], "diffusion_loss_min": dl["min"],
                "diffusion_loss_max": dl["max"], "onnx_fp32_mse": m["onnx_fp32_mse"], "int8_mse": m["onnx_int8_mse"],
                **gen(m["generation"]),
                "top1_std": m["top1"]["std"], "top1_min": m["top1"]["min"], "top1_max": m["top1"]["max"],
                "seed": " ".join(str(s) for s in m["seeds"]), "onnx_fp32_top1": m["onnx_fp32_top1"],
                "int8_top1": m["onnx_int8_top1"], "theoretical_peak_bytes": th.get("peak_bytes"),
                "theoretical_inplace_peak_bytes": th.get("inplace_peak_bytes"),
                "theoretical_layerwise_peak_bytes": th.get("layerwise_peak_bytes"), "theory_source": m["theory_source"],
                "notes": "; ".join(m["notes"])}
        for d in m["deployments"] or [None]:
            row = dict(base)
            if d:
                row.update({k: d[k] for k in ("host", "device", "backend", "precision", "bundle", "activation_bytes",
                                              "process_peak_bytes", "ratio_measured_theoretical", "ratio_measured_inplace",
                                              "latency_p50_ms", "latency_p99_ms", "output_check_passed")})
                row["bundle_theoretical_peak_bytes"] = d["theoretical_peak_bytes"]
            rows.append(row)
    for e in res["entries"]:
        kind = ", denoiser" if e["task"] == DENOISE else ""
        rows.append({"kind": "run", "task": e["task"],
                     "model": f"{METHOD_LABEL.get(e['method'], e['method'])} ({e['arch']}, {e['image_size']} px{kind})",
                     "arch": e["arch"], "method": e["method"], "image_size": e["image_size"], "run": e["run"],
                     "seed": e["seed"], "n": 1, "top1": e["top1"], "diffusion_loss": e["diffusion_loss"],
                     **gen(e["generation"]), "notes": e["run_dir"]})
    for p in res["pairs"]:
        base = {"kind": "pair", "task": p["task"], "model": f"{p['teacher']} -> {p['student']}", "arch": p["student"],
                "method": p["method"], "image_size": p["image_size"], "top1": p["top1"], "teacher_top1": p["teacher_top1"],
                "student_alone_top1": p["student_alone_top1"], "diffusion_loss": p["diffusion_loss"],
                "teacher_diffusion_loss": p["teacher_diffusion_loss"],
                "student_alone_diffusion_loss": p["student_alone_diffusion_loss"], "gap": p["gap"], "recovered": p["recovered"],
                "theory_ratio": p["theory_ratio"], "notes": "; ".join(p["notes"])}
        for x in p["measured"] or [None]:
            row = dict(base)
            if x:
                row.update(x)
            rows.append(row)
    return rows


def write_csv(res: Dict[str, Any], path) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in csv_rows(res):
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def to_json(res: Dict[str, Any]) -> Dict[str, Any]:
    """Everything in compare.md, in bytes and raw numbers (no manifests or report bodies)."""
    models = []
    for m in res["models"]:
        d = {k: m[k] for k in ("label", "task", "arch", "method", "image_size", "role", "top1", "diffusion_loss",
                               "seeds", "onnx_fp32_top1", "onnx_int8_top1", "onnx_fp32_mse", "onnx_int8_mse",
                               "generation", "theory", "theory_source", "deployments", "notes")}
        d["pairs"] = [list(p) for p in sorted(m["pairs"], key=str)]
        d["runs"] = [{k: v for k, v in e.items() if k != "pair"} for e in m["runs"]]
        d["bundles"] = [{"dir": b["dir"], "id": b["id"], "name": b["manifest"].get("name"),
                         "precision": b["manifest"].get("precision"), "task": b["manifest"].get("task") or CLASSIFY,
                         "accuracy": b["manifest"].get("accuracy"), "denoising": b["manifest"].get("denoising"),
                         "memory": b["manifest"].get("memory"), "from_run": b.get("from_run")} for b in m["bundles"]]
        models.append(d)
    return {"sources": res["sources"], "notes": res["notes"], "models": models, "pairs": res["pairs"]}


# --- plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


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
    return _save(fig, path)


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
                    ax.annotate(f"{r:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
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
    return _save(fig, path)


def plot_accuracy(res: Dict[str, Any], path) -> Path:
    """The paper's Figure 1: test top-1 (mean, error bar = sample std over seeds) against theoretical peak.
    Classifiers only: denoisers are named under the axis and drawn by ``plot_denoising``."""
    return _plot_quality(res, path, "top1")


def plot_denoising(res: Dict[str, Any], path) -> Path:
    """The denoisers' Figure 1: test denoising loss (lower is better) against theoretical peak (one denoising step)."""
    return _plot_quality(res, path, "diffusion_loss")


def _plot_quality(res: Dict[str, Any], path, metric: str) -> Path:
    plt = _pyplot()
    task = DENOISE if metric == "diffusion_loss" else CLASSIFY
    mine = [m for m in res["models"] if (m["task"] == DENOISE) == (task == DENOISE)]
    pts = [m for m in mine if m[metric]["n"] and (m["theory"] or {}).get("peak_bytes")]
    others = [m for m in res["models"] if m["task"] == DENOISE] if task != DENOISE else []
    if task == DENOISE:
        title = "Denoising loss vs theoretical peak activation memory (one denoising step, FP32, batch 1)"
        what, ylabel = "a test denoising loss", "test denoising loss (lower is better), mean ± std over seeds"
    else:
        title = "Accuracy vs theoretical peak activation memory (FP32, batch 1)"
        what, ylabel = "a test accuracy", "test top-1 (%), mean ± std over seeds"
    skipped = (f"\ndenoisers not shown (their quality is a denoising loss, not top-1): see {DENOISER_PLOT}"
               if others and task != DENOISE else "")
    if not pts:
        return _empty_plot(path, title, f"no model with both {what} and a theoretical peak" + skipped)
    markers = {"teacher": "s", "student": "o", "kd": "^", "red": "*", "red_kd": "D"}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(METHOD_ORDER + tuple(sorted({m["method"] for m in pts} - set(METHOD_ORDER)))):
        sel = [m for m in pts if m["method"] == method]
        if not sel:
            continue
        xs = [m["theory"]["peak_bytes"] / 1024 for m in sel]
        ys = [m[metric]["mean"] for m in sel]
        err = [m[metric]["std"] or 0 for m in sel]
        ax.errorbar(xs, ys, yerr=err, fmt=markers.get(method, "o"), ms=11 if method == "red" else 8, capsize=4,
                    color=colors[i % len(colors)], label=METHOD_LABEL.get(method, method), mec="black")
        for m, x, y in zip(sel, xs, ys):
            ax.annotate(f"{m['arch']}\nn={m[metric]['n']}", (x, y), textcoords="offset points", xytext=(8, -4), fontsize=7)
    xs = [m["theory"]["peak_bytes"] for m in pts]
    if max(xs) / min(xs) > 8:
        _log_axis(ax, "x")
    ax.margins(x=0.25, y=0.1)
    left = [m["label"] for m in mine if m[metric]["n"] and not any(m is x for x in pts)]
    ax.set_xlabel("theoretical peak activation memory, liveness (KiB)"
                  + ("\nnot shown (no theoretical peak): " + "; ".join(left) if left else "") + skipped, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def footprint_reports(res: Dict[str, Any]):
    """[(label, MemoryReport)] for the first pair with a teacher and a RED student: FP32 bundles' graphs first,
    else analyses of the checkpoints. Returns ([], note) when there is no such pair."""
    from redistill.memory import analyze_onnx

    by_key = {_mkey(m): m for m in res["models"]}
    candidates = []
    for (t_arch, s_arch, size, task) in sorted({p for m in res["models"] for p in m["pairs"] if p[0] and p[1]},
                                               key=_pair_order):
        t = by_key.get(_key(t_arch, "teacher", size, task))
        s = next((by_key[k] for k in (_key(s_arch, x, size, task) for x in RED_METHODS) if k in by_key), None)
        candidates.append((t, s))
    if not candidates:  # no runs: bundles alone can still make the pair (never across tasks)
        for task in sorted({m["task"] for m in res["models"]}, key=lambda x: (x != CLASSIFY, x)):
            t = next((m for m in res["models"] if m["method"] == "teacher" and m["task"] == task), None)
            s = next((m for m in res["models"] if m["method"] in RED_METHODS and m["task"] == task), None)
            candidates.append((t, s))
    for t, s in candidates:
        if not (t and s):
            continue
        out = []
        for m in (t, s):
            label = "teacher" if m is t else f"student+RED ({METHOD_LABEL[m['method']]})"
            rep = res["analyses"].get(_mkey(m))
            if rep is None and m["fp32_bundle"]:
                b = m["fp32_bundle"]
                onnx = Path(b["dir"]) / (b["manifest"].get("onnx") or {}).get("file", "model.onnx")
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
    return [], "no teacher and RED student (method red or red_kd) with a bundle or checkpoint to analyse"


def plot_footprint(res: Dict[str, Any], path) -> Path:
    """Per-node live memory of teacher vs student+RED, via redistill.memory.plot (the `redistill memory --plot` figure)."""
    from redistill.memory.plot import plot_reports

    title = "Per-layer footprint: teacher vs student+RED"  # the first pair: classifiers before denoisers
    pairs, note = footprint_reports(res)
    res["footprint"] = [{"label": lab, "model": r.model, "peak_bytes": r.peak_bytes} for lab, r in pairs] or note
    if not pairs:
        return _empty_plot(path, title, note)
    reports = [r for _, r in pairs]
    return plot_reports(reports, path, title=f"{title} (batch 1, {reports[0].dtype})", labels=[lab for lab, _ in pairs])


# --- all of it ----------------------------------------------------------------------------------


def compare(paths: Sequence[str] = (), runs: Optional[str] = None, bundles: Optional[str] = None,
            reports: Optional[str] = None, out: str = "bench/results/compare", analyze: bool = True,
            quality: Sequence[str] = ()) -> Dict[str, Path]:
    """collect -> build -> write the tables and plots under ``out``; returns {file name: path}.
    With denoisers among the models, ``denoising_loss_vs_peak_memory.png`` is written too."""
    res = build(collect(paths, runs, bundles, reports, quality), analyze=analyze)
    o = Path(out)
    files = {
        "memory_theory_vs_measured.png": plot_memory(res, o / "memory_theory_vs_measured.png"),
        "accuracy_vs_peak_memory.png": plot_accuracy(res, o / "accuracy_vs_peak_memory.png"),
        "footprint_teacher_vs_student_red.png": plot_footprint(res, o / "footprint_teacher_vs_student_red.png"),
    }
    if any(m["task"] == DENOISE for m in res["models"]):
        files[DENOISER_PLOT] = plot_denoising(res, o / DENOISER_PLOT)
    md = render_markdown(res)
    fp = res.get("footprint")
    md += "\n## Plots\n\n- `memory_theory_vs_measured.png`, `accuracy_vs_peak_memory.png`" + (
        f" (classifiers), `{DENOISER_PLOT}` (denoisers)" if DENOISER_PLOT in files else "") + \
        "\n- `footprint_teacher_vs_student_red.png`: " + (
        ", ".join(f"{x['label']} (peak {_mem(x['peak_bytes'])})" for x in fp) if isinstance(fp, list) else str(fp)) + "\n"
    files["compare.md"] = atomic_write_text(o / "compare.md", md)
    files["compare.csv"] = write_csv(res, o / "compare.csv")
    doc = to_json(res)
    doc["footprint"] = fp
    files["compare.json"] = atomic_write_json(o / "compare.json", doc)
    return files

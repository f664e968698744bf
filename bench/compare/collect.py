"""Find and read what the stages left on disk: run folders, bundles, device reports and quality results.

Each is read into its typed record (``bench.compare.records``) with where it came from; nothing is joined here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from deploy.agent.contract import REPORT_SCHEMA
from export.bundle import bundle_id, read_manifest
from redistill.errors import UserError
from bench.compare.records import BundleManifest, DeviceReport, QualityResult, RunSummary

_WRITER = {"runs": "distill", "bundles": "export", "reports": "deploy"}


@dataclass
class Run:
    """A finished run folder: its summary and the facts of its config.yaml that the summary lacks."""

    dir: str
    summary: RunSummary
    config: Dict[str, Any] = field(default_factory=dict)

    def config_value(self, *keys: str) -> Any:
        """``config.yaml``'s value at ``keys`` (``data``, ``image_size``), None when any level is missing."""
        d: Any = self.config
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d


@dataclass
class Bundle:
    dir: str
    id: str  # sha256 of manifest.json, which device reports carry
    manifest: BundleManifest
    from_run: Optional[str] = None  # "RUN (seed N)" whose best.pt was exported, set when joined


@dataclass
class Report:
    path: str
    report: DeviceReport


@dataclass
class Quality:
    path: str
    result: QualityResult


@dataclass
class Collected:
    """Every run, bundle, device report and quality result found (plus the folders scanned and notes)."""

    runs: List[Run] = field(default_factory=list)
    bundles: List[Bundle] = field(default_factory=list)
    reports: List[Report] = field(default_factory=list)
    quality: List[Quality] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _load_json(path: Path) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(the JSON object in ``path``, None), or (None, why it could not be read); a valid non-object is (None, None)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return None, f"unreadable ({getattr(e, 'strerror', None) or type(e).__name__})"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at line {e.lineno}; truncated or partly written?)"
    return (data if isinstance(data, dict) else None), None


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    return _load_json(path)[0]


#: what every report the agent writes holds, and what compare needs to place a report in a row
REPORT_NEEDS = (("bundle", "id"), ("bundle", "model", "arch"), ("bundle", "model", "image_size"), ("backend", "name"),
                ("latency", "p50_ms"), ("memory",))


def report_gaps(d: Dict[str, Any]) -> List[str]:
    """The ``REPORT_NEEDS`` fields a device report lacks, dotted (``bundle.model.arch``); [] for a complete one."""
    gaps = []
    for keys in REPORT_NEEDS:
        v: Any = d
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if v is None:
            gaps.append(".".join(keys))
    return gaps


def _skip(c: Collected, path: Path, why: str) -> None:
    """A file that was not used: one line on stderr now and a note on the compare page, never silence."""
    note = f"skipped {path}: {why}"
    print(f"compare: {note}", file=sys.stderr, flush=True)
    c.notes.append(note)


def read_quality(path: Path) -> Quality:
    d = _read_json(path)
    if not QualityResult.matches(d):
        raise UserError(f"{path} is not a quality report: give a file written by `redistill quality --json`")
    return Quality(str(path), QualityResult.from_dict(d))


def read_run(run_dir: Path) -> Run:
    """A run folder's summary.json and its config.yaml (seed, image size, pair)."""
    summary = _read_json(run_dir / "summary.json")
    if not RunSummary.matches(summary):
        raise UserError(f"{run_dir} is not a finished run (no run-level summary.json): give runs/NAME of a "
                        f"`redistill distill` run that completed")
    config: Dict[str, Any] = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return Run(str(run_dir), RunSummary.from_dict(summary), config)


def read_bundle(bundle_dir: Path) -> Bundle:
    return Bundle(str(bundle_dir), bundle_id(bundle_dir), BundleManifest.from_dict(read_manifest(bundle_dir)))


def read_report(path: Path) -> Report:
    d, why = _load_json(path)
    if why:
        raise UserError(f"{path} is {why}: give a device report file written by `redistill deploy`")
    if not DeviceReport.matches(d):
        raise UserError(f"{path} is not a device report ({REPORT_SCHEMA}): give a file written by `redistill deploy`")
    gaps = report_gaps(d)
    if gaps:
        raise UserError(f"{path} is an incomplete device report (no {', '.join(gaps)}): deploy again to measure it")
    return Report(str(path), DeviceReport.from_dict(d))


def _hidden(path: Path, root: Path) -> bool:
    """Temp folders of atomic writes (``.name.xxx.tmp``) and other dot folders are skipped."""
    return any(p.startswith(".") for p in path.relative_to(root).parts)


def _scan(root: Path, c: Collected) -> int:
    """Add every run, bundle and report under ``root``; returns how many were found."""
    found = 0
    for p in sorted(root.rglob("*.json")):
        if _hidden(p, root):
            continue
        d, why = _load_json(p)
        if why:
            _skip(c, p, why)
        elif p.name == "summary.json":
            if RunSummary.matches(d):
                c.runs.append(read_run(p.parent))
                found += 1
        elif p.name == "manifest.json":
            if BundleManifest.matches(d):
                c.bundles.append(read_bundle(p.parent))
                found += 1
        elif DeviceReport.matches(d):
            gaps = report_gaps(d)
            if gaps:
                _skip(c, p, f"incomplete device report (no {', '.join(gaps)})")
                continue
            c.reports.append(Report(str(p), DeviceReport.from_dict(d)))
            found += 1
        elif QualityResult.matches(d):  # joins a run only; not counted as something found
            c.quality.append(Quality(str(p), QualityResult.from_dict(d)))
    return found


def collect(paths: Sequence[str] = (), runs: Optional[str] = None, bundles: Optional[str] = None,
            reports: Optional[str] = None, quality: Sequence[str] = ()) -> Collected:
    """Read runs, bundles and reports from ``paths`` and the given folders; with neither, the default folders.

    A folder named explicitly must exist; a default one that is missing only adds a note. ``quality``:
    `redistill quality --json` files (also accepted among ``paths``, and found when scanning folders),
    joined to the run whose checkpoint was sampled.
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
            if QualityResult.matches(d):
                c.quality.append(Quality(str(p), QualityResult.from_dict(d)))
            else:
                c.reports.append(read_report(p))
        elif (p / "manifest.json").is_file():
            c.bundles.append(read_bundle(p))
        elif (p / "summary.json").is_file() and RunSummary.matches(_read_json(p / "summary.json")):
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
            k = str(Path(getattr(item, key)).resolve())
            if k not in seen:
                seen.add(k)
                kept.append(item)
        setattr(c, attr, kept)

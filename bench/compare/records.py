"""Typed views of the files the stages hand to each other: run summary, bundle manifest, device report, quality result.

Each ``from_dict`` reads a file's JSON as written (the on-disk format is unchanged) and tolerates missing
optional keys, so readers write ``report.memory.activation_bytes`` instead of chains of ``.get``.
``raw`` keeps the whole mapping for readers that pass a section on unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from deploy.agent.contract import BUNDLE_SCHEMA, REPORT_SCHEMA, RSS_DELTA_RESOLUTION_BYTES
from train.tasks import DEFAULT_TASK



def _mapping(d: Any) -> Mapping[str, Any]:
    return d if isinstance(d, Mapping) else {}


def _read(cls, d: Any, **nested: Callable[[Any], Any]):
    """``cls`` from the keys of ``d`` named like its fields (others ignored, missing ones default);
    ``nested`` converts the named keys (a sub-record's ``from_dict``); ``raw`` gets ``d`` itself."""
    d = _mapping(d)
    names = {f.name for f in fields(cls)}
    kw: Dict[str, Any] = {k: d[k] for k in names if k in d and k not in nested and k != "raw"}
    kw.update({k: conv(d.get(k)) for k, conv in nested.items()})
    if "raw" in names:
        kw["raw"] = dict(d)
    return cls(**kw)


def _optional(read: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A nested reader that gives None for an absent or empty section."""
    return lambda d: read(d) if d else None


# --- run summary (runs/NAME/summary.json, train/trainer.py) -------------------------------------


@dataclass(frozen=True)
class StageFigures:
    """A stage's test figures of one checkpoint (``best`` or ``last``); the task decides which keys it has."""

    checkpoint: Optional[str] = None
    epoch: Optional[int] = None
    test_images: Optional[int] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def get(self, key: str) -> Any:
        """One figure by its summary key (``test_top1``, ``test_diffusion_loss``...), None when absent."""
        return self.raw.get(key)

    @classmethod
    def from_dict(cls, d: Any) -> "StageFigures":
        return _read(cls, d)


@dataclass(frozen=True)
class StageSummary:
    """One trained role of a run (``teacher`` or ``student``), or a reused teacher (``reused``, no figures)."""

    role: Optional[str] = None
    task: Optional[str] = None
    arch: Optional[str] = None
    method: Optional[str] = None
    best: Optional[StageFigures] = None
    last: Optional[StageFigures] = None
    picked_by: Optional[str] = None
    images_per_s: Optional[float] = None
    checkpoint: Optional[str] = None  # a reused teacher's checkpoint
    reused: bool = False

    @classmethod
    def from_dict(cls, d: Any) -> "StageSummary":
        figures = _optional(StageFigures.from_dict)
        return _read(cls, d, best=figures, last=figures)


@dataclass(frozen=True)
class RunMemory:
    """Liveness peaks of teacher and student the run measured at the end (FP32, batch 1)."""

    teacher_peak_bytes: Optional[int] = None
    student_peak_bytes: Optional[int] = None
    reduction: Optional[float] = None
    image_size: Optional[int] = None
    definition: Optional[str] = None

    def peak_of(self, role: str) -> Optional[int]:
        return getattr(self, f"{role}_peak_bytes", None)

    @classmethod
    def from_dict(cls, d: Any) -> "RunMemory":
        return _read(cls, d)


@dataclass(frozen=True)
class RunSummary:
    """A finished run's summary.json: its name, method and the summaries of the roles it trained."""

    name: Optional[str] = None
    method: Optional[str] = None
    run_dir: Optional[str] = None
    teacher: Optional[StageSummary] = None
    student: Optional[StageSummary] = None
    memory: RunMemory = field(default_factory=RunMemory)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def stage(self, role: str) -> Optional[StageSummary]:
        return {"teacher": self.teacher, "student": self.student}.get(role)

    @staticmethod
    def matches(d: Any) -> bool:
        """A run-level summary (a stage's summary.json has ``role`` instead)."""
        return isinstance(d, Mapping) and "method" in d and "run_dir" in d and "role" not in d

    @classmethod
    def from_dict(cls, d: Any) -> "RunSummary":
        stage = _optional(StageSummary.from_dict)
        return _read(cls, d, teacher=stage, student=stage, memory=RunMemory.from_dict)


# --- bundle manifest (bundles/NAME/manifest.json, export/pipeline.py) ----------------------------


@dataclass(frozen=True)
class CheckpointRef:
    """The checkpoint a bundle was exported from."""

    file: Optional[str] = None
    sha256: Optional[str] = None
    epoch: Optional[int] = None
    weights: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Any) -> "CheckpointRef":
        return _read(cls, d)


@dataclass(frozen=True)
class BundleModel:
    """What network a bundle holds (the manifest's ``model``; device reports carry a copy)."""

    arch: Optional[str] = None
    method: Optional[str] = None
    role: Optional[str] = None
    image_size: Optional[int] = None
    num_classes: Optional[int] = None
    width_mult: Optional[float] = None
    red_blocks: Optional[int] = None
    checkpoint: CheckpointRef = field(default_factory=CheckpointRef)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: Any) -> "BundleModel":
        return _read(cls, d, checkpoint=CheckpointRef.from_dict)


@dataclass(frozen=True)
class Peaks:
    """Theoretical peak activation memory of one graph in bytes: liveness, with in-place reuse, the paper's layer-wise."""

    peak_bytes: Optional[int] = None
    inplace_peak_bytes: Optional[int] = None
    layerwise_peak_bytes: Optional[int] = None

    def to_dict(self) -> Dict[str, Optional[int]]:
        return {"peak_bytes": self.peak_bytes, "inplace_peak_bytes": self.inplace_peak_bytes,
                "layerwise_peak_bytes": self.layerwise_peak_bytes}

    @classmethod
    def from_dict(cls, d: Any) -> "Peaks":
        return _read(cls, d)


@dataclass(frozen=True)
class BundleManifest:
    """A bundle's manifest.json. ``memory`` is the export's analysis as written; ``peaks`` its three peaks."""

    schema: Optional[str] = None
    schema_version: Optional[int] = None
    name: Optional[str] = None
    created: Optional[str] = None
    task: str = DEFAULT_TASK
    model: BundleModel = field(default_factory=BundleModel)
    precision: Optional[str] = None
    target: Optional[str] = None
    onnx_file: str = "model.onnx"
    memory: Optional[Dict[str, Any]] = None
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def peaks(self) -> Peaks:
        return Peaks.from_dict(self.memory)

    def section(self, name: str) -> Dict[str, Any]:
        """A section by name (``accuracy``, ``denoising``...: the task's figures at export), {} when absent."""
        return dict(_mapping(self.raw.get(name)))

    @staticmethod
    def matches(d: Any) -> bool:
        return isinstance(d, Mapping) and d.get("schema") == BUNDLE_SCHEMA

    @classmethod
    def from_dict(cls, d: Any) -> "BundleManifest":
        d = _mapping(d)
        return _read(cls, d, task=lambda t: t or DEFAULT_TASK, model=BundleModel.from_dict,
                     onnx_file=lambda _: _mapping(d.get("onnx")).get("file") or "model.onnx",
                     memory=lambda m: dict(m) if isinstance(m, Mapping) else None)


# --- device report (reports/HOST/BUNDLE/STAMP.json, deploy/agent + deploy/deployer.py) -----------


@dataclass(frozen=True)
class ReportBundle:
    """The bundle a report measured. ``task`` is None in reports that predate it (ask the manifest)."""

    id: Optional[str] = None
    name: Optional[str] = None
    precision: Optional[str] = None
    target: Optional[str] = None
    task: Optional[str] = None
    model: Optional[Dict[str, Any]] = None  # the manifest's ``model`` section, copied as written

    @classmethod
    def from_dict(cls, d: Any) -> "ReportBundle":
        return _read(cls, d)


@dataclass(frozen=True)
class DeviceFacts:
    model: Optional[str] = None  # /proc/device-tree/model (a Jetson's name), None elsewhere
    machine: Optional[str] = None
    hostname: Optional[str] = None
    is_jetson: Optional[bool] = None

    @classmethod
    def from_dict(cls, d: Any) -> "DeviceFacts":
        return _read(cls, d)


@dataclass(frozen=True)
class Backend:
    name: Optional[str] = None
    precision: Optional[str] = None  # the engine's precision (a TensorRT FP16 engine of an FP32 bundle)

    @classmethod
    def from_dict(cls, d: Any) -> "Backend":
        return _read(cls, d)


@dataclass(frozen=True)
class Latency:
    mean_ms: Optional[float] = None
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    p99_ms: Optional[float] = None

    @classmethod
    def from_dict(cls, d: Any) -> "Latency":
        return _read(cls, d)


#: the batch-1 figure of a report whose agent predates ``method`` and ``resolution_bytes``: what it was, by backend
_LEGACY_ACTIVATION = {
    "tensorrt": ("tensorrt_device_memory", "TensorRT device memory", 1),
    "onnxruntime": ("onnxruntime_rss_delta", "ORT batch-1 RSS delta", RSS_DELTA_RESOLUTION_BYTES),
}


@dataclass(frozen=True)
class MeasuredFigure:
    """One measured memory figure of a report (the batch-1 figure, a per-image slope...): its method, bytes (per
    image when ``per_image``), the batch it was measured at, and the smallest figure its method resolves."""

    method: str
    label: str
    bytes: Optional[int] = None
    per_image: bool = False
    batch: Optional[int] = None
    resolution_bytes: Optional[int] = None
    resolution_how: Optional[str] = None
    what: Optional[str] = None
    fit_max_abs_residual_bytes: Optional[float] = None
    fit_r2: Optional[float] = None

    @property
    def below_resolution(self) -> bool:
        """True when the figure is smaller than what its method can tell apart (its ratio to theory means nothing)."""
        return self.bytes is not None and self.resolution_bytes is not None and self.bytes < self.resolution_bytes

    @classmethod
    def from_dict(cls, d: Any) -> "MeasuredFigure":
        d = _mapping(d)
        fit = _mapping(d.get("fit"))
        return _read(cls, d, per_image=lambda v: bool(v), label=lambda v: v or d.get("method"),
                     fit_max_abs_residual_bytes=lambda _: fit.get("max_abs_residual_bytes"),
                     fit_r2=lambda _: fit.get("r2"))


def _legacy_activation(d: Mapping[str, Any], backend: Optional[str], batch: Optional[int]) -> Optional[MeasuredFigure]:
    """The batch-1 figure of an older report, with the documented resolution of its method."""
    if backend not in _LEGACY_ACTIVATION or d.get("bytes") is None:
        return None
    method, label, resolution = _LEGACY_ACTIVATION[backend]
    return MeasuredFigure(method, label, d.get("bytes"), batch=batch, resolution_bytes=resolution,
                          resolution_how="not in the report (its agent predates resolution fields): the documented "
                                         "resolution of the method", what=d.get("what"))


@dataclass(frozen=True)
class MeasuredMemory:
    """The memory figures of a report, in bytes; ``theoretical_detail`` is the manifest's analysis the agent copied.
    ``figures``: every measured figure with a method (the batch-1 figure first, then the per-image slopes);
    ``per_image_skipped``: why there is no per-image figure (None when measured, or a report from before them)."""

    activation_bytes: Optional[int] = None
    process_peak_bytes: Optional[int] = None
    theoretical_peak_bytes: Optional[int] = None
    theoretical_detail: Dict[str, Any] = field(default_factory=dict)
    figures: Tuple[MeasuredFigure, ...] = ()
    per_image_skipped: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Any, backend: Optional[str] = None) -> "MeasuredMemory":
        d = _mapping(d)
        theory = _mapping(d.get("theoretical_peak"))
        act = _mapping(d.get("activation"))
        per_image = _mapping(d.get("per_image"))
        figures = [MeasuredFigure.from_dict(v) for v in d.values() if isinstance(v, Mapping) and v.get("method")]
        if not act.get("method"):
            figures[:0] = [f for f in [_legacy_activation(act, backend, d.get("batch"))] if f]
        figures += [MeasuredFigure.from_dict(f) for f in per_image.get("figures") or [] if _mapping(f).get("method")]
        return cls(act.get("bytes"), _mapping(d.get("process_peak")).get("bytes"), theory.get("bytes"),
                   dict(_mapping(theory.get("detail"))), tuple(figures), per_image.get("skipped"))


@dataclass(frozen=True)
class DeployInfo:
    """What ``redistill deploy`` added on the server (absent when the agent ran by hand)."""

    host: Optional[str] = None
    bundle_id: Optional[str] = None  # the manifest sha256 the server verified before copying
    exported_bundle_id: Optional[str] = None  # the id export recorded beside the bundle (None: no record)
    server_time: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Any) -> "DeployInfo":
        return _read(cls, d)


@dataclass(frozen=True)
class DeviceReport:
    """A device report as the agent printed it and ``redistill deploy`` saved it."""

    schema: Optional[str] = None
    schema_version: Optional[int] = None
    created: Optional[str] = None
    bundle: ReportBundle = field(default_factory=ReportBundle)
    device: DeviceFacts = field(default_factory=DeviceFacts)
    backend: Backend = field(default_factory=Backend)
    output_check_passed: Optional[bool] = None
    latency: Latency = field(default_factory=Latency)
    memory: MeasuredMemory = field(default_factory=MeasuredMemory)
    deploy: DeployInfo = field(default_factory=DeployInfo)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @staticmethod
    def matches(d: Any) -> bool:
        return isinstance(d, Mapping) and d.get("schema") == REPORT_SCHEMA

    @classmethod
    def from_dict(cls, d: Any) -> "DeviceReport":
        d = _mapping(d)
        return _read(cls, d, bundle=ReportBundle.from_dict, device=DeviceFacts.from_dict, backend=Backend.from_dict,
                     output_check_passed=lambda _: _mapping(d.get("output_check")).get("passed"),
                     latency=Latency.from_dict, deploy=DeployInfo.from_dict,
                     memory=lambda m: MeasuredMemory.from_dict(m, _mapping(d.get("backend")).get("name")))


# --- quality result (`redistill quality --json`, bench/quality_cli.py) --------------------------


@dataclass(frozen=True)
class SampleSettings:
    """How the scored images were drawn (``redistill sample``'s settings)."""

    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    n: Optional[int] = None

    @classmethod
    def from_dict(cls, d: Any) -> "SampleSettings":
        return _read(cls, d)


@dataclass(frozen=True)
class QualityResult:
    """CFD, precision and recall (FID when computed) of a denoiser's samples."""

    input: Optional[str] = None
    cfd: Optional[float] = None
    cfd_name: Optional[str] = None
    precision: Optional[float] = None
    recall: Optional[float] = None
    fid: Optional[float] = None
    n_generated: Optional[int] = None
    n_real: Optional[int] = None
    k: Optional[int] = None
    classifier_arch: Optional[str] = None
    samples: SampleSettings = field(default_factory=SampleSettings)

    @staticmethod
    def matches(d: Any) -> bool:
        return isinstance(d, Mapping) and all(k in d for k in ("cfd", "cfd_name", "precision", "recall"))

    @classmethod
    def from_dict(cls, d: Any) -> "QualityResult":
        d = _mapping(d)
        return _read(cls, d, samples=SampleSettings.from_dict,
                     classifier_arch=lambda _: _mapping(d.get("classifier")).get("arch"))

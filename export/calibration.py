"""INT8 calibration methods by name: onnxruntime's calibrator and its options, as plain records.

Kept apart from ``export.quantize`` (onnx, numpy) so that ``redistill export --help`` lists them without
importing either. Adding a method is one ``CALIBRATION.register`` record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

from redistill.registry import Registry


@dataclass(frozen=True)
class Calibration:
    """One way to pick activation ranges: an ``onnxruntime.quantization.CalibrationMethod`` member and its options."""

    method: str  # member name of CalibrationMethod
    options: Dict[str, Any] = field(default_factory=dict)  # extra_options of quantize_static


CALIBRATION: Registry[Calibration] = Registry("calibration method")
CALIBRATION.register("minmax")(Calibration("MinMax"))
CALIBRATION.register("entropy")(Calibration("Entropy"))
CALIBRATION.register("percentile")(Calibration("Percentile", {"CalibPercentile": 99.999}))

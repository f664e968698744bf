"""INT8 calibration methods by name: onnxruntime's calibrator and its options, as plain records.

Kept apart from ``export.quantize`` (onnx, numpy) so that ``redistill export --help`` lists them without
importing either. Adding a method is one ``CALIBRATION.register`` record; ``--calib-method auto`` tries
every registered one and keeps the one with the smallest top-1 drop on the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from redistill.registry import Registry

#: ``--calib-method auto`` / ``--calib-images auto``: chosen on the validation split (classifiers)
AUTO = "auto"
#: the calibration sizes ``--calib-images auto`` tries (training images, class-balanced)
AUTO_CALIB_SIZES: Tuple[int, ...] = (128, 512)
#: what ``auto`` means where nothing is chosen on validation (denoisers): today's plain settings
FALLBACK_METHOD, FALLBACK_CALIB_IMAGES = "minmax", 256


@dataclass(frozen=True)
class Calibration:
    """One way to pick activation ranges: an ``onnxruntime.quantization.CalibrationMethod`` member and the
    options of its calibrator (``create_calibrator``'s ``extra_options``)."""

    method: str  # member name of CalibrationMethod
    options: Dict[str, Any] = field(default_factory=dict)
    about: str = ""


CALIBRATION: Registry[Calibration] = Registry("calibration method")
CALIBRATION.register("minmax")(Calibration("MinMax", about="the observed min/max of each tensor"))
# onnxruntime's default of 128 histogram bins for 128 quantized bins leaves its KL search one candidate, the
# min-max range itself (the same scales as minmax). 512 bins let it clip down to a quarter of the range
# (TensorRT uses 2048: 5x the candidates, each costing as much; export.quantize runs the search vectorized).
CALIBRATION.register("entropy")(Calibration("Entropy", {"num_bins": 512, "num_quantized_bins": 128},
                                            "the range of least KL divergence (512-bin histograms)"))
CALIBRATION.register("percentile")(Calibration("Percentile", {"percentile": 99.999},
                                               "the 99.999th percentile of |x|"))
# clipping more of the tail: on the quick student 99.9 kept FP32's top-1 on 93 % of the test images, 99.999 on 88 %
CALIBRATION.register("percentile-99.99")(Calibration("Percentile", {"percentile": 99.99},
                                                     "the 99.99th percentile of |x|"))
CALIBRATION.register("percentile-99.9")(Calibration("Percentile", {"percentile": 99.9}, "the 99.9th percentile of |x|"))


def method_choices() -> List[str]:
    """``--calib-method`` values: ``auto`` and every registered method."""
    return [AUTO, *CALIBRATION.names()]


def auto_methods() -> List[str]:
    """What ``auto`` tries, in order (the first of equally good ones is kept): minmax, then the others."""
    return sorted(CALIBRATION.names(), key=lambda n: (n != FALLBACK_METHOD, n))

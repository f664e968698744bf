"""Every measured memory figure of a deployment against the theory: one row per method with its ratios to the
liveness, in-place and layer-wise peaks, and a flag instead of a ratio when the figure is below its method's
resolution. compare.json keeps these rows (``deployments[].measures``); tables and plots only format them.

A record without ``measures`` (compare.json written before them) renders as it always did.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from redistill.memory import fmt_bytes
from bench.compare.records import MeasuredFigure

#: the methods in column order, with their column titles (a method not listed keeps its report's label)
METHOD_TITLES = {
    "onnxruntime_rss_delta": "ORT RSS delta (batch 1 unless noted)",
    "tensorrt_device_memory": "TensorRT device memory (profile's largest batch)",
    "onnxruntime_slope_opt_off": "ORT per image, optimisations off",
    "onnxruntime_slope_opt_on": "ORT per image, optimisations on",
    "tensorrt_slope": "TensorRT per image",
}
THEORIES = (("liveness", "peak_bytes"), ("inplace", "inplace_peak_bytes"), ("layerwise", "layerwise_peak_bytes"))


def _ratio(value, theory, scale) -> Optional[float]:
    return value / (theory * scale) if value is not None and theory else None


def measure_row(f: MeasuredFigure, theory: Dict[str, Any]) -> Dict[str, Any]:
    """One figure against the batch-1 theory: a per-image figure as it is, a batch-B figure against B x theory."""
    scale = 1 if f.per_image else (f.batch or 1)
    row = {"method": f.method, "label": f.label, "bytes": f.bytes, "per_image": f.per_image, "batch": f.batch,
           "resolution_bytes": f.resolution_bytes, "resolution_how": f.resolution_how,
           "below_resolution": f.below_resolution, "fit_max_abs_residual_bytes": f.fit_max_abs_residual_bytes,
           "fit_r2": f.fit_r2}
    for name, key in THEORIES:
        row[f"ratio_{name}"] = _ratio(f.bytes, theory.get(key), scale)
    return row


def has_measures(res: Dict[str, Any]) -> bool:
    """Whether the record has per-method figures (compare.json from before them has none: the old pages)."""
    return any("measures" in d for m in res["models"] for d in m["deployments"])


def methods_in(deployments: Iterable[Dict[str, Any]]) -> List[str]:
    """The methods measured among these deployments, in column order."""
    found = {x["method"] for d in deployments for x in d.get("measures") or []}
    return [m for m in METHOD_TITLES if m in found] + sorted(found - set(METHOD_TITLES))


def method_title(method: str, deployments: Iterable[Dict[str, Any]]) -> str:
    if method in METHOD_TITLES:
        return METHOD_TITLES[method]
    return next((x["label"] for d in deployments for x in d.get("measures") or [] if x["method"] == method), method)


def flag(x: Dict[str, Any]) -> str:
    return f"below resolution ({fmt_bytes(x['resolution_bytes'])})"


def ratio_text(x: Dict[str, Any], *names: str) -> str:
    """``1.05x / 1.02x (resolution 1.63 KiB)`` (against the named theories), or the flag when the figure is below
    its resolution; empty when there is no theory to divide by."""
    if x["below_resolution"]:
        return flag(x)
    ratios = [x[f"ratio_{n}"] for n in names]
    if all(r is None for r in ratios):
        return ""
    res = f" (resolution {fmt_bytes(x['resolution_bytes'])})" if x["resolution_bytes"] is not None else \
        " (resolution unknown)"
    return " / ".join("n/a" if r is None else f"{r:.2f}x" for r in ratios) + res


def measure_cell(x: Optional[Dict[str, Any]]) -> str:
    """A method's cell in the theory-against-measurement table: the figure, then its ratios to liveness and
    in-place (or the flag)."""
    if x is None or x["bytes"] is None:
        return ""
    value = fmt_bytes(x["bytes"]) + ("/image" if x["per_image"] else f" (batch {x['batch']})" if (x["batch"] or 1) > 1
                                     else "")
    text = ratio_text(x, "liveness", "inplace")
    return f"{value}: {text}" if text else value


def activation_measure(d: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The deployment's batch figure (``activation_bytes``) among its measures: the first that is not per image."""
    return next((x for x in d.get("measures") or [] if not x["per_image"]), None)


def pair_methods(td: Dict[str, Any], sd: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Teacher/student ratio per method both deployments measured, flagged when either figure is below resolution."""
    t_by = {x["method"]: x for x in td.get("measures") or []}
    out = []
    for x in sd.get("measures") or []:
        t = t_by.get(x["method"])
        if t is None or t["bytes"] is None or x["bytes"] is None:
            continue
        below = [who for who, y in (("teacher", t), ("student", x)) if y["below_resolution"]]
        out.append({"method": x["method"], "label": x["label"], "ratio": t["bytes"] / x["bytes"] if x["bytes"] else None,
                    "below_resolution": below, "resolution_bytes": x["resolution_bytes"]})
    return out


def pair_method_text(p: Dict[str, Any]) -> str:
    if p["below_resolution"]:
        return f"{p['label']}: {' and '.join(p['below_resolution'])} below resolution ({fmt_bytes(p['resolution_bytes'])})"
    return f"{p['label']} {p['ratio']:.2f}x" if p["ratio"] is not None else ""

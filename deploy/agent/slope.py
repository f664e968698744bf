"""Per-image memory by slope: peak memory at several batch sizes (each point a fresh process), fitted as
bytes = a + b * batch, so the per-image cost b is measured without the fixed overhead a that swamps batch 1.

ONNX Runtime: peak resident memory with graph optimisations off (the graph as exported, closest to the liveness
analysis) and on (what ONNX Runtime really needs). TensorRT: ``device_memory_size`` of an engine whose one
optimisation profile is that batch.
"""

import os

import numpy as np

#: inferences per point after the warm-up: peak memory is reached in one, a few catch a late allocation
SLOPE_ITERS = 3

#: (agent argument --point-opt, method key, label, what the setting is)
ORT_SETTINGS = (
    ("off", "onnxruntime_slope_opt_off", "ORT per image, optimisations off",
     "graph optimisations off (ORT_DISABLE_ALL): the graph as exported, node for node, the closest to the "
     "liveness analysis"),
    ("on", "onnxruntime_slope_opt_on", "ORT per image, optimisations on",
     "graph optimisations on (ORT_ENABLE_ALL, ONNX Runtime's default and what the latency run uses): fusions and "
     "in-place reuse, ONNX Runtime's real footprint"),
)
TRT_METHOD = ("tensorrt_slope", "TensorRT per image")


def page_bytes():
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 4096


def fit_line(batches, values):
    """Least-squares ``values = a + b * batches``: a, b, the residuals, their largest magnitude, r^2 (None when the
    values do not vary) and the standard error of b (None with two points)."""
    x = np.asarray(batches, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if len(set(x.tolist())) < 2:
        raise ValueError("a slope needs at least two different batch sizes (got %s)" % list(batches))
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), _, _, _ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - (a + b * x)
    ssr = float(np.sum(residuals ** 2))
    sst = float(np.sum((y - y.mean()) ** 2))
    sxx = float(np.sum((x - x.mean()) ** 2))
    stderr = float(np.sqrt(ssr / (len(x) - 2) / sxx)) if len(x) > 2 else None
    return {"a_bytes": float(a), "b_bytes": float(b), "residuals_bytes": [float(r) for r in residuals],
            "max_abs_residual_bytes": float(np.max(np.abs(residuals))), "r2": 1.0 - ssr / sst if sst > 0 else None,
            "b_stderr_bytes": stderr}


def point_error(n, max_abs_residual):
    """How far a point may lie off the true line: the largest residual, scaled up by sqrt(n / (n - 2)) because a
    two-parameter fit absorbs part of the points' scatter (on average their residual variance is (n - 2) / n of it)."""
    return float(max_abs_residual) * (n / float(n - 2)) ** 0.5 if n > 2 else float("inf")


def slope_resolution(batches, quantum, max_abs_residual):
    """The smallest per-image figure the fit resolves: each point is known to within max(quantum, its error), so
    the two end points can tilt the line by twice that over the batch span."""
    span = max(batches) - min(batches)
    return 2.0 * max(float(quantum), point_error(len(batches), max_abs_residual)) / span


def slope_figure(method, label, points, quantum, quantum_how, what, how, **extra):
    """A per-image figure from its points (``{"batch", "bytes", ...}``): ``bytes`` = the slope b, rounded."""
    batches = [p["batch"] for p in points]
    fit = fit_line(batches, [p["bytes"] for p in points])
    resolution = slope_resolution(batches, quantum, fit["max_abs_residual_bytes"])
    figure = {"method": method, "label": label, "per_image": True, "bytes": int(round(fit["b_bytes"])),
              "unit": "bytes per image", "what": what, "how": how, "points": points, "fit": fit,
              "quantum_bytes": quantum,
              "resolution_bytes": int(np.ceil(resolution)),
              "resolution_how": "2 x max(%s, the fit's largest residual %d B x sqrt(%d/%d)) / the batch span %d-%d: "
                                "a per-image figure below this is not resolved"
                                % (quantum_how, fit["max_abs_residual_bytes"], len(points), len(points) - 2,
                                   min(batches), max(batches))}
    figure.update(extra)
    return figure


def skipped(batches, reason):
    return {"what": "activation memory per image: the slope b of peak memory over batch size (a + b * batch)",
            "batches": list(batches), "figures": [], "skipped": reason}


def measure_per_image(batches, dynamic, backend, providers, run_point):
    """The per-image section of the report; ``run_point(extra_argv)`` runs one point in a fresh process and returns
    its result. A bundle or backend that cannot be measured this way gets the reason, never a failure."""
    batches = sorted(set(batches))
    if not batches:
        return skipped(batches, "--slope-batches none")
    if len(batches) < 3:
        return skipped(batches, "two batch sizes fit any line exactly: give --slope-batches at least three")
    if not dynamic:
        return skipped(batches, "the bundle's input has a fixed batch of 1 (exported without --dynamic-batch; "
                                "denoiser bundles always are): re-export with `redistill export --dynamic-batch` "
                                "to measure memory per image")
    section = skipped(batches, None)
    if backend == "tensorrt":
        points = [run_point(["--point-batch", str(b)]) for b in batches]
        section["figures"].append(slope_figure(
            TRT_METHOD[0], TRT_METHOD[1], points, 1, "1 B (an exact allocation size)",
            "device memory TensorRT reserves per image for activations and scratch (the slope over engines built "
            "for each batch)",
            "ICudaEngine.%s of one engine per batch size, each with one optimisation profile (min = opt = max = "
            "that batch), least-squares fit over the batches" % points[0].get("attr", "device_memory_size")))
        return section
    if providers and providers[0] != "CPUExecutionProvider":
        section["skipped"] = ("ONNX Runtime runs on %s here and resident memory does not show device allocations; "
                              "deploy with --ort-device cpu to measure per image" % providers[0])
        return section
    quantum = page_bytes()
    for opt, method, label, setting in ORT_SETTINGS:
        points = [run_point(["--point-batch", str(b), "--point-opt", opt]) for b in batches]
        reset = all(p.get("hwm_reset") for p in points)
        section["figures"].append(slope_figure(
            method, label, points, quantum, "the page size %d B" % quantum,
            "resident memory per image that inference adds (activations and per-image scratch; the input batch is "
            "allocated before the baseline and not counted), %s" % setting,
            "per batch size, a fresh process: session created, one warm-up inference, malloc_trim(0), baseline "
            "VmRSS; then %d inferences and %s; point = peak - baseline; CPU memory arena and memory pattern off, "
            "glibc's mmap threshold at 64 KiB; least-squares fit over the batches"
            % (SLOPE_ITERS, "VmHWM after resetting it via /proc/self/clear_refs" if reset
               else "VmHWM of the fresh process (could not be reset here: loading is included)"),
            graph_optimization=opt))
    return section

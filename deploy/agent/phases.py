"""The measurement phases, each run in its own process: latency (with the output check), memory, and one point of
the per-image slope (slope.py).

A phase takes the parsed options, the verified bundle and its id, and returns a JSON-ready dict.
"""

import time

import numpy as np

from .backends import choose_backend
from .bundle import batch_of, input_batch_is_dynamic, load_reference, sample_count, take_samples
from .common import AgentError, log
from .contract import RSS_DELTA_RESOLUTION_BYTES
from .probes import RssSampler, SystemRamSampler, meminfo_used_bytes, proc_status_kb, reset_peak_rss, trim_heap
from .slope import SLOPE_ITERS, page_bytes


def output_check(backend, manifest, x, y):
    """Run the reference inputs (``{name: array}``) and compare with the bundle's reference outputs."""
    if input_batch_is_dynamic(manifest):
        got = backend.infer(x)
    else:
        got = np.concatenate([backend.infer(take_samples(x, i, i + 1)) for i in range(sample_count(x))], axis=0)
    got = got.reshape(y.shape).astype(np.float32)
    diff = float(np.max(np.abs(got - y))) if y.size else 0.0
    top1 = float(np.mean(np.argmax(got, axis=1) == np.argmax(y, axis=1))) if y.ndim == 2 and len(y) else None
    atol = float((manifest.get("reference") or {}).get("atol") or 1e-3)
    same_precision = backend.precision == manifest.get("precision", "fp32")
    within = diff <= atol
    min_top1 = backend.args.min_top1
    passed = (top1 is None or top1 >= min_top1) and (within or not same_precision)
    return {"what": "the bundle's reference inputs through this backend vs the reference outputs stored at export",
            "how": "max |device - reference| over all outputs (logits, or a denoiser's eps); top-1 agreement = "
                   "fraction of samples with the same argmax (classifiers only)",
            "samples": int(sample_count(x)), "max_abs_diff": diff, "atol": atol, "within_atol": within,
            "top1_agreement": top1, "min_top1": min_top1,
            "atol_applies": same_precision, "passed": bool(passed)}


def latency_stats(times_s, batch):
    t = np.asarray(times_s, dtype=np.float64) * 1000.0
    mean = float(t.mean())
    return {"mean_ms": mean, "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "min_ms": float(t.min()), "max_ms": float(t.max()),
            "std_ms": float(t.std()), "iterations": int(len(t)), "batch": int(batch),
            "throughput_per_s": float(batch * 1000.0 / mean) if mean > 0 else None}


def make_backend(args, bundle_dir, manifest, bid):
    cls = choose_backend(args.backend, manifest)
    backend = cls(bundle_dir, manifest, bid, args)
    t0 = time.perf_counter()
    backend.load()
    return backend, time.perf_counter() - t0


def phase_latency(args, bundle_dir, manifest, bid):
    x_ref, y_ref = load_reference(bundle_dir, manifest)
    backend, load_s = make_backend(args, bundle_dir, manifest, bid)
    try:
        log("loaded %s backend in %.2f s; checking outputs" % (backend.name, load_s))
        check = output_check(backend, manifest, x_ref, y_ref)
        log("output check: max abs diff %.3g, top-1 agreement %s -> %s"
            % (check["max_abs_diff"], check["top1_agreement"], "pass" if check["passed"] else "FAIL"))
        batch = args.batch if input_batch_is_dynamic(manifest) else 1
        run = backend.bench(batch_of(x_ref, batch))
        log("latency: %d warm-up + %d timed iterations at batch %d" % (args.warmup, args.iters, batch))
        for _ in range(args.warmup):
            run()
        times = []
        clock = time.perf_counter
        for _ in range(args.iters):
            t0 = clock()
            run()
            times.append(clock() - t0)
        lat = latency_stats(times, batch)
        lat["warmup"] = args.warmup
        lat["what"] = "wall-clock time of one inference call of a batch, after %d discarded warm-up calls" % args.warmup
        if manifest.get("task") == "denoise":
            lat["what"] += "; one call = one denoising step (eps for x_t at one time step)"
        lat["how"] = ("time.perf_counter around %s; %s" % (
            "execute_v2 / execute_async_v3 + stream sync" if backend.name == "tensorrt" else "InferenceSession.run",
            "input already on the GPU, outputs left there" if backend.name == "tensorrt" else "includes ORT's input/output copies"))
        log("latency: mean %.3f ms, p50 %.3f ms, p99 %.3f ms" % (lat["mean_ms"], lat["p50_ms"], lat["p99_ms"]))
        return {"backend": backend.info, "load_seconds": load_s, "output_check": check, "latency": lat}
    finally:
        backend.close()


def phase_memory(args, bundle_dir, manifest, bid):
    x_ref, _ = load_reference(bundle_dir, manifest)
    batch = args.batch if input_batch_is_dynamic(manifest) else 1
    x = batch_of(x_ref, batch)
    rss_start = proc_status_kb("VmRSS")
    backend, load_s = make_backend(args, bundle_dir, manifest, bid)
    try:
        backend.infer(x)  # one-time allocations of the first run (kernel set-up, thread pool) are not activations
        trimmed = trim_heap()
        rss_loaded = proc_status_kb("VmRSS")
        hwm_loaded = proc_status_kb("VmHWM")
        reset = reset_peak_rss()
        before = meminfo_used_bytes()
        log("memory: %d inferences at batch %d in a fresh process" % (args.mem_iters, batch))
        with SystemRamSampler(args.sample_ms) as ram, RssSampler() as rss:
            for _ in range(args.mem_iters):
                backend.infer(x)
            time.sleep(max(0.0, 2 * args.sample_ms / 1000.0))  # at least one system sample after the work
        hwm_end = proc_status_kb("VmHWM")
        peak_during_kb = hwm_end if reset and hwm_end is not None else max(rss.peak_kb, rss_loaded or 0)
        mem = {}
        act = backend.activation_memory()
        if act is None:
            act = rss_delta_figure(args, backend, batch, peak_during_kb, rss_loaded, reset, trimmed)
        mem["activation"] = act
        page = page_bytes()
        by_page = {"resolution_bytes": page, "resolution_how": "one page (%d B): resident memory is counted in pages"
                   % page}
        mem["process_peak"] = dict({"bytes": max(hwm_end or 0, hwm_loaded or 0) * 1024,
                                    "what": "highest resident memory of the agent's memory-run process, loading included",
                                    "how": "VmHWM from /proc/self/status at the end of the memory run"}, **by_page)
        mem["process_after_load"] = dict({"bytes": rss_loaded * 1024 if rss_loaded else None,
                                          "startup_bytes": rss_start * 1024 if rss_start else None,
                                          "what": "resident memory once the model was loaded (interpreter, libraries, "
                                                  "weights)",
                                          "how": "VmRSS from /proc/self/status right after loading"}, **by_page)
        mem["system_ram"] = ram.summary(before[0] if before else None)
        mem["iterations"] = args.mem_iters
        mem["batch"] = batch
        mem["load_seconds"] = load_s
        log("memory: activation %s bytes, process peak %s bytes" % (act["bytes"], mem["process_peak"]["bytes"]))
        return {"memory": mem}
    finally:
        backend.close()


def rss_delta_figure(args, backend, batch, peak_kb, rss_loaded_kb, reset, trimmed):
    """ONNX Runtime's activation figure: peak resident memory during inference over what the loaded model held."""
    act = {"method": "onnxruntime_rss_delta", "label": "ORT batch-%d RSS delta" % batch, "per_image": False,
           "batch": batch, "bytes": (peak_kb - rss_loaded_kb) * 1024 if rss_loaded_kb is not None else None,
           "what": "extra resident memory of the process while running inference over what it held once the "
                   "model was loaded: activations, scratch and anything the first run allocates",
           "how": "peak RSS during %d inferences (%s) minus VmRSS after InferenceSession creation and one warm-up "
                  "inference%s, graph optimisations on (ORT's default), with ORT's CPU memory arena and memory "
                  "pattern off and glibc's mmap threshold at "
                  "64 KiB, so that each activation buffer is mapped when allocated and unmapped when freed"
                  % (args.mem_iters, "VmHWM after resetting it via /proc/self/clear_refs" if reset
                     else "VmRSS sampled every 1 ms", " and malloc_trim(0)" if trimmed else ""),
           "quantum_bytes": page_bytes(), "resolution_bytes": RSS_DELTA_RESOLUTION_BYTES,
           "resolution_how": "measured spread: 24 deploys of one bundle gave 112-300 KiB; buffers under the 64 KiB "
                             "mmap threshold come from the heap, whose reuse resident memory does not show"}
    if backend.info.get("providers", ["CPUExecutionProvider"])[0] != "CPUExecutionProvider":
        act["how"] += "; CUDA allocations are not resident-set memory unless the GPU shares RAM"
    return act


def phase_slope_point(args, bundle_dir, manifest, bid):
    """One point of the per-image slope at ``--point-batch``: TensorRT's device memory for an engine whose one
    profile is that batch, or ONNX Runtime's peak resident memory over its loaded baseline (``--point-opt``)."""
    x_ref, _ = load_reference(bundle_dir, manifest)
    batch = args.point_batch
    x = batch_of(x_ref, batch)  # allocated before the baseline: the input is not in the figure
    backend, load_s = make_backend(args, bundle_dir, manifest, bid)
    try:
        act = backend.activation_memory()
        if act is not None:
            log("slope: batch %d, %s %d bytes" % (batch, act["attr"], act["bytes"]))
            return {"batch": batch, "bytes": act["bytes"], "attr": act["attr"], "load_seconds": load_s}
        backend.infer(x)
        trim_heap()
        baseline = proc_status_kb("VmRSS")
        reset = reset_peak_rss()
        for _ in range(SLOPE_ITERS):
            backend.infer(x)
        peak = proc_status_kb("VmHWM")
        if peak is None or baseline is None:
            raise AgentError("refused", "/proc/self/status has no VmRSS/VmHWM here, so memory per image cannot be "
                             "measured; run with --slope-batches none")
        log("slope: batch %d, graph optimisations %s, peak %d KiB over %d KiB"
            % (batch, args.point_opt, peak - baseline, baseline))
        return {"batch": batch, "bytes": (peak - baseline) * 1024, "peak_bytes": peak * 1024,
                "baseline_bytes": baseline * 1024, "hwm_reset": reset, "load_seconds": load_s}
    finally:
        backend.close()


PHASES = {"latency": phase_latency, "memory": phase_memory, "slope-point": phase_slope_point}

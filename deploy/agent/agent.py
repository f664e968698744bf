#!/usr/bin/env python3
"""ReDistill on-device bench agent: verify a bundle, run it, measure latency and memory, print a JSON report.

Copied alone to the device by ``redistill deploy``; it imports nothing from the project and
only the standard library and numpy at import time, so it runs on JetPack 4.6's Python 3.6
through 3.12 (checked with ``vermin --target=3.6-``). Backends (TensorRT, ONNX Runtime) are
imported only when chosen. Progress goes to stderr; the report goes to stdout between
markers (and to ``--json-out``). A refusal or bad input exits 3 with one
``REDISTILL-AGENT-ERROR:`` line; anything else is a crash with a traceback.

Bundles with several inputs (a denoiser's ``x``, ``t`` and optional ``y``; manifest schema version 2)
are fed every input the manifest lists, from the bundle's reference inputs, by name; one call is one
forward pass (one denoising step) at batch 1, measured like a classifier's.

Usage: python3 agent.py --bundle DIR [--backend auto|tensorrt|onnxruntime]
       [--precision auto|fp32|fp16|int8] [--json-out FILE]
"""

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np

AGENT_VERSION = "1"
REPORT_SCHEMA = "redistill-device-report"
REPORT_SCHEMA_VERSION = 1
BUNDLE_SCHEMA = "redistill-bundle"
BUNDLE_SCHEMA_VERSION = 2  # 1: one input (the ``input`` key); 2: several inputs (``inputs`` list)
REPORT_BEGIN = "===REDISTILL-REPORT-BEGIN==="
REPORT_END = "===REDISTILL-REPORT-END==="
ERROR_PREFIX = "REDISTILL-AGENT-ERROR:"
EXIT_REFUSED = 3


class PhaseCrashed(Exception):
    """A measurement subprocess died; its traceback is already on stderr, ``str(self)`` is its exception line."""


class AgentError(Exception):
    """A refusal or bad input: printed as one line that names the fix, exit code 3."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind


def log(msg):
    sys.stderr.write("agent: %s\n" % msg)
    sys.stderr.flush()


# --------------------------------------------------------------------------- backend registry

BACKENDS = {}


def register_backend(name):
    """Adding a backend = one class decorated with ``@register_backend("name")``."""
    def deco(cls):
        if name in BACKENDS:
            raise ValueError("backend %r registered twice" % name)
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return deco


def get_backend(name):
    if name not in BACKENDS:
        raise AgentError("bad-argument", "unknown backend %r; valid: %s" % (name, ", ".join(sorted(BACKENDS))))
    return BACKENDS[name]


def module_available(name):
    if sys.modules.get(name) is not None:
        return True
    try:
        import importlib.util
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def choose_backend(requested):
    """``auto``: TensorRT when its bindings and a CUDA buffer library are importable, else ONNX Runtime."""
    if requested != "auto":
        return get_backend(requested)
    for name in ("tensorrt", "onnxruntime"):
        if BACKENDS[name].available():
            return BACKENDS[name]
    raise AgentError("no-backend", "neither TensorRT (with pycuda or cuda-python) nor onnxruntime is importable "
                     "by %s; on a Jetson: pip3 install pycuda (see docs/deploy.md), elsewhere: pip install onnxruntime"
                     % sys.executable)


# --------------------------------------------------------------------------- bundle

def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def load_and_verify_bundle(bundle_dir):
    """Read the manifest and check every listed file's sha256 before anything runs."""
    mpath = os.path.join(bundle_dir, "manifest.json")
    if not os.path.isfile(mpath):
        raise AgentError("bad-bundle", "%s has no manifest.json; redeploy the bundle" % bundle_dir)
    with open(mpath, "rb") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise AgentError("bad-bundle", "manifest.json is not valid JSON (%s); redeploy the bundle" % e)
    if manifest.get("schema") != BUNDLE_SCHEMA:
        raise AgentError("bad-bundle", "manifest.json is not a %s manifest; redeploy the bundle" % BUNDLE_SCHEMA)
    if manifest.get("schema_version", 0) > BUNDLE_SCHEMA_VERSION:
        raise AgentError("bad-bundle", "bundle schema version %s is newer than this agent understands (%d); "
                         "redeploy with a matching redistill" % (manifest.get("schema_version"), BUNDLE_SCHEMA_VERSION))
    files = manifest.get("files") or {}
    if not files:
        raise AgentError("bad-bundle", "manifest.json lists no files; re-export the bundle")
    root = os.path.realpath(bundle_dir)
    for rel in sorted(files):
        path = os.path.realpath(os.path.join(bundle_dir, rel))
        if not path.startswith(root + os.sep):
            raise AgentError("bad-bundle", "manifest lists a file outside the bundle (%s); re-export the bundle" % rel)
        if not os.path.isfile(path):
            raise AgentError("bundle-altered", "bundle file %s is missing on the device; redeploy with --recopy" % rel)
        if sha256_file(path) != files[rel]["sha256"]:
            raise AgentError("bundle-altered", "bundle file %s does not match its sha256 in the manifest on the device "
                             "(altered or corrupt); redeploy with --recopy" % rel)
    return manifest, hashlib.sha256(raw).hexdigest()


def listed_file(bundle_dir, manifest, rel):
    """The path of bundle file ``rel``, which must be one the manifest lists (so its sha256 was checked)."""
    if rel not in (manifest.get("files") or {}):
        raise AgentError("bad-bundle", "manifest.json names %s but does not list it with a sha256; re-export the bundle"
                         % rel)
    return os.path.join(bundle_dir, rel)


def bundle_path(bundle_dir, manifest, key, default):
    ref = manifest.get("reference") or {}
    return listed_file(bundle_dir, manifest, ref.get(key) or default)


def onnx_path(bundle_dir, manifest):
    return listed_file(bundle_dir, manifest, (manifest.get("onnx") or {}).get("file") or "model.onnx")


def is_qdq_onnx(path):
    """True when the ONNX graph has QuantizeLinear/DequantizeLinear nodes (op types are plain strings in the protobuf)."""
    with open(path, "rb") as f:
        data = f.read()
    return b"QuantizeLinear" in data and b"DequantizeLinear" in data


def bundle_inputs(manifest):
    """Every graph input as ``{"name", "shape", "dtype"}``: the ``inputs`` list, else the v1 single ``input``."""
    inputs = manifest.get("inputs")
    if not inputs:
        one = dict(manifest.get("input") or {})
        one.setdefault("name", "input")
        inputs = [one]
    out = []
    for spec in inputs:
        spec = dict(spec)
        if not spec.get("name"):
            raise AgentError("bad-bundle", "manifest.json lists an input without a name; re-export the bundle")
        spec.setdefault("dtype", "float32")
        spec.setdefault("shape", [])
        out.append(spec)
    return out


def input_batch_is_dynamic(manifest):
    for inp in bundle_inputs(manifest):
        if inp.get("dynamic_batch"):
            return True
        shape = inp.get("shape") or []
        if shape and not isinstance(shape[0], int):
            return True
    return False


# --------------------------------------------------------------------------- memory probes

def proc_status_kb(field, pid="self"):
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (IOError, OSError, ValueError):
        pass
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (IOError, OSError):
        return False


class RssSampler(object):
    """Samples this process's VmRSS in a thread: the fallback peak when VmHWM cannot be reset."""

    def __init__(self, interval=0.001):
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.daemon = True

    def _run(self):
        while not self._stop.is_set():
            kb = proc_status_kb("VmRSS")
            if kb is not None:
                self.peak_kb = max(self.peak_kb, kb)
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


TEGRA_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")


def parse_tegrastats_ram(line):
    """``RAM 2020/7852MB (lfb ...)`` -> (used_bytes, total_bytes), or None."""
    m = TEGRA_RAM.search(line)
    if not m:
        return None
    return int(m.group(1)) * 1024 * 1024, int(m.group(2)) * 1024 * 1024


def meminfo_used_bytes():
    vals = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    vals[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except (IOError, OSError, ValueError):
        return None
    if "MemTotal" not in vals or "MemAvailable" not in vals:
        return None
    return vals["MemTotal"] - vals["MemAvailable"], vals["MemTotal"]


class SystemRamSampler(object):
    """System RAM in use during a run: ``tegrastats`` on a Jetson, else jtop, else /proc/meminfo."""

    def __init__(self, interval_ms=100):
        self.interval_ms = interval_ms
        self.samples = []
        self.total = None
        self.source = None
        self.how = None
        self._proc = None
        self._thread = None
        self._stop = threading.Event()

    def _add(self, used_total):
        if used_total:
            self.samples.append(used_total[0])
            self.total = used_total[1]

    def _read_tegrastats(self):
        for line in iter(self._proc.stdout.readline, ""):
            self._add(parse_tegrastats_ram(line))

    def _poll(self, read):
        while not self._stop.is_set():
            self._add(read())
            self._stop.wait(self.interval_ms / 1000.0)

    def __enter__(self):
        tegrastats = shutil.which("tegrastats")
        if tegrastats:
            try:
                self._proc = subprocess.Popen([tegrastats, "--interval", str(self.interval_ms)],
                                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                              universal_newlines=True)
                self.source = "tegrastats"
                self.how = "max of tegrastats 'RAM used/total' lines every %d ms during the memory run" % self.interval_ms
                self._thread = threading.Thread(target=self._read_tegrastats)
            except OSError:
                self._proc = None
        if self._proc is None and module_available("jtop"):
            try:
                from jtop import jtop  # jetson-stats; needs the jtop service
                self._jtop = jtop()
                self._jtop.start()

                def read():
                    ram = self._jtop.memory.get("RAM", {}) if hasattr(self._jtop, "memory") else {}
                    if "used" in ram and "tot" in ram:
                        return int(ram["used"]) * 1024, int(ram["tot"]) * 1024
                    return None
                self.source = "jtop"
                self.how = "max of jtop memory['RAM']['used'] polled every %d ms during the memory run" % self.interval_ms
                self._thread = threading.Thread(target=self._poll, args=(read,))
            except Exception as e:  # jtop service not running and the like
                log("jtop unavailable (%s); falling back to /proc/meminfo" % e)
                self._jtop = None
        if self._thread is None:
            self.source = "proc-meminfo"
            self.how = ("max of /proc/meminfo MemTotal - MemAvailable polled every %d ms during the memory run "
                        "(no tegrastats or jtop here)" % self.interval_ms)
            self._thread = threading.Thread(target=self._poll, args=(meminfo_used_bytes,))
        self._add(meminfo_used_bytes() if self.source == "proc-meminfo" else None)
        self._thread.daemon = True
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if getattr(self, "_jtop", None) is not None:
            try:
                self._jtop.close()
            except Exception:
                pass
        self._thread.join(timeout=5)

    def summary(self, before):
        if not self.samples:
            return {"bytes": None, "source": self.source, "what": "system RAM in use during the memory run",
                    "how": (self.how or "") + "; no samples were read"}
        return {"bytes": max(self.samples), "min_bytes": min(self.samples), "before_bytes": before,
                "total_bytes": self.total, "samples": len(self.samples), "source": self.source,
                "what": "system-wide RAM in use (all processes; on a Jetson the GPU shares this RAM) while the model ran",
                "how": self.how}


# --------------------------------------------------------------------------- device facts

def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00\n ")
    except (IOError, OSError):
        return None


def run_quiet(argv, timeout=10):
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def parse_l4t_release(text):
    """``# R32 (release), REVISION: 7.1, ...`` -> ``R32.7.1``."""
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", text or "")
    return "R%s.%s" % (m.group(1), m.group(2)) if m else None


def parse_nvpmodel(text):
    """``nvpmodel -q`` prints ``NV Power Mode: MAXN`` then the mode id."""
    m = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)", text or "")
    if m:
        return {"name": m.group(1), "id": int(m.group(2))}
    m = re.search(r"NV Power Mode:\s*(\S+)", text or "")
    return {"name": m.group(1), "id": None} if m else None


def jetson_clocks_state():
    """jetson_clocks pins min frequency to max; read that from sysfs (``jetson_clocks --show`` needs root)."""
    pinned, checked = [], []
    paths = glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq") + \
        [p for p in glob.glob("/sys/devices/*/devfreq/*") if re.search(r"gp10b|ga10b|gv11b|gpu", p)]
    for d in paths:
        lo = read_text(os.path.join(d, "scaling_min_freq" if "cpufreq" in d else "min_freq"))
        hi = read_text(os.path.join(d, "scaling_max_freq" if "cpufreq" in d else "max_freq"))
        if lo and hi:
            checked.append(d)
            pinned.append(lo == hi)
    if not checked:
        return None
    return {"on": all(pinned), "how": "min frequency == max frequency for %d CPU/GPU clocks in sysfs" % len(checked)}


def cuda_version():
    for path in ("/usr/local/cuda/version.json", "/usr/local/cuda/version.txt"):
        text = read_text(path)
        if text:
            m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([\d.]+)"', text) or re.search(r"Version ([\d.]+)", text)
            if m:
                return m.group(1)
    return None


def module_version(name):
    if not module_available(name):
        return None
    try:
        mod = __import__(name)
        return getattr(mod, "__version__", "unknown")
    except Exception as e:  # a broken install should not stop the report
        return "unimportable: %s" % e.__class__.__name__


def device_facts():
    model = read_text("/proc/device-tree/model")
    l4t_raw = read_text("/etc/nv_tegra_release")
    is_jetson = bool(l4t_raw) or bool(model and "jetson" in model.lower())
    facts = {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "model": model,
        "is_jetson": is_jetson,
        "l4t_release": parse_l4t_release(l4t_raw),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "numpy": np.__version__,
        "tensorrt": module_version("tensorrt"),
        "onnxruntime": module_version("onnxruntime"),
        "cuda": cuda_version(),
        "cpu_count": os.cpu_count(),
        "nvpmodel": None,
        "jetson_clocks": None,
    }
    if is_jetson:
        nvp = shutil.which("nvpmodel")
        if nvp:
            rc, out = run_quiet([nvp, "-q"])
            facts["nvpmodel"] = parse_nvpmodel(out) if rc == 0 else None
        facts["jetson_clocks"] = jetson_clocks_state()
    return facts


# --------------------------------------------------------------------------- backends

class Backend(object):
    """One loaded model. ``infer(feeds)`` takes ``{input name: array}`` (every input of the bundle) and returns the
    first output as numpy; ``bench(feeds)`` returns a no-argument callable to time."""

    name = None

    @classmethod
    def available(cls):
        return False

    def __init__(self, bundle_dir, manifest, bundle_id, args):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.bundle_id = bundle_id
        self.args = args
        self.info = {}

    def load(self):
        raise NotImplementedError

    def infer(self, feeds):
        raise NotImplementedError

    def bench(self, feeds):
        return lambda: self.infer(feeds)

    def activation_memory(self):
        """A dict with bytes/what/how, or None when this backend cannot tell."""
        return None

    def close(self):
        pass


@register_backend("onnxruntime")
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on CPU (CUDA when present), with the memory arena and pattern off so RSS follows real allocations."""

    @classmethod
    def available(cls):
        return module_available("onnxruntime")

    def load(self):
        import onnxruntime as ort
        precision = self.args.precision
        bundle_precision = self.manifest.get("precision", "fp32")
        if precision not in ("auto", bundle_precision):
            raise AgentError("refused", "the onnxruntime backend runs the model as exported (%s); --precision %s needs "
                             "--backend tensorrt, or deploy the %s bundle" % (bundle_precision, precision, precision))
        self.precision = bundle_precision
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        if self.args.threads:
            so.intra_op_num_threads = self.args.threads
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if self.args.ort_device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
            providers = [("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}), "CPUExecutionProvider"]
        elif self.args.ort_device == "cuda":
            raise AgentError("refused", "onnxruntime here has no CUDAExecutionProvider (has %s); use --ort-device cpu "
                             "or install onnxruntime-gpu" % ", ".join(available))
        self.sess = ort.InferenceSession(onnx_path(self.bundle_dir, self.manifest), sess_options=so, providers=providers)
        self.input_names = [i.name for i in self.sess.get_inputs()]
        want = [i["name"] for i in bundle_inputs(self.manifest)]
        if sorted(self.input_names) != sorted(want):
            raise AgentError("bad-bundle", "model.onnx takes inputs %s but the manifest lists %s; re-export the bundle"
                             % (", ".join(self.input_names), ", ".join(want)))
        self.output_name = self.sess.get_outputs()[0].name
        self.info = {"name": "onnxruntime", "version": ort.__version__, "providers": self.sess.get_providers(),
                     "precision": self.precision, "cpu_mem_arena": False, "mem_pattern": False}

    def infer(self, feeds):
        return self.sess.run([self.output_name], dict(feeds))[0]

    def bench(self, feeds):
        feed, out, run = dict(feeds), [self.output_name], self.sess.run
        return lambda: run(out, feed)

    def activation_memory(self):
        return None  # measured from RSS by the memory phase


class CudaBuffers(object):
    """Device buffers and a stream through pycuda or cuda-python, whichever is importable."""

    def __init__(self):
        self.lib = None
        self._ctx = None
        if module_available("pycuda"):
            import pycuda.driver as cuda
            cuda.init()
            self._ctx = cuda.Device(0).make_context()
            self.cuda = cuda
            self.lib = "pycuda"
            self.stream = cuda.Stream()
            self.stream_handle = self.stream.handle
            self.gpu_name = cuda.Device(0).name()
        else:
            cudart = None
            try:
                from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
            except ImportError:
                try:
                    from cuda import cudart  # older cuda-python
                except ImportError:
                    cudart = None
            if cudart is None:
                raise AgentError("no-cuda-python", "TensorRT needs pycuda or cuda-python for buffers and neither is "
                                 "importable by %s; install pycuda (docs/deploy.md) or use --backend onnxruntime"
                                 % sys.executable)
            self.cudart = cudart
            self.lib = "cuda-python"
            self.stream = self._check(cudart.cudaStreamCreate())
            self.stream_handle = int(self.stream)
            prop = self._check(cudart.cudaGetDeviceProperties(0))
            name = prop.name
            self.gpu_name = name.decode("utf-8", "replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
        self._allocs = []

    def _check(self, result):
        err, rest = result[0], result[1:]
        if int(err) != 0:
            raise RuntimeError("CUDA error %s" % err)
        return rest[0] if len(rest) == 1 else (rest or None)

    def alloc(self, nbytes):
        nbytes = max(int(nbytes), 1)
        if self.lib == "pycuda":
            mem = self.cuda.mem_alloc(nbytes)
            self._allocs.append(mem)
            return int(mem)
        ptr = self._check(self.cudart.cudaMalloc(nbytes))
        self._allocs.append(ptr)
        return int(ptr)

    def htod(self, ptr, host):
        if self.lib == "pycuda":
            self.cuda.memcpy_htod(ptr, host)
        else:
            self._check(self.cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))

    def dtoh(self, host, ptr):
        if self.lib == "pycuda":
            self.cuda.memcpy_dtoh(host, ptr)
        else:
            self._check(self.cudart.cudaMemcpy(host.ctypes.data, ptr, host.nbytes,
                                               self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))

    def sync(self):
        if self.lib == "pycuda":
            self.stream.synchronize()
        else:
            self._check(self.cudart.cudaStreamSynchronize(self.stream))

    def close(self):
        if self.lib == "pycuda":
            for mem in self._allocs:
                mem.free()
            if self._ctx is not None:
                self._ctx.pop()
        else:
            for ptr in self._allocs:
                self.cudart.cudaFree(ptr)
        self._allocs = []


def slug(text):
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-").lower() or "unknown"


def atomic_write_bytes(path, data):
    d = os.path.dirname(path) or "."
    if not os.path.isdir(d):
        os.makedirs(d)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@register_backend("tensorrt")
class TensorRTBackend(Backend):
    """TensorRT 8.2 (JetPack 4.6) and 10.x (JetPack 6): engine built on the device from the ONNX file and cached.

    API differences are detected from the objects themselves (``set_memory_pool_limit`` vs
    ``max_workspace_size``, ``num_io_tensors`` vs ``num_bindings``, ``device_memory_size_v2``
    vs ``device_memory_size``), so 8.4-8.6 take whichever path they support.
    """

    @classmethod
    def available(cls):
        return module_available("tensorrt") and (module_available("pycuda") or module_available("cuda"))

    def load(self):
        import tensorrt as trt
        self.trt = trt
        self.trt_version = str(getattr(trt, "__version__", "unknown"))
        self.major = int(re.match(r"(\d+)", self.trt_version).group(1)) if re.match(r"\d+", self.trt_version) else 0
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.cuda = CudaBuffers()
        self.gpu_name = self.cuda.gpu_name
        self.precision = self.resolve_precision()
        key = "%s-trt%s-%s-%s" % (self.bundle_id[:16], slug(self.trt_version), slug(self.gpu_name), self.precision)
        cache_dir = self.args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(self.bundle_dir)), "engines")
        self.engine_path = os.path.join(cache_dir, key + ".engine")
        self.sidecar_path = os.path.join(cache_dir, key + ".json")
        self.timing_cache_path = os.path.join(cache_dir, key + ".timing-cache")
        cached = self.load_cached_engine()
        if cached is None:
            serialized, build_s = self.build_engine()
            data = bytes(serialized)
            atomic_write_bytes(self.engine_path, data)
            meta = {"bundle_id": self.bundle_id, "tensorrt": self.trt_version, "gpu": self.gpu_name,
                    "precision": self.precision, "engine_sha256": hashlib.sha256(data).hexdigest(),
                    "engine_bytes": len(data), "build_seconds": round(build_s, 3),
                    "workspace_bytes": self.args.workspace_mb * 1024 * 1024,
                    "created": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")}
            atomic_write_bytes(self.sidecar_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
            engine_cache = {"hit": False, "build_seconds": round(build_s, 3)}
        else:
            data, meta = cached
            engine_cache = {"hit": True, "built": meta.get("created")}
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize %s" % self.engine_path)
        self.context = self.engine.create_execution_context()
        self.v3 = hasattr(self.engine, "num_io_tensors")
        self.io = self.describe_io()
        engine_cache.update({"path": self.engine_path, "sidecar": self.sidecar_path, "key": key, "engine_bytes": len(data)})
        self.info = {"name": "tensorrt", "version": self.trt_version, "gpu": self.gpu_name, "precision": self.precision,
                     "cuda_buffers": self.cuda.lib, "api": "execute_async_v3" if self.v3 else "execute_v2",
                     "engine_cache": engine_cache}
        self._shape = None

    def resolve_precision(self):
        bundle_precision = self.manifest.get("precision", "fp32")
        precision = self.args.precision
        if precision == "auto":
            precision = "int8" if bundle_precision == "int8" else "fp32"
        self.qdq = is_qdq_onnx(onnx_path(self.bundle_dir, self.manifest))
        if self.qdq and precision != "int8":
            raise AgentError("refused", "this bundle is Q/DQ-quantized (INT8) and TensorRT builds Q/DQ networks only as "
                             "INT8; use --precision int8 on a GPU with fast INT8, or deploy the fp32 bundle")
        return precision

    def _builder_flags(self, builder, config):
        trt = self.trt
        if self.precision == "fp16":
            if not getattr(builder, "platform_has_fast_fp16", True):
                log("warning: platform_has_fast_fp16 is False; FP16 will not be faster than FP32 here")
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "int8":
            fast_int8 = getattr(builder, "platform_has_fast_int8", None)
            if fast_int8 is None:
                fast_int8 = self.major >= 10  # the attribute is deprecated there; INT8-capable GPUs are the norm
            if not fast_int8:
                raise AgentError("refused", "INT8 refused: TensorRT reports platform_has_fast_int8 = False for %s (the "
                                 "Jetson TX2 has no INT8 and cannot build Q/DQ networks); deploy the fp32 bundle with "
                                 "--precision fp16 instead" % self.gpu_name)
            if not self.qdq:
                raise AgentError("refused", "INT8 refused: the bundle is not Q/DQ-quantized (no QuantizeLinear/"
                                 "DequantizeLinear nodes) and this agent does no calibration; export with "
                                 "`redistill export --int8` and deploy that bundle")
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)

    def build_engine(self):
        trt = self.trt
        t0 = time.perf_counter()
        log("building TensorRT %s engine (%s) for %s; this can take minutes on a TX2"
            % (self.trt_version, self.precision, self.gpu_name))
        builder = trt.Builder(self.logger)
        flags = 0
        if self.major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        with open(onnx_path(self.bundle_dir, self.manifest), "rb") as f:
            if not parser.parse(f.read()):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise AgentError("refused", "TensorRT %s cannot parse the ONNX model: %s; re-export with opset 13 "
                                 "(docs/deploy.md)" % (self.trt_version, errors))
        config = builder.create_builder_config()
        workspace = self.args.workspace_mb * 1024 * 1024
        if hasattr(config, "set_memory_pool_limit"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
        else:
            config.max_workspace_size = workspace
        self._builder_flags(builder, config)
        inputs = [network.get_input(i) for i in range(network.num_inputs)]
        if any(d < 0 for inp in inputs for d in tuple(inp.shape)):
            n = self.args.batch
            ref_n = max(n, int((self.manifest.get("reference") or {}).get("count") or n))
            profile = builder.create_optimization_profile()
            for inp in inputs:  # one profile covers every input: the batch axis is shared
                fixed = tuple(tuple(inp.shape)[1:])
                profile.set_shape(inp.name, (1,) + fixed, (n,) + fixed, (ref_n,) + fixed)
            config.add_optimization_profile(profile)
        timing = None
        if hasattr(config, "create_timing_cache"):
            blob = b""
            if os.path.isfile(self.timing_cache_path):
                with open(self.timing_cache_path, "rb") as f:
                    blob = f.read()
            timing = config.create_timing_cache(blob)
            config.set_timing_cache(timing, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise AgentError("refused", "TensorRT %s failed to build the engine (see its log above); try --precision fp32 "
                             "or a larger --workspace-mb" % self.trt_version)
        if timing is not None:
            atomic_write_bytes(self.timing_cache_path, bytes(config.get_timing_cache().serialize()))
        return serialized, time.perf_counter() - t0

    def load_cached_engine(self):
        if not (os.path.isfile(self.engine_path) and os.path.isfile(self.sidecar_path)):
            return None
        with open(self.sidecar_path) as f:
            meta = json.load(f)
        with open(self.engine_path, "rb") as f:
            data = f.read()
        if (meta.get("engine_sha256") != hashlib.sha256(data).hexdigest() or meta.get("bundle_id") != self.bundle_id
                or meta.get("tensorrt") != self.trt_version or meta.get("precision") != self.precision):
            log("cached engine %s does not match its sidecar; rebuilding" % self.engine_path)
            return None
        log("using cached engine %s" % self.engine_path)
        return data, meta

    def describe_io(self):
        trt, e = self.trt, self.engine
        io = []
        if self.v3:
            for i in range(e.num_io_tensors):
                name = e.get_tensor_name(i)
                io.append({"name": name, "input": e.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                           "dtype": np.dtype(trt.nptype(e.get_tensor_dtype(name))), "index": i})
        else:
            for i in range(e.num_bindings):
                io.append({"name": e.get_binding_name(i), "input": bool(e.binding_is_input(i)),
                           "dtype": np.dtype(trt.nptype(e.get_binding_dtype(i))), "index": i})
        return io

    def _prepare(self, shapes):
        """Set every input's shape (by name), allocate device buffers for them and bind them (once per shapes)."""
        key = tuple(sorted(shapes.items()))
        if self._shape == key:
            return
        ctx = self.context
        missing = [t["name"] for t in self.io if t["input"] and t["name"] not in shapes]
        if missing:
            raise AgentError("bad-bundle", "the engine takes input(s) %s that the bundle does not feed; re-export the "
                             "bundle" % ", ".join(missing))
        for t in self.io:
            if t["input"]:
                if self.v3:
                    ctx.set_input_shape(t["name"], shapes[t["name"]])
                else:
                    ctx.set_binding_shape(t["index"], shapes[t["name"]])
        for t in self.io:
            tshape = tuple(ctx.get_tensor_shape(t["name"])) if self.v3 else tuple(ctx.get_binding_shape(t["index"]))
            t["shape"] = tshape
            t["host"] = np.empty(tshape, dtype=t["dtype"])
            t["ptr"] = self.cuda.alloc(t["host"].nbytes)
            if self.v3:
                ctx.set_tensor_address(t["name"], t["ptr"])
        self.bindings = [t["ptr"] for t in sorted(self.io, key=lambda t: t["index"])]
        self._shape = key

    def _execute(self):
        if self.v3:
            self.context.execute_async_v3(self.cuda.stream_handle)
            self.cuda.sync()
        else:
            self.context.execute_v2(self.bindings)

    def infer(self, feeds):
        self._prepare(dict((name, tuple(np.shape(a))) for name, a in feeds.items()))
        for t in self.io:
            if t["input"]:  # bound by name: the engine's binding order need not be the ONNX input order
                self.cuda.htod(t["ptr"], np.ascontiguousarray(np.asarray(feeds[t["name"]]).astype(t["dtype"], copy=False)))
        self._execute()
        outs = [t for t in self.io if not t["input"]]
        for t in outs:
            self.cuda.dtoh(t["host"], t["ptr"])
        return outs[0]["host"].astype(np.float32).copy()

    def bench(self, feeds):
        self.infer(feeds)  # binds buffers and uploads the inputs once; timing covers execution only
        return self._execute

    def activation_memory(self):
        e = self.engine
        if hasattr(e, "device_memory_size_v2"):
            value, attr = e.device_memory_size_v2, "device_memory_size_v2"
        else:
            value, attr = e.device_memory_size, "device_memory_size"
        return {"bytes": int(value), "what": "device memory TensorRT reserves for the engine's activations and "
                "scratch (shared with system RAM on a Jetson)", "how": "ICudaEngine.%s (TensorRT %s)" % (attr, self.trt_version)}

    def close(self):
        for attr in ("context", "engine"):
            if hasattr(self, attr):
                delattr(self, attr)
        if hasattr(self, "cuda"):
            self.cuda.close()


# --------------------------------------------------------------------------- phases

def load_reference(bundle_dir, manifest):
    """``({input name: N x ... array}, N x ... outputs)``: one reference array per manifest input, in its dtype.

    ``reference.inputs`` is one file (schema 1: the single input) or ``{input name: file}`` (schema 2).
    """
    specs = bundle_inputs(manifest)
    ref = (manifest.get("reference") or {}).get("inputs") or "reference/inputs.npy"
    if not isinstance(ref, dict):
        ref = {specs[0]["name"]: ref}
    feeds = {}
    n = None
    for spec in specs:
        name = spec["name"]
        if name not in ref:
            raise AgentError("bad-bundle", "the bundle has no reference data for input %r; re-export the bundle" % name)
        a = np.load(listed_file(bundle_dir, manifest, ref[name]), allow_pickle=False)
        want = [d for d in spec.get("shape") or []]
        if want and (a.ndim != len(want) or any(isinstance(d, int) and d != s for d, s in zip(want[1:], a.shape[1:]))):
            raise AgentError("bad-bundle", "reference input %r has shape %s, the manifest says %s per sample; re-export "
                             "the bundle" % (name, list(a.shape), want))
        if n is not None and len(a) != n:
            raise AgentError("bad-bundle", "reference inputs hold different sample counts; re-export the bundle")
        n = len(a)
        feeds[name] = np.ascontiguousarray(a, dtype=np.dtype(spec["dtype"]))
    y = np.load(bundle_path(bundle_dir, manifest, "outputs", "reference/outputs.npy"), allow_pickle=False)
    return feeds, np.asarray(y, dtype=np.float32)


def take_samples(feeds, start, stop):
    return dict((k, np.ascontiguousarray(v[start:stop])) for k, v in feeds.items())


def batch_of(feeds, n):
    """``n`` samples of every input (reference samples repeated as needed)."""
    out = {}
    for k, x in feeds.items():
        reps = -(-n // len(x))
        out[k] = np.ascontiguousarray(np.concatenate([x] * reps, axis=0)[:n])
    return out


def sample_count(feeds):
    return len(next(iter(feeds.values())))


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
    cls = choose_backend(args.backend)
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


# glibc: buffers of 64 KiB and more get their own pages and give them back when freed, so resident memory
# follows the live activations instead of hiding them in heap memory freed while the model was loaded.
MEMORY_PHASE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def trim_heap():
    """Return freed heap memory to the OS (glibc ``malloc_trim(0)``); False where there is no such call."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


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
            delta = (peak_during_kb - rss_loaded) * 1024 if rss_loaded is not None else None
            act = {"bytes": delta,
                   "what": "extra resident memory of the process while running inference over what it held once the "
                           "model was loaded: activations, scratch and anything the first run allocates",
                   "how": "peak RSS during %d inferences (%s) minus VmRSS after InferenceSession creation and one warm-up inference%s, with ORT's "
                          "CPU memory arena and memory pattern off and glibc's mmap threshold at 64 KiB, so that each "
                          "activation buffer is mapped when allocated and unmapped when freed"
                          % (args.mem_iters, "VmHWM after resetting it via /proc/self/clear_refs" if reset
                             else "VmRSS sampled every 1 ms", " and malloc_trim(0)" if trimmed else "")}
            if backend.info.get("providers", ["CPUExecutionProvider"])[0] != "CPUExecutionProvider":
                act["how"] += "; CUDA allocations are not resident-set memory unless the GPU shares RAM"
        mem["activation"] = act
        mem["process_peak"] = {"bytes": max(hwm_end or 0, hwm_loaded or 0) * 1024,
                               "what": "highest resident memory of the agent's memory-run process, loading included",
                               "how": "VmHWM from /proc/self/status at the end of the memory run"}
        mem["process_after_load"] = {"bytes": rss_loaded * 1024 if rss_loaded else None,
                                     "startup_bytes": rss_start * 1024 if rss_start else None,
                                     "what": "resident memory once the model was loaded (interpreter, libraries, weights)",
                                     "how": "VmRSS from /proc/self/status right after loading"}
        mem["system_ram"] = ram.summary(before[0] if before else None)
        mem["iterations"] = args.mem_iters
        mem["batch"] = batch
        mem["load_seconds"] = load_s
        log("memory: activation %s bytes, process peak %s bytes" % (act["bytes"], mem["process_peak"]["bytes"]))
        return {"memory": mem}
    finally:
        backend.close()


PHASES = {"latency": phase_latency, "memory": phase_memory}


def run_phase_subprocess(phase, argv):
    """Each measurement runs in its own process, so memory figures are not polluted by the latency run."""
    fd, out = tempfile.mkstemp(prefix="redistill-phase-", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, os.path.abspath(__file__)] + argv + ["--phase", phase, "--phase-out", out]
        env = dict(os.environ)
        if phase == "memory":
            env.update(MEMORY_PHASE_ENV)
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            with open(out) as f:
                text = f.read()
            err = json.loads(text) if text.strip() else None
            if err and err.get("kind") == "crash":
                raise PhaseCrashed(err["error"])
            if err and err.get("error"):
                raise AgentError(err["kind"], err["error"])
            raise PhaseCrashed("RuntimeError: the %s phase died with exit code %d" % (phase, rc))
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def iso_now():
    return datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ")


def theoretical_peak(manifest):
    mem = manifest.get("memory") or {}
    value = mem.get("peak_bytes") if isinstance(mem, dict) else None
    return {"bytes": value, "what": "theoretical peak activation memory from the export stage (redistill.memory)",
            "how": "copied from the bundle manifest's memory.peak_bytes", "detail": mem or None}


def build_report(args, argv):
    t0 = time.perf_counter()
    bundle_dir = args.bundle
    log("verifying %s" % bundle_dir)
    manifest, bid = load_and_verify_bundle(bundle_dir)
    log("bundle %s (%s) verified: %d files match their sha256" % (manifest.get("name"), bid[:12], len(manifest["files"])))
    cls = choose_backend(args.backend)
    log("backend: %s" % cls.name)
    phase_argv = [a for a in argv]
    if args.backend == "auto":
        phase_argv += ["--backend", cls.name]
    facts = device_facts()
    lat = run_phase_subprocess("latency", phase_argv)
    mem = run_phase_subprocess("memory", phase_argv)
    mem["memory"]["theoretical_peak"] = theoretical_peak(manifest)
    report = {
        "schema": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION, "created": iso_now(),
        "agent": {"version": AGENT_VERSION, "sha256": sha256_file(os.path.abspath(__file__)), "argv": argv},
        "bundle": {"id": bid, "name": manifest.get("name"), "precision": manifest.get("precision"),
                   "target": manifest.get("target"), "model": manifest.get("model"), "input": manifest.get("input"),
                   "inputs": bundle_inputs(manifest), "task": manifest.get("task", "classify"),
                   "verified_files": len(manifest["files"]),
                   "verification": "sha256 of every file in manifest.files recomputed on the device before running"},
        "device": facts,
        "backend": lat["backend"],
        "load_seconds": lat["load_seconds"],
        "output_check": lat["output_check"],
        "latency": lat["latency"],
        "memory": mem["memory"],
        "agent_seconds": time.perf_counter() - t0,
    }
    return report


def parse_args(argv):
    p = argparse.ArgumentParser(description="ReDistill on-device bench agent")
    p.add_argument("--bundle", required=True, help="bundle folder (manifest.json, model.onnx, reference/)")
    p.add_argument("--backend", default="auto", choices=["auto"] + sorted(BACKENDS))
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "int8"],
                   help="auto = the bundle's precision")
    p.add_argument("--batch", type=int, default=1, help="batch size for latency and memory (dynamic-batch bundles)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--mem-iters", type=int, default=20)
    p.add_argument("--sample-ms", type=int, default=100, help="system RAM sampling interval")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    p.add_argument("--ort-device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workspace-mb", type=int, default=256, help="TensorRT builder workspace")
    p.add_argument("--min-top1", type=float, default=0.9, help="top-1 agreement needed to pass the output check")
    p.add_argument("--cache-dir", default=None, help="TensorRT engine cache (default: engines/ next to the bundle)")
    p.add_argument("--json-out", default=None, help="also write the report here (atomically)")
    p.add_argument("--verify-only", action="store_true", help="only check the bundle's sha256s")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "iters", "mem_iters", "sample_ms"):
        if getattr(args, name) < 1:
            p.error("--%s must be at least 1" % name.replace("_", "-"))
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        if args.phase:
            manifest, bid = load_and_verify_bundle(args.bundle) if args.phase else (None, None)
            result = PHASES[args.phase](args, args.bundle, manifest, bid)
            atomic_write_bytes(args.phase_out, json.dumps(result).encode("utf-8"))
            return 0
        if args.verify_only:
            manifest, bid = load_and_verify_bundle(args.bundle)
            log("bundle %s verified" % bid)
            return 0
        report = build_report(args, argv)
    except Exception as e:
        if not isinstance(e, AgentError):
            if args.phase and args.phase_out:
                line = traceback.format_exception_only(type(e), e)[-1].strip()
                atomic_write_bytes(args.phase_out, json.dumps({"kind": "crash", "error": line}).encode("utf-8"))
            raise
        if args.phase and args.phase_out:
            atomic_write_bytes(args.phase_out, json.dumps({"kind": e.kind, "error": str(e)}).encode("utf-8"))
        else:
            sys.stderr.write("%s %s: %s\n" % (ERROR_PREFIX, e.kind, e))
            sys.stderr.flush()
        return EXIT_REFUSED
    text = json.dumps(report, indent=2, sort_keys=False)
    if args.json_out:
        atomic_write_bytes(args.json_out, (text + "\n").encode("utf-8"))
    sys.stdout.write("%s\n%s\n%s\n" % (REPORT_BEGIN, text, REPORT_END))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PhaseCrashed as crash:
        log("a measurement process crashed; its traceback is above")
        sys.stderr.write("%s\n" % crash)
        sys.exit(1)
    except Exception:
        traceback.print_exc()
        sys.exit(1)

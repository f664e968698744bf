"""Facts about the device a report was measured on: board, L4T release, library versions, power mode, clocks."""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np

from .common import module_available


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

"""The ssh preflight: one round trip that creates the remote folder and reports what the device has, then one message
per missing piece (interpreter, its version, numpy, the backend's modules, rsync, disk) with its install command.

The remote script is POSIX sh built from constants and ``shlex.quote``-d values. The interpreter runs a probe that
is valid Python 2 and 3: it prints its version first, so a Python 2 is told it is too old rather than that numpy is
missing, and its output is prefixed ``py:`` so nothing an odd interpreter prints is read as a fact.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

#: what each backend needs on the device: one module of every group must be importable (as the agent's registry checks)
BACKEND_MODULES = {"onnxruntime": (("onnxruntime",),), "tensorrt": (("tensorrt",), ("pycuda", "cuda"))}
PROBED = ("onnxruntime", "tensorrt", "pycuda", "cuda")

PROBE = r'''
import sys
w = sys.stdout.write
w("python=%d.%d.%d\n" % tuple(sys.version_info[:3]))
sys.stdout.flush()
if tuple(sys.version_info[:2]) >= (3, 6):
    import importlib.util

    def found(name):
        try:
            return importlib.util.find_spec(name) is not None
        except Exception:
            return False
    if not found("numpy"):
        w("numpy=missing\n")
    else:
        try:
            import numpy
            w("numpy=%s\n" % numpy.__version__)
        except Exception as e:
            w("numpy.error=%s: %s\n" % (type(e).__name__, " ".join(str(e).split())[:300]))
    for name in sys.argv[1:]:
        w("module.%s=%s\n" % (name, "yes" if found(name) else "no"))
'''

JETPACK_PY = "JetPack 4.6's /usr/bin/python3 is 3.6.9"


def preflight_script(remote: str, python: str, modules: Sequence[str] = PROBED) -> str:
    """The remote sh script; exits 41 when the remote folder cannot be made, else 0 after printing ``key=value`` lines."""
    q = shlex.quote
    probe = " ".join([q(python), "-c", q(PROBE), *map(q, modules)])
    return "\n".join([
        f"mkdir -p {q(remote)} || exit 41",
        f"cd {q(remote)} || exit 41",
        'echo "rsync=$(command -v rsync 2>/dev/null)"',
        'echo "machine=$(uname -m)"',
        'echo "df=$(df -Pk . 2>/dev/null | tail -n 1)"',
        "if test -f bundle/manifest.json; then echo present=yes; fi",
        # numpy 1.19.5's OpenBLAS dies with "Illegal instruction" on Jetsons without this (the agent runs with it too)
        'if test "$(uname -m)" = aarch64; then OPENBLAS_CORETYPE=ARMV8; export OPENBLAS_CORETYPE; fi',
        f"if command -v {q(python)} >/dev/null 2>&1; then",
        f'  {{ {probe} 2>&1 </dev/null; echo "pyrc=$?"; }} | head -n 40 | sed "s/^/py: /"',
        "else echo python=missing; fi",
        "echo preflight=done",
    ])


@dataclass
class PreflightFacts:
    """What the preflight found on the device."""

    rsync: str = ""
    machine: str = ""
    df: List[str] = field(default_factory=list)
    present: bool = False
    python_missing: bool = False
    python: Optional[str] = None          # "3.6.9"
    pyrc: Optional[int] = None            # the interpreter's exit status (128 + n: killed by signal n)
    numpy: Optional[str] = None           # version, "missing", or None when the probe never got that far
    numpy_error: Optional[str] = None
    modules: Dict[str, bool] = field(default_factory=dict)
    py_output: List[str] = field(default_factory=list)  # anything else the interpreter printed
    done: bool = False


def _clean(text: str, limit: int = 160) -> str:
    text = re.sub(r"[^\x20-\x7e]+", " ", text).strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_preflight(stdout: str) -> PreflightFacts:
    f = PreflightFacts()
    for line in stdout.splitlines():
        if line.startswith("py: "):
            body = line[4:]
            key, sep, val = body.partition("=")
            if key == "python" and re.match(r"^\d+\.\d+\.\d+$", val):
                f.python = val
            elif key == "pyrc" and val.isdigit():
                f.pyrc = int(val)
            elif key == "numpy" and sep:
                f.numpy = _clean(val, 40)
            elif key == "numpy.error" and sep:
                f.numpy_error = _clean(val, 300)
            elif key.startswith("module.") and val in ("yes", "no"):
                f.modules[key[len("module."):]] = val == "yes"
            elif body.strip():
                f.py_output.append(_clean(body))
            continue
        key, _, val = line.partition("=")
        if key == "rsync":
            f.rsync = val
        elif key == "machine":
            f.machine = _clean(val, 40)
        elif key == "df":
            f.df = val.split()
        elif key == "present":
            f.present = val == "yes"
        elif key == "python" and val == "missing":
            f.python_missing = True
        elif key == "preflight" and val == "done":
            f.done = True
    return f


def _exit(rc: Optional[int]) -> str:
    if rc is None:
        return "exit status unknown"
    return f"signal {rc - 128}" if rc > 128 else f"exit {rc}"


def _pip(python: str, package: str) -> str:
    return f"`{python} -m pip install --user {package}`"


def _backend_problem(f: PreflightFacts, py: str, backend: str) -> Optional[str]:
    has = f.modules.get
    if backend == "onnxruntime" and not has("onnxruntime"):
        return (f"onnxruntime is missing for {py} on the device (--backend onnxruntime): on JetPack 4.6 pip3-install the "
                "onnxruntime-gpu wheel for JetPack 4.6 / Python 3.6 from the Jetson Zoo "
                f"(https://elinux.org/Jetson_Zoo#ONNX_Runtime) or use --backend tensorrt; on another Linux "
                f"{_pip(py, 'onnxruntime')}")
    if backend == "tensorrt" and not has("tensorrt"):
        return (f"TensorRT's Python bindings are missing for {py} on the device (--backend tensorrt): on JetPack 4.6 "
                "`sudo apt-get install python3-libnvinfer` (they exist only for the system python3, so keep "
                f"JETSON_PYTHON=python3); on another Linux with an NVIDIA GPU {_pip(py, 'tensorrt')}; or use "
                "--backend onnxruntime")
    if backend == "tensorrt" and not (has("pycuda") or has("cuda")):
        return (f"neither pycuda nor cuda-python is importable by {py} on the device, and TensorRT needs one for its "
                "buffers: on JetPack 4.6 `export PATH=/usr/local/cuda/bin:$PATH CUDA_ROOT=/usr/local/cuda && pip3 "
                f"install --user pycuda==2021.1`; on another Linux {_pip(py, 'cuda-python')}; or use --backend onnxruntime")
    if backend == "auto" and not any(all(any(has(m) for m in group) for group in groups)
                                     for groups in BACKEND_MODULES.values()):
        return (f"no inference backend for {py} on the device: neither onnxruntime nor TensorRT with pycuda or "
                "cuda-python imports: on JetPack 4.6 `sudo apt-get install python3-libnvinfer` and `pip3 install "
                f"--user pycuda==2021.1` (docs/deploy.md, Setting up a Jetson TX2); on another Linux {_pip(py, 'onnxruntime')}")
    return None


def preflight_problem(f: PreflightFacts, python: str, backend: str, copy: str, remote: str,
                      need_bytes: int) -> Optional[str]:
    """The first missing piece as one line naming the fix, or None when the device can run the agent."""
    py = python
    if f.python_missing:
        return (f"no Python interpreter {py!r} on the device: JetPack 4.6 has python3 preinstalled, so set "
                f"JETSON_PYTHON=python3 (or --python /usr/bin/python3); on another Linux `sudo apt-get install python3 "
                "python3-numpy` or point JETSON_PYTHON at a Python 3.6+ there")
    if f.python is None:
        # 126/127: the shell (or a shim) could not run it, and says why first; else the last line (an exception)
        said = (f"output: {f.py_output[0 if f.pyrc in (126, 127) else -1]}" if f.py_output else "no output")
        return (f"{py!r} on the device is not a working Python interpreter ({_exit(f.pyrc)}, {said}): set "
                f"JETSON_PYTHON to a Python 3.6+ there, e.g. JETSON_PYTHON=python3 ({JETPACK_PY})")
    version = tuple(int(v) for v in f.python.split(".")[:2])
    if version < (3, 6):
        return (f"{py!r} on the device is Python {f.python}; the agent needs Python 3.6 or newer: set "
                f"JETSON_PYTHON=python3 ({JETPACK_PY}; elsewhere `sudo apt-get install python3`)")
    if f.numpy == "missing":
        return (f"numpy is missing for {py} (Python {f.python}) on the device: on JetPack 4.6 `sudo apt-get install "
                "python3-numpy` (or `pip3 install numpy==1.19.4`); on another Linux `sudo apt-get install python3-numpy` "
                f"or {_pip(py, 'numpy')}")
    if f.numpy_error:
        return (f"numpy is installed for {py} on the device but does not import ({f.numpy_error}): reinstall it, on "
                f"JetPack 4.6 `pip3 install numpy==1.19.4`, on another Linux {_pip(py, '--force-reinstall numpy')}")
    if f.numpy is None:
        return (f"{py} died ({_exit(f.pyrc)}) while importing numpy on the device: on JetPack 4.6 `pip3 install "
                "numpy==1.19.4` (1.19.5's OpenBLAS dies with Illegal instruction there); on another Linux reinstall "
                f"numpy: {_pip(py, '--force-reinstall numpy')}")
    problem = _backend_problem(f, py, backend)
    if problem:
        return problem
    if copy == "rsync" and not f.rsync:
        return "rsync is not installed on the device: `sudo apt-get install rsync` there, or pass --copy scp"
    df = f.df
    if not f.present and len(df) >= 4 and df[3].isdigit():
        need = need_bytes + (64 << 20)
        if int(df[3]) * 1024 < need:
            return (f"the device disk is full ({int(df[3]) // 1024} MiB free at {remote}, {need >> 20} MiB needed): "
                    "free space there (`df -h`) or pass --remote-dir on a larger disk")
    return None

"""The remote interpreter preflight: each missing piece gets its own one-line message with the install command,
over a real OpenSSH server on 127.0.0.1 (stand-in interpreters where this machine has no such Python)."""

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.preflight import parse_preflight, preflight_problem, preflight_script
from tests.deploy.test_deploy_loopback import assert_one_line_error, reports_in, run_deploy

SYSTEM_PYTHON = "/usr/bin/python3"


def fake_python(tmp, name, real=sys.executable, version=None, hide=()):
    """An interpreter stand-in: ``real`` running the ``-c`` code with ``sys.version_info`` set and ``hide`` modules
    made unimportable, so one machine can play a Python 2 or a Python without onnxruntime."""
    prelude = "import sys\n"
    if version:
        prelude += "sys.version_info = %r\n" % (tuple(version) + ("final", 0),)
    for mod in hide:
        prelude += "sys.modules[%r] = None\n" % mod
    prelude += "exec(sys.argv.pop(1))\n"
    path = Path(tmp) / "bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\n[ "$1" = -c ] || exit 2\nshift\nexec %s -c %s "$@"\n'
                    % (real, "'" + prelude.replace("'", "'\\''") + "'"))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def assert_nothing_copied(p, tmp):
    assert "copy (" not in p.stderr, p.stderr
    assert reports_in(tmp) == []


def test_stock_python3_without_numpy_is_told_numpy_is_missing(fleet, bundles, tmp_path):
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"no {SYSTEM_PYTHON} here")
    if subprocess.run([SYSTEM_PYTHON, "-c", "import numpy"], stderr=subprocess.DEVNULL).returncode == 0:
        pytest.skip(f"{SYSTEM_PYTHON} has numpy here")
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, python=SYSTEM_PYTHON)
    last = assert_one_line_error(p, "numpy is missing for /usr/bin/python3", "JetPack 4.6",
                                 "sudo apt-get install python3-numpy", "pip install --user numpy")
    assert "login shell" not in last
    assert_nothing_copied(p, tmp_path)


def real_python2():
    """A Python 2.7 interpreter that runs (pyenv's, where installed), else None."""
    for cand in sorted(Path.home().glob(".pyenv/versions/2.7*/bin/python2")) + [Path("/usr/bin/python2")]:
        if cand.exists() and subprocess.run([str(cand), "-c", "pass"]).returncode == 0:
            return str(cand)
    return None


def test_python2_gets_a_clear_version_message(fleet, bundles, tmp_path):
    py2 = real_python2() or fake_python(tmp_path, "python2", version=(2, 7, 18), hide=("numpy",))
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, python=py2)
    assert_one_line_error(p, "is Python 2.7.18", "needs Python 3.6 or newer", "JETSON_PYTHON=python3")
    assert_nothing_copied(p, tmp_path)


def test_bin_false_is_not_a_python(fleet, bundles, tmp_path):
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, python="/bin/false")
    last = assert_one_line_error(p, "'/bin/false' on the device is not a working Python interpreter",
                                 "exit 1, no output", "JETSON_PYTHON")
    assert "df=" not in last and "login shell" not in last
    assert_nothing_copied(p, tmp_path)


def test_missing_backend_is_found_before_the_copy(fleet, bundles, tmp_path):
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, "--backend", "tensorrt")
    assert_one_line_error(p, "TensorRT's Python bindings are missing", "python3-libnvinfer", "--backend onnxruntime")
    assert_nothing_copied(p, tmp_path)
    no_ort = fake_python(tmp_path, "python3", hide=("onnxruntime", "tensorrt"))
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, "--backend", "onnxruntime", python=no_ort)
    assert_one_line_error(p, "onnxruntime is missing", "Jetson Zoo", "pip install --user onnxruntime")
    p = run_deploy(bundles["fp32"], "loop0", fleet.config, tmp_path, "--backend", "auto", python=no_ort)
    assert_one_line_error(p, "no inference backend", "onnxruntime", "pycuda")
    assert_nothing_copied(p, tmp_path)


# --- the same checks on preflight output, for what this machine cannot stage --------------------------------------

#: what the preflight script prints on a ready TX2 (the interpreter's lines prefixed, its exit status last)
OK = ("rsync=/usr/bin/rsync\nmachine=aarch64\ndf=/dev/mmcblk0p1 28768292 20000000 7000000 75% /\n"
      "py: python=3.6.9\npy: numpy=1.19.4\npy: module.onnxruntime=yes\npy: module.tensorrt=yes\n"
      "py: module.pycuda=yes\npy: module.cuda=no\npy: pyrc=0\npreflight=done\n")


def problem(stdout, backend="auto", copy="auto", need=1 << 20, python="python3"):
    return preflight_problem(parse_preflight(stdout), python, backend, copy, "base/abc", need)


def test_a_complete_device_passes():
    assert problem(OK) is None
    facts = parse_preflight(OK)
    assert facts.python == "3.6.9" and facts.numpy == "1.19.4" and facts.machine == "aarch64" and facts.pyrc == 0


def test_every_backend_of_the_agent_has_its_preflight_modules():
    from deploy.agent.backends import backend_choices
    from deploy.preflight import BACKEND_MODULES, PROBED

    assert set(BACKEND_MODULES) == set(backend_choices()) - {"auto"}
    assert {m for groups in BACKEND_MODULES.values() for g in groups for m in g} == set(PROBED)


@pytest.mark.parametrize("edit,kw,needles", [
    (("py: python=3.6.9", "py: python=3.5.2"), {}, ["is Python 3.5.2", "3.6 or newer"]),
    (("py: numpy=1.19.4", "py: numpy.error=ImportError: libopenblas.so.0: cannot open shared object file"), {},
     ["numpy is installed for python3 on the device but does not import", "libopenblas", "numpy==1.19.4"]),
    (("py: module.pycuda=yes", "py: module.pycuda=no"), {"backend": "tensorrt"},
     ["neither pycuda nor cuda-python", "pycuda==2021.1", "cuda-python"]),
    (("df=/dev/mmcblk0p1 28768292 20000000 7000000", "df=/dev/mmcblk0p1 28768292 28700000 1024"), {"need": 64 << 20},
     ["disk is full", "1 MiB free", "--remote-dir"]),
    (("rsync=/usr/bin/rsync", "rsync="), {"copy": "rsync"}, ["rsync is not installed on the device", "--copy scp"]),
])
def test_each_missing_piece_has_its_own_message(edit, kw, needles):
    msg = problem(OK.replace(*edit), **kw)
    assert msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    assert problem(OK, **kw) is None


def test_interpreter_killed_while_importing_numpy():
    text = OK.split("py: ")[0] + "py: python=3.6.9\npy: pyrc=132\npreflight=done\n"  # SIGILL: nothing after the version
    msg = problem(text)
    assert "python3 died (signal 4) while importing numpy" in msg and "numpy==1.19.4" in msg and "\n" not in msg


def test_preflight_script_quotes_user_input():
    """The interpreter and remote dir reach sh only through shlex.quote (validated before, quoted anyway)."""
    script = preflight_script("base/my dir", "/opt/py 3/bin/python3")
    assert "mkdir -p 'base/my dir'" in script and "command -v '/opt/py 3/bin/python3'" in script
    out = subprocess.run(["sh", "-n", "-c", script], stderr=subprocess.PIPE, text=True)
    assert out.returncode == 0, out.stderr

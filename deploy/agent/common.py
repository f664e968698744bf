"""What every agent module shares: the refusal error, progress logging, file hashes and atomic writes."""

import hashlib
import os
import sys
import tempfile


class AgentError(Exception):
    """A refusal or bad input: printed as one line that names the fix, exit code EXIT_REFUSED."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind


class PhaseCrashed(Exception):
    """A measurement subprocess died; its traceback is already on stderr, ``str(self)`` is its exception line."""


def log(msg):
    sys.stderr.write("agent: %s\n" % msg)
    sys.stderr.flush()


def module_available(name):
    """True when ``name`` imports here, without importing it (a ``None`` entry in sys.modules means blocked)."""
    if sys.modules.get(name) is not None:
        return True
    try:
        import importlib.util
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


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

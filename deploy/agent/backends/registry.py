"""The backend registry and the interface every backend implements.

Adding a backend = one class decorated with ``@register_backend("name")`` in a module imported by
``backends/__init__.py``; the agent's and the server's ``--backend`` choices come from this registry.
"""

import sys

from ..common import AgentError

BACKENDS = {}


def register_backend(name):
    """Class decorator: register a Backend subclass under ``name``."""
    def deco(cls):
        if name in BACKENDS:
            raise ValueError("backend %r registered twice" % name)
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return deco


def backend_choices():
    """``auto`` and every registered backend, in the order ``auto`` tries them."""
    return ("auto",) + tuple(n for n, _ in sorted(BACKENDS.items(), key=lambda kv: (kv[1].auto_rank, kv[0])))


def get_backend(name):
    if name not in BACKENDS:
        raise AgentError("bad-argument", "unknown backend %r; valid: %s" % (name, ", ".join(sorted(BACKENDS))))
    return BACKENDS[name]


def choose_backend(requested, manifest=None):
    """``auto``: the backend the bundle's target names (manifest ``backend``) when it is importable here, else the
    first importable one in ``auto_rank`` order (TensorRT with its bindings and a CUDA buffer library first)."""
    if requested != "auto":
        return get_backend(requested)
    preferred = (manifest or {}).get("backend")
    names = ([preferred] if preferred in BACKENDS else []) + list(backend_choices()[1:])
    for name in names:
        if BACKENDS[name].available():
            return BACKENDS[name]
    raise AgentError("no-backend", "neither TensorRT (with pycuda or cuda-python) nor onnxruntime is importable "
                     "by %s; on a Jetson: pip3 install pycuda (see docs/deploy.md), elsewhere: pip install onnxruntime"
                     % sys.executable)


class Backend(object):
    """One loaded model. ``infer(feeds)`` takes ``{input name: array}`` (every input of the bundle) and returns the
    first output as numpy; ``bench(feeds)`` returns a no-argument callable to time."""

    name = None
    #: ``--backend auto`` tries backends in increasing rank
    auto_rank = 100

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

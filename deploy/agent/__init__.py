"""The on-device bench agent: verify a bundle, run it, measure latency and memory, print a JSON report.

This folder is copied to the device as a whole and run from there as ``python3 FOLDER --bundle DIR``
(``__main__.py``). It imports nothing from the project, only the standard library and numpy at import
time (backends are imported when chosen), so it runs on JetPack 4.6's Python 3.6 through 3.12
(checked with ``vermin --target=3.6-``). Its modules import each other relatively, so the same files
work as ``deploy.agent`` in the project (the server imports ``contract`` and ``fingerprint``) and as a
standalone package on the device.

Modules: ``contract`` (schemas, markers, exit codes, measurement options), ``fingerprint`` (the
folder's sha256), ``bundle`` (manifest and sha256 checks, reference inputs), ``probes`` (memory),
``device`` (device facts), ``backends/`` (registry, ONNX Runtime, TensorRT with its CUDA buffers),
``phases`` (latency and memory), ``lock`` (one measurement at a time per device), ``report`` (phase
subprocesses, the report), ``cli``.
"""

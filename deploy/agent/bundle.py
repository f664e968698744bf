"""Bundle checks on the device: the manifest, every listed file's sha256, the inputs and the reference data.

The agent opens only files the manifest lists with a sha256, and checks all of them before anything runs.
"""

import hashlib
import json
import os

import numpy as np

from .common import AgentError, sha256_file
from .contract import BUNDLE_SCHEMA, BUNDLE_SCHEMA_VERSION


def load_and_verify_bundle(bundle_dir):
    """Read the manifest and check every listed file's sha256; returns ``(manifest, bundle id)``."""
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

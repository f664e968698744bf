"""Deployment bundles: a folder with ``model.onnx``, reference inputs/outputs and ``manifest.json``.

Layout (schema ``redistill-bundle``)::

    BUNDLE/
      manifest.json              what the model is, how to feed it, sha256 of every other file
      model.onnx
      reference/inputs.npy       classifier: float32 N x C x H x W, already normalised
      reference/inputs/NAME.npy  several inputs (a denoiser's x, t[, y]): one file per input, N samples each
      reference/outputs.npy      float32 N x num_classes logits (or N x C x H x W eps), what PyTorch computed

Every manifest lists ``inputs`` (name, shape, dtype of each graph input) and ``task``. Version 1 is a
bundle with one image input, which it also describes in the single ``input`` key every agent reads
(classifiers). Version 2 is a bundle with several inputs (``reference.inputs`` maps input name to file,
no ``input`` key): an agent that reads only version 1 refuses it instead of feeding it wrongly.

The bundle id is the sha256 of ``manifest.json``; since the manifest holds every
file's sha256, it identifies the whole bundle. The on-device agent
(``deploy/agent``) re-verifies every hash with the standard library only. The schema name and
version are the server-agent contract's (``deploy/agent/contract.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

from deploy.agent.contract import BUNDLE_SCHEMA, BUNDLE_SCHEMA_VERSION
from redistill.errors import UserError
from redistill.io import atomic_dir, atomic_write, sha256_file
MANIFEST = "manifest.json"

Content = Union[bytes, str, os.PathLike]


def manifest_version(manifest: Mapping[str, Any]) -> int:
    """1 for a bundle with the single ``input`` key (what every agent reads), 2 for one with several inputs."""
    return 1 if "input" in manifest and len(manifest.get("inputs") or [None]) == 1 else 2


def write_bundle(out_dir: Union[str, os.PathLike], files: Mapping[str, Content], manifest: Dict[str, Any],
                 tarball: bool = False) -> Path:
    """Write ``files`` (relative path -> bytes or a source file) and the manifest, atomically.

    ``manifest`` gets ``schema``, ``schema_version`` (``manifest_version``) and ``files`` (sha256 and size of each file)
    filled in. Nothing appears at ``out_dir`` unless every file was written. With ``tarball``,
    ``out_dir.tar.gz`` is written next to it (also atomically).
    """
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        entries = {}
        for rel, content in sorted(files.items()):
            if rel == MANIFEST or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError(f"bad bundle file name {rel!r}")
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                dst.write_bytes(content)
            else:
                shutil.copyfile(content, dst)
            entries[rel] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        full = {"schema": BUNDLE_SCHEMA, "schema_version": manifest_version(manifest), **manifest, "files": entries}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    if tarball:
        def write_tar(f):
            with tarfile.open(fileobj=f, mode="w:gz") as tar:
                tar.add(out, arcname=out.name)

        atomic_write(out.with_name(out.name + ".tar.gz"), write_tar)
    return out


def read_manifest(bundle: Union[str, os.PathLike]) -> Dict[str, Any]:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise UserError(f"{bundle} is not a bundle (no {MANIFEST}): give a folder written by `redistill export`")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-export the bundle") from None
    if m.get("schema") != BUNDLE_SCHEMA:
        raise UserError(f"{path} is not a {BUNDLE_SCHEMA} manifest; re-export the bundle")
    if m.get("schema_version", 0) > BUNDLE_SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {m['schema_version']}, newer than this redistill ({BUNDLE_SCHEMA_VERSION}); upgrade")
    return m


def verify_bundle(bundle: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Check every file listed in the manifest against its sha256; returns the manifest."""
    m = read_manifest(bundle)
    for rel, entry in m["files"].items():
        p = Path(bundle) / rel
        if not p.is_file():
            raise UserError(f"bundle file {rel} is missing from {bundle}; re-export the bundle")
        if sha256_file(p) != entry["sha256"]:
            raise UserError(f"bundle file {rel} does not match its sha256 in the manifest (altered or corrupt); re-export the bundle")
    return m


def bundle_id(bundle: Union[str, os.PathLike]) -> str:
    """The sha256 of ``manifest.json``: one hash for the whole bundle."""
    return hashlib.sha256((Path(bundle) / MANIFEST).read_bytes()).hexdigest()

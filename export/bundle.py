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

Export also records the id beside the folder, in ``BUNDLE.id.json`` (and in the tarball): the manifest
inside the folder can then not be edited after export (a looser tolerance, another theoretical peak)
without deploy noticing that its id no longer matches the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from deploy.agent.contract import BUNDLE_SCHEMA, BUNDLE_SCHEMA_VERSION
from redistill.errors import UserError
from redistill.io import atomic_dir, atomic_write, atomic_write_json, check_replaceable, sha256_file

MANIFEST = "manifest.json"
#: the export record beside a bundle folder: ``{"schema": EXPORT_RECORD, "bundle": NAME, "bundle_id": ID}``
EXPORT_RECORD = "redistill-bundle-export-record"

Content = Union[bytes, str, os.PathLike]


def is_bundle_dir(path: Union[str, os.PathLike]) -> bool:
    """A folder whose manifest.json names the bundle schema: what export wrote, so it may be replaced."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(m, dict) and m.get("schema") == BUNDLE_SCHEMA


def check_out(out: Union[str, os.PathLike]) -> None:
    """Refuse an ``--out`` that is neither new, empty, nor a bundle (one line naming it), before any work."""
    check_replaceable(out, is_bundle_dir, "a bundle")


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
    with atomic_dir(out, is_bundle_dir, "a bundle") as tmp:
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
    record = write_export_record(out)
    if tarball:
        def write_tar(f):
            with tarfile.open(fileobj=f, mode="w:gz") as tar:
                tar.add(out, arcname=out.name)
                tar.add(record, arcname=record.name)

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


def listed_file(bundle: Union[str, os.PathLike], rel: Any) -> Path:
    """The file ``rel`` of the manifest's list: a regular file inside the bundle folder, reached through no symlink.

    Checked before the file is read, so a manifest naming ``../../etc/passwd`` or a link to it never gets a file
    outside the bundle hashed or sent.
    """
    parts = rel.split("/") if isinstance(rel, str) else []
    if not parts or rel == MANIFEST or any(p in ("", ".", "..") or "\\" in p for p in parts):
        raise UserError(f"{Path(bundle) / MANIFEST} lists {rel!r}, a path outside the bundle folder; re-export the bundle")
    path = Path(bundle)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UserError(f"bundle file {rel} of {bundle} is a symlink (or lies under one): a bundle holds its own "
                            "files only; re-export the bundle")
    if not path.is_file():
        raise UserError(f"bundle file {rel} is missing from {bundle}; re-export the bundle")
    return path


def verify_bundle(bundle: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Check every file listed in the manifest (inside the bundle, no symlink) against its sha256; returns the manifest."""
    if (Path(bundle) / MANIFEST).is_symlink():
        raise UserError(f"{Path(bundle) / MANIFEST} is a symlink: a bundle holds its own files only; re-export the bundle")
    m = read_manifest(bundle)
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{Path(bundle) / MANIFEST} lists no files; re-export the bundle")
    for rel, entry in files.items():
        p = listed_file(bundle, rel)
        if not isinstance(entry, dict) or sha256_file(p) != entry.get("sha256"):
            raise UserError(f"bundle file {rel} does not match its sha256 in the manifest (altered or corrupt); re-export the bundle")
    return m


def bundle_id(bundle: Union[str, os.PathLike]) -> str:
    """The sha256 of ``manifest.json``: one hash for the whole bundle."""
    return hashlib.sha256((Path(bundle) / MANIFEST).read_bytes()).hexdigest()


def export_record_path(bundle: Union[str, os.PathLike]) -> Path:
    """``BUNDLE.id.json`` beside the bundle folder (outside it, so it is neither listed nor sent)."""
    b = Path(bundle)
    return b.with_name(b.name + ".id.json")


def write_export_record(bundle: Union[str, os.PathLike]) -> Path:
    """Record the bundle's id as export wrote it, atomically."""
    b = Path(bundle)
    return atomic_write_json(export_record_path(b), {"schema": EXPORT_RECORD, "bundle": b.name,
                                                     "bundle_id": bundle_id(b)})


def read_export_record(bundle: Union[str, os.PathLike]) -> Optional[str]:
    """The bundle id export recorded, or None for a bundle without a record (exported before records existed)."""
    path = export_record_path(bundle)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):
        rec = None
    if not isinstance(rec, dict) or rec.get("schema") != EXPORT_RECORD or not isinstance(rec.get("bundle_id"), str):
        raise UserError(f"{path} is not an export record of {bundle}; re-export the bundle")
    return rec["bundle_id"]


def check_export_record(bundle: Union[str, os.PathLike]) -> Optional[str]:
    """Refuse a bundle whose manifest changed after export; returns the recorded id (None: no record to check)."""
    recorded = read_export_record(bundle)
    current = bundle_id(bundle)
    if recorded is not None and recorded != current:
        raise UserError(f"{Path(bundle) / MANIFEST} was changed after export (its sha256 is {current[:12]}, "
                        f"{export_record_path(bundle).name} recorded {recorded[:12]}): re-export the bundle")
    return recorded

"""Atomic file writes and hashing: a crash never leaves a half-written checkpoint, bundle or report."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from redistill.errors import UserError

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Call ``write(fileobj)`` on a temp file in the target folder, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_copy(src: PathLike, dst: PathLike) -> Path:
    """Copy ``src`` to ``dst`` so that ``dst`` is never seen half-written."""
    import shutil

    with open(src, "rb") as f:
        return atomic_write(dst, lambda out: shutil.copyfileobj(f, out))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_replaceable(path: PathLike, replaceable: Optional[Callable[[Path], bool]] = None, what: str = "") -> None:
    """Refuse, naming ``path``, to replace anything but an absent path, an empty folder or one ``replaceable``
    accepts (``what`` names those in the message: "a bundle")."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()) or _is_empty_dir(path):
        return
    if path.is_symlink():
        kind = "a symbolic link"
    elif not path.is_dir():
        kind = "a file"
    elif replaceable is not None and replaceable(path):
        return
    else:
        kind = f"a folder that is not {what}" if what else "a folder that is not empty"
    raise UserError(f"{path} is {kind}; refusing to replace it: give a new or empty folder"
                    + (f", or {what} to overwrite" if what else ""))


def check_writable(path: PathLike) -> None:
    """Refuse, naming the folder, when ``path`` could not be created: probe its nearest existing parent with a temp folder."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is not a folder; choose another location")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".redistill-probe.", dir=parent))
    except OSError as e:
        raise UserError(f"cannot write {path}: {parent} is not writable ({e.strerror}); choose another location") from None


@contextlib.contextmanager
def atomic_dir(path: PathLike, replaceable: Optional[Callable[[Path], bool]] = None, what: str = "") -> Iterator[Path]:
    """Build a directory under a temp name and rename it into place only if the block succeeds.

    An existing ``path`` is replaced only when it is an empty folder or ``replaceable(path)`` (export passes
    "is a bundle"); anything else is refused before the block runs, so a wrong ``--out`` never deletes a user's files.
    """
    path = Path(path)
    check_replaceable(path, replaceable, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        check_replaceable(path, replaceable, what)  # again: the folder may have changed while the block ran
        if path.exists():
            # a fresh empty folder to rename the old one onto: never a name the user may already use
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            try:
                os.replace(path, old)
            except BaseException:
                old.rmdir()
                raise
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save_figure(fig, path: PathLike) -> Path:
    """Lay out a matplotlib figure, render it as PNG, close it, and write the PNG atomically."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()

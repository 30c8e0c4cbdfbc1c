"""Atomic file writes, shared by qcrun and qcexport.

A file is written under a temporary name beside its destination, flushed to disk, given the
usual permissions (0644 less the umask; ``mkstemp`` would leave 0600) and renamed over the
destination, so a reader never sees half a file and a crash or Ctrl-C leaves the old one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def stage(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling of ``path``; the caller renames it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:  # KeyboardInterrupt included: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = stage(path, data.encode() if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

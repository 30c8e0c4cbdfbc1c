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


MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


def read_model_dir(model_dir: str | os.PathLike, *, stage: str | None = None,
                   required: tuple[str, ...] = ()) -> dict:
    """The manifest of an exported model directory (``model.onnx`` + ``manifest.json``),
    or a UserError saying what is missing or unreadable. ``required``: keys it must have."""
    import json

    from qcrun.errors import UserError

    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{model_dir} is not an exported model directory (it needs "
                        f"{MODEL_FILE} and {MANIFEST_FILE})", stage=stage,
                        hint="pass the output directory of `qcexport convert`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model manifest {path} is not valid JSON: {e}", stage=stage) from None
    model = model_dir / manifest.get("model", MODEL_FILE)
    if not model.is_file():
        raise UserError(f"{model} does not exist", stage=stage,
                        hint="re-export the model with `qcexport convert`")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise UserError(f"model manifest {path} lacks {', '.join(missing)}", stage=stage,
                        hint="re-export the model with `qcexport convert`")
    return manifest

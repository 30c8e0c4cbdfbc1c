"""Atomic writes: a crash or Ctrl-C never leaves a half-written model or manifest.

Everything is written under a temporary name in the destination directory, flushed, and then
renamed over the final name (``os.replace`` is atomic on one file system). An existing model
is only replaced by one that was written completely. Models over the 2 GB protobuf limit keep
their weights in an external data file whose name carries a content hash, so the new data file
never overwrites the one the old model still points to; the old one is removed afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import onnx
from qcrun.errors import UserError
from qcrun.files import _umask

# Protobuf cannot serialise a message of 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove it is a writable directory, before any work."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(
            f"output directory {str(out)!r} is a file",
            stage="save",
            hint="pass a directory with -o (it is created if missing)",
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".qcexport-probe-"):
            pass
    except OSError as exc:
        raise UserError(
            f"cannot write to output directory {str(out)!r}: {exc.strerror or exc}",
            stage="save",
            hint="choose a writable directory with -o",
        ) from exc
    return out


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _stage(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _stage(path: Path, data: bytes) -> Path:
    """As ``qcrun.files.stage``, but through ``_fsync_write``, which tests replace to simulate
    a full disk or Ctrl-C half-way through a write."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _fsync_write(Path(tmp), data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are for sharing
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def save_model_and_manifest(
    model: onnx.ModelProto, model_path: Path, manifest_path: Path, manifest: dict[str, Any]
) -> list[Path]:
    """Write a model and its manifest as a pair: both are staged completely before either is
    renamed into place, so a failure while writing leaves the previous pair untouched.

    ``manifest`` gains ``model_sha256`` and ``files``. Models with external data are written
    file by file (their data file names carry a hash, so the old model stays readable).
    """
    if _initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        files = _save_with_external_data(model, model_path)
        manifest["model_sha256"] = _file_sha256(model_path)
        manifest["files"] = [f.name for f in files]
        write_json_atomic(manifest_path, manifest)
        return files
    data = model.SerializeToString()
    manifest["model_sha256"] = hashlib.sha256(data).hexdigest()
    manifest["files"] = [model_path.name]
    staged: list[Path] = []
    try:
        staged.append(_stage(model_path, data))
        text = (json.dumps(manifest, indent=2) + "\n").encode()
        staged.append(_stage(manifest_path, text))
        os.replace(staged[0], model_path)
        os.replace(staged[1], manifest_path)
    finally:
        for tmp in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
    _remove_stale_data(model_path, keep=None)
    return [model_path]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written (model first)."""
    path = Path(path)
    if _initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        write_bytes_atomic(path, model.SerializeToString())
        _remove_stale_data(path, keep=None)
        return [path]
    return _save_with_external_data(model, path)


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> list[Path]:
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.ModelProto.FromString(model.SerializeToString())
    digest = hashlib.sha256()
    for t in model.graph.initializer:
        digest.update(t.raw_data)
    data_name = f"{path.name}.{digest.hexdigest()[:12]}.data"
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data_name,
                                   size_threshold=1024)
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        onnx.save_model(model, tmpdir / path.name)  # writes tmpdir/<data_name> beside it
        os.replace(tmpdir / data_name, path.parent / data_name)
        os.replace(tmpdir / path.name, path)
    except BaseException:
        for f in tmpdir.iterdir():
            with contextlib.suppress(OSError):
                f.unlink()
        raise
    finally:
        with contextlib.suppress(OSError):
            tmpdir.rmdir()
    _remove_stale_data(path, keep=data_name)
    return [path, path.parent / data_name]


def _remove_stale_data(path: Path, keep: str | None) -> None:
    for old in path.parent.glob(f"{path.name}.*.data"):
        if old.name != keep:
            with contextlib.suppress(OSError):
                old.unlink()

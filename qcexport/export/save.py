"""Atomic writes: a crash or Ctrl-C never leaves a half-written model or manifest.

A file is written under a temporary name in the destination directory, flushed, and then
renamed over the final name (``os.replace`` is atomic on one file system). A model and its
manifest are one unit (``replace_pair``): the new pair is written into a hidden directory
beside the old one and swapped in, so a failure leaves the old pair or the new one, never a
mix. Models over the 2 GB protobuf limit keep their weights in an external data file whose
name carries a content hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import onnx
from qcrun.errors import UserError
from qcrun.files import _umask, manifest_json

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


def write_file(path: Path, data: bytes) -> None:
    """Write a new file (into a staging directory) and flush it to disk."""
    _fsync_write(path, data)


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
    """Write a model and its manifest as ONE unit (see ``replace_pair``): a failure at any
    point leaves either the complete previous pair or the complete new one.

    ``manifest`` gains ``model_sha256`` and ``files``. Models over the protobuf limit keep
    their weights in an external data file whose name carries a content hash.
    """
    model_path, manifest_path = Path(model_path), Path(manifest_path)
    if manifest_path.parent != model_path.parent:
        raise ValueError("the model and its manifest live in one directory")

    def write(new: Path) -> list[str]:
        if _initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
            files = [f.name for f in _write_with_external_data(model, new / model_path.name)]
            manifest["model_sha256"] = _file_sha256(new / model_path.name)
        else:
            data = model.SerializeToString()
            _fsync_write(new / model_path.name, data)
            files = [model_path.name]
            manifest["model_sha256"] = hashlib.sha256(data).hexdigest()
        manifest["files"] = files
        # every file the model reads is hashed, so a swapped data file cannot pass
        manifest["files_sha256"] = {f: _file_sha256(new / f) for f in files[1:]}
        # through qcrun's schema: nothing is written that its reader would refuse, and the
        # caller's manifest becomes what was written
        text = manifest_json(manifest)
        manifest.clear()
        manifest.update(json.loads(text))
        _fsync_write(new / manifest_path.name, text.encode())
        return [*files, manifest_path.name]

    names = replace_pair(model_path.parent, write, manifest=manifest_path.name,
                         model=model_path.name)
    return [model_path.parent / n for n in names if n != manifest_path.name]


class PairNotReplaced(UserError):
    """Writing a model directory failed; the message says what the directory holds now."""


def replace_pair(out_dir: Path, write, *, manifest: str = "manifest.json",
                 model: str = "model.onnx") -> list[str]:
    """Replace the model + manifest pair in ``out_dir`` as one unit; returns the names written.

    ``write(new_dir)`` writes every file of the new pair into a fresh hidden directory inside
    ``out_dir`` (same file system, so renames are atomic) and returns their names. Then the
    previous pair (the manifest, the model, its external data files, and any file the new pair
    will take the name of) is moved aside into a second hidden directory, manifest first, and
    the new files are moved in, manifest last: at every moment a reader sees either a complete
    pair or no manifest at all. The previous pair is deleted only after every new file is in
    place; on any failure (a full disk, a failed rename, Ctrl-C) the moves are undone. Nothing
    else in ``out_dir`` is touched: it may hold the user's own files.

    Raises ``PairNotReplaced`` (a UserError, chained to the cause) saying truthfully what the
    directory holds; a KeyboardInterrupt is re-raised after the rollback.
    """
    out_dir = Path(out_dir)
    had_pair = (out_dir / manifest).exists() or (out_dir / model).exists()
    new = Path(tempfile.mkdtemp(dir=out_dir, prefix=".qcexport-new-"))
    old: Path | None = None
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        names = list(write(new))
        names.sort(key=lambda n: n == manifest)  # the manifest goes in last
        old = Path(tempfile.mkdtemp(dir=out_dir, prefix=".qcexport-old-"))
        previous = [manifest, model, *(p.name for p in _data_files(out_dir, model)), *names]
        for name in dict.fromkeys(previous):
            if (out_dir / name).exists() or (out_dir / name).is_symlink():
                _move(out_dir / name, old / name)
                moved_old.append(name)
        for name in names:
            _move(new / name, out_dir / name)
            moved_new.append(name)
    except BaseException as exc:
        restored = _roll_back(out_dir, new, old, moved_new, moved_old)
        if isinstance(exc, (KeyboardInterrupt, UserError)) and restored:
            raise  # Ctrl-C, or a refusal that already says what is wrong (nothing moved)
        state = (
            f"{out_dir} still holds the previous model and manifest, unchanged"
            if restored and had_pair else
            f"nothing was written to {out_dir}" if restored else
            f"{out_dir} is incomplete: the previous files are in {old} and the new ones in "
            f"{new}; move the ones you want back into {out_dir} by hand"
        )
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or \
            type(exc).__name__
        raise PairNotReplaced(
            f"could not write the model and manifest to {out_dir}: {why}; {state}",
            stage="save",
            hint="free disk space or choose another -o, then run it again",
        ) from exc
    _remove_tree(old)
    _remove_tree(new)
    return names


def _move(src: Path, dst: Path) -> None:
    """One rename; tests replace it to make a rename fail part-way through a swap."""
    os.replace(src, dst)


def _roll_back(out_dir: Path, new: Path, old: Path | None, moved_new, moved_old) -> bool:
    """Undo a partial swap; True when the directory is as it was before."""
    try:
        for name in reversed(moved_new):
            os.replace(out_dir / name, new / name)
        for name in reversed(moved_old):
            os.replace(old / name, out_dir / name)
    except BaseException:  # noqa: BLE001 -- the caller says where the files are
        return False
    _remove_tree(new)
    if old is not None:
        _remove_tree(old)
    return True


def _remove_tree(directory: Path | None) -> None:
    """Remove one of the hidden directories this module made (its files are all ours)."""
    if directory is None or not directory.is_dir():
        return
    for f in directory.iterdir():
        with contextlib.suppress(OSError):
            f.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()


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


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is saved with external data (and must not be serialised whole)."""
    return _initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written (model first)."""
    path = Path(path)
    if _initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD:
        write_bytes_atomic(path, model.SerializeToString())
        _remove_stale_data(path, keep=None)
        return [path]
    return _save_with_external_data(model, path)


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> list[Path]:
    """A model with external data, written beside ``path`` then moved in (model last)."""
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        files = _write_with_external_data(model, tmpdir / path.name)
        for f in files[1:]:
            os.replace(f, path.parent / f.name)
        os.replace(tmpdir / path.name, path)
    finally:
        _remove_tree(tmpdir)
    _remove_stale_data(path, keep=files[1].name if len(files) > 1 else None)
    return [path.parent / f.name for f in files]


def _write_with_external_data(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``path`` and its weights file ``<name>.<hash>.data`` beside it."""
    from onnx.external_data_helper import convert_model_to_external_data

    # A copy without serialising: a model this big cannot be serialised in one piece.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    digest = hashlib.sha256()
    for t in model.graph.initializer:
        digest.update(t.raw_data)
    data_name = f"{path.name}.{digest.hexdigest()[:12]}.data"
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data_name,
                                   size_threshold=1024)
    onnx.save_model(model, path)  # writes <data_name> beside it
    data = path.parent / data_name
    return [path, data] if data.exists() else [path]  # no tensor over 1 KiB: nothing external


def _data_files(directory: Path, model: str) -> list[Path]:
    """The external data files this module wrote for ``model`` (``<model>.<12 hex>.data``):
    only those, never a user's file that merely looks similar."""
    pattern = re.compile(rf"{re.escape(model)}\.[0-9a-f]{{12}}\.data")
    return sorted(p for p in directory.glob(f"{model}.*.data") if pattern.fullmatch(p.name))


def _remove_stale_data(path: Path, keep: str | None) -> None:
    for old in _data_files(path.parent, path.name):
        if old.name != keep:
            with contextlib.suppress(OSError):
                old.unlink()

"""Atomic writes: a crash or Ctrl-C never leaves a half-written model or manifest.

A file is written under a temporary name in the destination directory, flushed, and then
renamed over the final name (``os.replace`` is atomic on one file system). A model and its
manifest are one unit (``replace_pair``): the new pair is written into a hidden directory
beside the old one and swapped in, so a failure leaves the old pair or the new one, never a
mix. Models over the 2 GB protobuf limit keep their weights in an external data file whose
name carries a content hash.

Between the stages of a conversion a model is *staged*: an in-memory graph whose large
initializers are external (``data_location`` EXTERNAL) and live in files of a staging
directory (``base_dir``), so no stage holds a second in-memory copy of the weights. Saving
streams those tensors into the final file one at a time.
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
from onnx import numpy_helper
from qcrun import files as qcfiles
from qcrun.errors import UserError
from qcrun.files import manifest_json
from qcrun.graphs import all_graphs

# Protobuf cannot serialise a message of 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Tensors up to this size stay inline: shape constants, which shape inference reads.
INLINE_TENSOR_BYTES = 1024
# Protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


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


#: The one atomic writer (``qcrun.files``), by the name qcexport's stages have used.
write_bytes_atomic = qcfiles.write_atomic


def save_model_and_manifest(
    model: onnx.ModelProto, model_path: Path, manifest_path: Path, manifest: dict[str, Any],
    base_dir: Path | None = None,
) -> list[Path]:
    """Write a model and its manifest as ONE unit (see ``replace_pair``): a failure at any
    point leaves either the complete previous pair or the complete new one.

    ``manifest`` gains ``model_sha256`` and ``files``. Models over the protobuf limit keep
    their weights in an external data file whose name carries a content hash. ``base_dir``
    is where a staged model's external tensors are (see the module docstring).
    """
    model_path, manifest_path = Path(model_path), Path(manifest_path)
    if manifest_path.parent != model_path.parent:
        raise ValueError("the model and its manifest live in one directory")

    def write(new: Path) -> list[str]:
        if is_large(model):
            files = [f.name for f in _write_with_external_data(model, new / model_path.name,
                                                                base_dir)]
            manifest["model_sha256"] = _file_sha256(new / model_path.name)
        else:
            data = inline_bytes(model, base_dir)
            qcfiles.fsync_write(new / model_path.name, data)
            files = [model_path.name]
            manifest["model_sha256"] = hashlib.sha256(data).hexdigest()
            del data
        manifest["files"] = files
        # every file the model reads is hashed, so a swapped data file cannot pass
        manifest["files_sha256"] = {f: _file_sha256(new / f) for f in files[1:]}
        # through qcrun's schema: nothing is written that its reader would refuse, and the
        # caller's manifest becomes what was written
        text = manifest_json(manifest)
        manifest.clear()
        manifest.update(json.loads(text))
        qcfiles.fsync_write(new / manifest_path.name, text.encode())
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


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weights in ``model``, inline or staged, subgraphs included."""
    total = 0
    for graph in all_graphs(model.graph):
        for t in graph.initializer:
            total += (int(_external(t).get("length") or 0) if _is_external(t)
                      else len(t.raw_data) if t.HasField("raw_data") else t.ByteSize())
    return total


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is saved with external data (and must not be serialised whole)."""
    return initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(_is_external(t) for g in all_graphs(model.graph) for t in g.initializer)


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _stays_inline(t: onnx.TensorProto) -> bool:
    """Small tensors (shape constants, read by shape inference) and strings stay in the graph."""
    if t.data_type == onnx.TensorProto.STRING:
        return True
    return not _is_external(t) and t.ByteSize() <= INLINE_TENSOR_BYTES


class _Reader:
    """A tensor's bytes (little-endian, as ``raw_data``), read from its staged data file in
    ``base_dir`` when it is external; one open file per data file."""

    def __init__(self, base_dir: Path | None):
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.files: dict[str, Any] = {}

    def __call__(self, t: onnx.TensorProto) -> bytes:
        if not _is_external(t):
            if t.HasField("raw_data"):
                return t.raw_data
            array = numpy_helper.to_array(t)  # typed fields (float_data...): raw is little-endian
            return array.astype(array.dtype.newbyteorder("<")).tobytes()
        info = _external(t)
        location = info.get("location", "")
        if self.base_dir is None or Path(location).is_absolute() or ".." in Path(location).parts:
            raise ValueError(f"tensor {t.name!r} is external ({location!r}) but not staged in "
                             f"a known directory ({self.base_dir})")
        if location not in self.files:
            self.files[location] = open(self.base_dir / location, "rb")  # noqa: SIM115
        f = self.files[location]
        f.seek(int(info.get("offset", 0)))
        length = int(info["length"]) if "length" in info else -1
        data = f.read(length)
        if length >= 0 and len(data) != length:
            raise ValueError(f"{self.base_dir / location} is truncated (tensor {t.name!r})")
        return data

    def close(self) -> None:
        for f in self.files.values():
            f.close()


_DATA_FIELDS = ("raw_data", "external_data", "data_location", "float_data", "int32_data",
                "int64_data", "double_data", "uint64_data")


def _header(t: onnx.TensorProto) -> onnx.TensorProto:
    """``t`` without its data: what precedes its bytes in the file."""
    header = onnx.TensorProto()
    header.CopyFrom(t)
    for name in _DATA_FIELDS:
        header.ClearField(name)
    return header


def _skeleton(model: onnx.ModelProto, read: _Reader) -> onnx.ModelProto:
    """A copy of ``model`` without its main-graph initializers (copied field by field, so the
    weights are never copied); subgraph tensors, which are small, are inlined."""
    skeleton = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(skeleton, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(skeleton.graph, field, value)
    for graph in list(all_graphs(skeleton.graph))[1:]:
        for t in graph.initializer:
            if _is_external(t):
                data = read(t)
                t.ClearField("external_data")
                t.ClearField("data_location")
                t.raw_data = data
    return skeleton


def _copy_field(message, field, value) -> None:
    if field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, length: int) -> bytes:
    """Key and length of a length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def inline_bytes(model: onnx.ModelProto, base_dir: Path | None = None) -> bytes | bytearray:
    """``model`` serialised with every tensor inline; staged tensors are read from
    ``base_dir`` one at a time.

    A protobuf parser merges a message field that occurs more than once (the encoding spec),
    so the model without its main-graph initializers followed by one ``graph { initializer
    }`` record per tensor is the same model: written this way it never needs a second
    in-memory copy of the weights (a staged model has none, and a record is appended as its
    tensor is read).
    """
    if not has_external_data(model):
        return model.SerializeToString()
    read = _Reader(base_dir)
    try:
        skeleton = _skeleton(model, read)
        out = bytearray(skeleton.SerializeToString())
        del skeleton
        for t in model.graph.initializer:
            if _stays_inline(t):
                tensor = t.SerializeToString()
                data = b""
            else:
                data = read(t)
                tensor = _header(t).SerializeToString() + _key(_TENSOR_RAW_DATA, len(data))
            size = len(tensor) + len(data)
            initializer = _key(_GRAPH_INITIALIZER, size)
            out += _key(_MODEL_GRAPH, len(initializer) + size) + initializer + tensor
            out += data
            del data
        return out
    finally:
        read.close()


def externalize(model: onnx.ModelProto, directory: Path, data_name: str) -> onnx.ModelProto:
    """Stage ``model``: its main-graph tensors (but small ones) move to
    ``directory/data_name`` and are referenced from there. ``model`` loses those bytes in
    place; the returned compact copy is the one to keep (protobuf frees the bytes only with
    the message that held them, so the caller drops ``model``)."""
    with open(Path(directory) / data_name, "wb") as f:
        for t in model.graph.initializer:
            if _is_external(t) or _stays_inline(t):
                continue
            offset = f.tell()
            f.write(t.raw_data if t.HasField("raw_data") else _Reader(None)(t))
            _point_to(t, data_name, offset, f.tell() - offset)
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    return staged


def _point_to(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for name in _DATA_FIELDS:
        t.ClearField(name)
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def write_staged(model: onnx.ModelProto, path: Path) -> Path:
    """Write a staged model's graph to ``path``, in its staging directory (its external
    tensors name data files there): a small file, whatever the size of the weights."""
    Path(path).write_bytes(model.SerializeToString())
    return Path(path)


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike,
                      base_dir: Path | None = None) -> list[Path]:
    """Write ``model`` (staged in ``base_dir``, or in memory) to ``path`` atomically; returns
    the files written (model first)."""
    path = Path(path)
    if not is_large(model):
        write_bytes_atomic(path, inline_bytes(model, base_dir))
        _remove_stale_data(path, keep=None)
        return [path]
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        files = _write_with_external_data(model, tmpdir / path.name, base_dir)
        for f in files[1:]:
            os.replace(f, path.parent / f.name)
        os.replace(tmpdir / path.name, path)
    finally:
        _remove_tree(tmpdir)
    _remove_stale_data(path, keep=files[1].name if len(files) > 1 else None)
    return [path.parent / f.name for f in files]


def _write_with_external_data(model: onnx.ModelProto, path: Path,
                              base_dir: Path | None = None) -> list[Path]:
    """Write ``path`` and its weights file ``<name>.<hash of its bytes>.data`` beside it,
    streaming the tensors (inline, or staged in ``base_dir``) one at a time."""
    read = _Reader(base_dir)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".data")
    try:
        skeleton = _skeleton(model, read)
        moved = []
        with os.fdopen(fd, "wb") as f:
            for t in model.graph.initializer:
                if _stays_inline(t):
                    skeleton.graph.initializer.add().CopyFrom(t)
                    continue
                data = read(t)
                header = skeleton.graph.initializer.add()
                header.CopyFrom(_header(t))
                _point_to(header, "", f.tell(), len(data))
                f.write(data)
                digest.update(data)
                moved.append(header)
            f.flush()
            os.fsync(f.fileno())
        files = [path]
        if moved:
            data_name = f"{path.name}.{digest.hexdigest()[:12]}.data"
            for header in moved:
                header.external_data[0].value = data_name
            os.replace(tmp, path.parent / data_name)
            qcfiles.share(path.parent / data_name)
            files.append(path.parent / data_name)
        qcfiles.fsync_write(path, skeleton.SerializeToString())
        return files
    finally:
        read.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)


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

"""Typed, versioned schemas for the JSON files that cross a boundary, read in one place.

A model directory's ``manifest.json``, a golden set's manifest and a bundle's ``bundle.json``
are written by one tool and read by another, on another machine, maybe years later, maybe
after a hostile edit. Each is a frozen dataclass; :func:`parse` converts JSON data into it
strictly (types checked field by field, unknown keys refused, since a misspelt tolerance key
silently ignored is a check that never ran) and :func:`dump` is its one inverse. A path
recorded in such a file goes through :func:`inside`, so no manifest can make a reader open a
file outside its own directory.

A dataclass may also carry ``WRITE_NULLS = True`` (optional fields at None are written as
null instead of left out) and ``DERIVED``, a mapping of JSON key -> function of the instance
for values computed from the fields (statistics, totals): :func:`dump` writes them after the
fields, for readers of the JSON, and :func:`parse` accepts and ignores them, since they are
computed again from the fields. A field with ``metadata={"dump": False}`` is kept in memory
only (a detail too large for the file, such as per-node counts) and never written.

A schema names its version field and the versions it reads with the class attributes
``VERSION_KEY`` and ``VERSIONS``; the version is checked before anything else, so a file
written by a newer tool says so instead of listing the keys this reader does not know.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Union

from qcrun.errors import UserError

MAX_JSON_BYTES = 16 << 20
_MAX_DEPTH = 64

_UPGRADE_HINT = ("install the qcexport / qcrun version that wrote it (or a newer one): "
                 "`pip install -U qcexport qcrun`")


class _Invalid(Exception):
    """A conversion failure at a field path; :func:`parse` turns it into a UserError."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(problem)


def check_relpath(value: object, *, where: str, field: str, stage: str = "manifest") -> str:
    """``value`` as a relative POSIX path that cannot leave its directory, or a UserError."""
    def bad(problem: str) -> UserError:
        return UserError(
            f"{where}: {field} {value!r} {problem}", stage=stage,
            hint="a path in a manifest names a file inside its own directory "
                 "(relative, '/'-separated, no '..'); re-create the file with qcexport")

    if not isinstance(value, str):
        raise bad(f"is a {_json_type(value)}, expected a relative path (string)")
    if not value:
        raise bad("is empty")
    if "\x00" in value:
        raise bad("contains a NUL character")
    if "\\" in value:
        raise bad("contains a backslash")
    if value.startswith("/") or (len(value) > 1 and value[1] == ":"):
        raise bad("is absolute")
    if ".." in PurePosixPath(value).parts:
        raise bad("leaves its directory ('..')")
    return value


def inside(root: Path, rel: object, *, where: str, field: str, stage: str = "manifest") -> Path:
    """``root / rel`` resolved, refused unless it stays inside ``root`` (symlinks followed)."""
    rel = check_relpath(rel, where=where, field=field, stage=stage)
    base = Path(root).resolve()
    try:
        target = (base / rel).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise UserError(f"{where}: {field} {rel!r} cannot be resolved: {e}", stage=stage) from None
    if target != base and base not in target.parents:
        raise UserError(
            f"{where}: {field} {rel!r} resolves to {target}, outside {base} (a symlink escape)",
            stage=stage,
            hint="a file a manifest names must lie inside its directory; replace the symlink "
                 "with the file itself")
    return target


def read_json(path: Path, *, what: str, stage: str) -> object:
    """The JSON value in ``path`` (``what`` names it in messages), or a clean UserError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise UserError(f"{what} {path} is not a file", stage=stage)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist", stage=stage) from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read: {e.strerror or e}", stage=stage) from None
    if size > MAX_JSON_BYTES:
        raise UserError(f"{what} {path} is {size} bytes, over the {MAX_JSON_BYTES} a JSON "
                        "manifest may have", stage=stage,
                        hint="this is not a qcexport manifest; restore the original")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read: {e.strerror or e}", stage=stage) from None
    if len(raw) > MAX_JSON_BYTES:
        raise UserError(f"{what} {path} is over the {MAX_JSON_BYTES} bytes a JSON manifest may "
                        "have", stage=stage)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text: {e}", stage=stage) from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise UserError(f"{what} {path} is not valid JSON: {e}", stage=stage) from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be a manifest",
                        stage=stage) from None


def _refuse_constant(name: str):
    # NaN / Infinity are not JSON; a tolerance of NaN would make every comparison pass.
    raise ValueError(f"{name} is not a JSON value")


def parse(cls, data: object, *, where: str, stage: str = "manifest"):
    """``data`` (parsed JSON) as an instance of the dataclass ``cls``, checked strictly.

    ``where`` names the file in messages. Unknown keys, missing fields and wrong types are
    UserErrors naming the field path (``inputs[2].dtype``).
    """
    _check_version(cls, data, where=where, stage=stage)
    try:
        return _convert(cls, data, "", 0)
    except _Invalid as e:
        at = f" at {e.path}" if e.path else ""
        raise UserError(f"{where}{at}: {e.problem}", stage=stage,
                        hint="re-create the file with qcexport (or restore it) rather than "
                             "editing it by hand") from None
    except RecursionError:
        raise UserError(f"{where}: nested too deeply", stage=stage) from None


def dump(obj) -> dict:
    """The JSON-ready form of a schema dataclass (the inverse of :func:`parse`)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise TypeError(f"dump() takes a dataclass instance, not {type(obj).__name__}")
    return _dump(obj)


def _dump(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        nulls = getattr(cls, "WRITE_NULLS", False)
        out = {}
        for f in dataclasses.fields(value):
            if not f.metadata.get("dump", True):
                continue
            item = getattr(value, f.name)
            # An optional field left at None is written as absent, as the writers always did.
            if item is None and f.default is None and not nulls:
                continue
            out[_key(f)] = _dump(item)
        for key, compute in getattr(cls, "DERIVED", {}).items():
            out[key] = _dump(compute(value))
        return out
    if isinstance(value, dict):
        return {str(k): _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    return value


def _key(f: dataclasses.Field) -> str:
    """The JSON key of a field: its name, or ``metadata["key"]`` when that is not an
    identifier (kept for on-disk compatibility)."""
    return f.metadata.get("key", f.name)


def _check_version(cls, data: object, *, where: str, stage: str) -> None:
    versions = getattr(cls, "VERSIONS", None)
    if not versions or not isinstance(data, dict):
        return
    key = getattr(cls, "VERSION_KEY", "format")
    if key not in data:
        raise UserError(f"{where}: has no {key!r} (schema version) field; it was not written "
                        "by qcexport", stage=stage, hint="re-create it with qcexport")
    version = data[key]
    if isinstance(version, bool) or not isinstance(version, int):
        raise UserError(f"{where}: {key} {version!r} is not a schema version (an integer)",
                        stage=stage, hint="re-create it with qcexport")
    if version not in versions:
        newer = version > max(versions)
        reads = ", ".join(str(v) for v in versions)
        raise UserError(
            f"{where}: {key} {version} "
            + ("was written by a newer qcexport" if newer else "is not a known version")
            + f"; this qcrun reads {key} {reads}",
            stage=stage, hint=_UPGRADE_HINT if newer else "re-create it with qcexport")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if tp is str:
        return "a string"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return str(tp)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(tp, value: object, path: str, depth: int):
    if depth > _MAX_DEPTH:
        raise _Invalid(path, "nested too deeply")

    def wrong() -> _Invalid:
        seen = _json_type(value)
        if value is not None and not isinstance(value, (dict, list)):
            shown = repr(value)
            seen += f" {shown[:57] + '...' if len(shown) > 60 else shown}"
        return _Invalid(path, f"expected {_describe(tp)}, got {seen}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _convert(rest[0], value, path, depth)
        for arg in rest:  # a plain union: the first alternative that fits
            try:
                return _convert(arg, value, path, depth)
            except _Invalid:
                continue
        raise wrong()
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return value
        raise wrong()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong()
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise wrong()
        args = typing.get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):
            if len(value) != len(args):
                raise _Invalid(path, f"expected a list of {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]", depth + 1)
                         for i, (a, v) in enumerate(zip(args, value, strict=True)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        key_type, item = typing.get_args(tp) or (str, Any)
        return {_dict_key(key_type, k, path): _convert(item, v, _join(path, k), depth + 1)
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return _convert_dataclass(tp, value, path, depth)
    raise TypeError(f"schema type {tp!r} is not supported by qcrun.schema")  # a bug, not input


def _dict_key(key_type, key: str, path: str):
    """A JSON object key as the dict's key type: JSON keys are strings, ``dict[int, ...]``
    keys are written as their decimal text."""
    if key_type is int:
        try:
            return int(key)
        except ValueError:
            raise _Invalid(_join(path, key), f"key {key!r} is not an integer") from None
    return key


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _convert_dataclass(cls, value: dict, path: str, depth: int):
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    by_key = {_key(f): f for f in fields}
    derived = getattr(cls, "DERIVED", {})
    unknown = [k for k in value if k not in by_key and k not in derived]
    if unknown:
        known = ", ".join(sorted(by_key))
        where = f" in {path}" if path else ""
        raise _Invalid(_join(path, unknown[0]),
                       f"unknown key {unknown[0]!r}{where}; known keys: {known}")
    kwargs = {}
    for key, f in by_key.items():
        if key not in value:
            if (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING):  # type: ignore[misc]
                raise _Invalid(_join(path, key), "required key is missing")
            continue
        kwargs[f.name] = _convert(hints[f.name], value[key], _join(path, key), depth + 1)
    return cls(**kwargs)

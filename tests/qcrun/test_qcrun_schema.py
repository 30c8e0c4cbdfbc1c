"""qcrun.schema: strict typed reading of the JSON files that cross a boundary."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
from qcrun import schema
from qcrun.errors import UserError
from qcrun.files import ModelManifest, parse_model_manifest
from qcrun.golden import GoldenManifest, golden_manifest_json, load_golden

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: Literal["float32", "int64", "bool"]
    shape: list[int | str | None]


@dataclass(frozen=True)
class Doc:
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    VERSION_KEY: ClassVar[str] = "format"

    format: int
    model: str
    inputs: list[Spec]
    scale: float = 1.0
    flag: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


GOOD = {"format": 1, "model": "m.onnx", "scale": 2,
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3]},
                   {"name": "ids", "dtype": "int64", "shape": ["batch", None]},
                   {"name": "mask", "dtype": "bool", "shape": [1]}]}


def _error(data) -> str:
    with pytest.raises(UserError) as err:
        schema.parse(Doc, data, where="doc.json", stage="manifest")
    return str(err.value)


def test_parse_converts_and_dump_inverts():
    doc = schema.parse(Doc, GOOD, where="doc.json")
    assert doc.inputs[1] == Spec("ids", "int64", ["batch", None])
    assert doc.scale == 2.0 and isinstance(doc.scale, float)  # an int is a valid number
    assert schema.dump(doc) == {**GOOD, "scale": 2.0, "flag": False, "extra": {}}
    assert schema.parse(Doc, schema.dump(doc), where="again") == doc


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(scle=3), "at scle: unknown key 'scle'; known keys: extra, flag, format, "
                                 "inputs, model, note, scale"),
    (lambda d: d.pop("model"), "at model: required key is missing"),
    (lambda d: d.update(model=5), "at model: expected a string, got number 5"),
    (lambda d: d.update(inputs="x"), "at inputs: expected a list, got string 'x'"),
    (lambda d: d["inputs"][2].update(dtype="int8"),
     'at inputs[2].dtype: expected one of "float32", "int64", "bool", got string \'int8\''),
    (lambda d: d["inputs"][0].update(shape=[True]),
     "at inputs[0].shape[0]: expected an integer or a string or null, got boolean True"),
    (lambda d: d.update(flag=1), "at flag: expected a boolean, got number 1"),
    (lambda d: d.update(scale="1"), "at scale: expected a number, got string '1'"),
    (lambda d: d["inputs"][1].update(nme="y"), "at inputs[1].nme: unknown key 'nme'"),
    (lambda d: d.update(format=2), "format 2 was written by a newer qcexport; this qcrun reads "
                                   "format 1"),
    (lambda d: d.update(format=0), "format 0 is not a known version"),
    (lambda d: d.update(format="1"), "format '1' is not a schema version"),
    (lambda d: d.pop("format"), "has no 'format' (schema version) field"),
])
def test_parse_names_the_field_and_what_was_wrong(edit, expected):
    data = json.loads(json.dumps(GOOD))
    edit(data)
    message = _error(data)
    assert message.startswith("manifest: doc.json")
    assert expected in message


@pytest.mark.parametrize("data", [[1, 2, 3], None, 5, "x", 1.5, True, {}])
def test_parse_refuses_what_is_not_an_object(data):
    assert "doc.json" in _error(data)


def test_parse_never_raises_anything_but_user_error_on_random_json():
    rng = random.Random(12)
    leaves = [None, True, 0, -1, 2.5, "", "x", "../x", [], {}]

    def value(depth):
        kind = rng.randrange(4 if depth < 4 else 1)
        if kind == 0:
            return rng.choice(leaves)
        if kind == 1:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        keys = ["format", "model", "inputs", "name", "dtype", "shape", "scale", "zz"]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randrange(5))}

    for _ in range(500):
        data = json.loads(json.dumps(GOOD))
        # mutate one place of a valid document, or replace it whole
        if rng.random() < 0.2:
            data = value(0)
        else:
            target = data if rng.random() < 0.5 else rng.choice(data["inputs"])
            target[rng.choice([*target, "zz"])] = value(1)
        try:
            schema.parse(Doc, data, where="fuzz")
        except UserError:
            pass
    deep: Any = 1
    for _ in range(5000):
        deep = [deep]
    assert "fuzz" in str(pytest.raises(UserError, schema.parse, Doc,
                                       {**GOOD, "extra": {"a": deep}, "zz": 1}, where="fuzz").value)


@pytest.mark.parametrize("value, problem", [
    ("../x.onnx", "leaves its directory"),
    ("a/../../x", "leaves its directory"),
    ("/etc/passwd", "is absolute"),
    ("C:/x", "is absolute"),
    ("a\\b", "contains a backslash"),
    ("a\x00b", "contains a NUL"),
    ("", "is empty"),
    (5, "is a number, expected a relative path"),
])
def test_check_relpath(value, problem):
    with pytest.raises(UserError, match=problem):
        schema.check_relpath(value, where="m.json", field="model")


def test_inside_refuses_symlink_escapes(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "evil.onnx").write_bytes(b"x")
    (root / "sub").mkdir()
    (root / "sub" / "ok.onnx").write_bytes(b"x")
    assert schema.inside(root, "sub/ok.onnx", where="m", field="model") == \
        (root / "sub" / "ok.onnx").resolve()
    os.symlink(outside / "evil.onnx", root / "model.onnx")
    os.symlink(outside, root / "dir")
    for rel in ("model.onnx", "dir/evil.onnx"):
        with pytest.raises(UserError, match=r"outside .*\(a symlink escape\)"):
            schema.inside(root, rel, where="m", field="model")


def test_read_json_errors(tmp_path, monkeypatch):
    def message(path):
        with pytest.raises(UserError) as err:
            schema.read_json(path, what="model manifest", stage="manifest")
        return str(err.value)

    assert "does not exist" in message(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    assert "is not valid JSON" in message(tmp_path / "bad.json")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    assert "is not UTF-8 text" in message(tmp_path / "latin.json")
    (tmp_path / "nan.json").write_text('{"max_abs": NaN}')
    assert "is not valid JSON" in message(tmp_path / "nan.json")
    assert "is not a file" in message(tmp_path)
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", 10)
    (tmp_path / "big.json").write_text(json.dumps({"a": "b" * 20}))
    assert "over the 10 a JSON manifest may have" in message(tmp_path / "big.json")


@pytest.mark.parametrize("mechanism", sorted(p.name for p in (REPO / "golden").iterdir()))
def test_committed_golden_sets_read_and_round_trip(mechanism):
    directory = REPO / "golden" / mechanism / "tiny"
    golden = load_golden(directory)
    assert isinstance(golden.manifest, GoldenManifest)
    on_disk = json.loads((directory / "manifest.json").read_text())
    assert json.loads(golden_manifest_json(golden.manifest)) == on_disk


def test_model_manifest_refuses_paths_that_leave_the_directory():
    base = {"format": 1, "precision": "fp32", "model": "model.onnx", "model_sha256": "0" * 64,
            "inputs": [], "outputs": []}
    assert isinstance(parse_model_manifest(base, where="m"), ModelManifest)
    for key, value in (("model", "../../outside/evil.onnx"), ("model", "/etc/passwd"),
                       ("golden", "../g/forged"), ("files", ["model.onnx", "../x.data"])):
        with pytest.raises(UserError, match=f"{key}.*(leaves its directory|is absolute)"):
            parse_model_manifest({**base, key: value}, where="m")

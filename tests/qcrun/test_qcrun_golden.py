"""Reading golden sets: every file and array is verified against the manifest."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from qcrun.errors import UserError
from qcrun.golden import array_sha256, file_sha256, load_golden


def _manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def _write_manifest(directory, manifest):
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_load_returns_cases_with_the_written_arrays(linear, lib):
    golden = load_golden(linear.golden, mechanism="linear", preset="tiny")
    assert golden.mechanism == "linear" and golden.preset == "tiny"
    assert golden.manifest.seed == 0 and golden.manifest.config == {"dim": 8}
    assert [c.name for c in golden.cases] == ["single", "batch"]
    expected = lib.linear_cases(linear.weights)
    for case, want in zip(golden.cases, expected, strict=True):
        assert case.description == want["description"]
        assert list(case.inputs) == ["x"] and list(case.outputs) == ["tokens", "pooled"]
        np.testing.assert_array_equal(case.inputs["x"], want["inputs"]["x"])
        for name in ("tokens", "pooled"):
            np.testing.assert_array_equal(case.outputs[name], want["outputs"][name])
    assert golden.case("batch").inputs["x"].shape == (2, 17, 8)
    with pytest.raises(UserError, match="valid golden cases: batch, single"):
        golden.case("nope")


def test_array_sha256_ignores_memory_layout():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    fortran = np.asfortranarray(a)
    assert array_sha256(fortran) == array_sha256(a)
    assert array_sha256(a) == hashlib.sha256(a.tobytes()).hexdigest()
    assert array_sha256(a.T) != array_sha256(a)


def test_file_sha256_streams_the_whole_file(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()


def test_one_changed_byte_is_rejected_by_hash(golden_copy):
    path = golden_copy / "batch.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    recorded = _manifest(golden_copy)["cases"][1]["sha256"]
    with pytest.raises(UserError) as e:
        load_golden(golden_copy)
    text = str(e.value)
    assert f"golden file {path} has sha256 {hashlib.sha256(data).hexdigest()}" in text
    assert f"but manifest records {recorded}" in text
    assert "regenerate with `qcexport golden linear --update` or restore it from git" in text


def test_changed_weights_are_rejected(golden_copy):
    with open(golden_copy / "weights.npz", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match=r"golden file .*weights\.npz has sha256"):
        load_golden(golden_copy)


def test_missing_case_file(golden_copy):
    (golden_copy / "single.npz").unlink()
    with pytest.raises(UserError, match=r"golden file .*single\.npz is missing"):
        load_golden(golden_copy)


def test_truncated_file_recorded_in_the_manifest_is_rejected(golden_copy):
    # Even when the manifest was rewritten to match, a truncated npz cannot be read.
    path = golden_copy / "single.npz"
    path.write_bytes(path.read_bytes()[:100])
    manifest = _manifest(golden_copy)
    manifest["cases"][0]["sha256"] = file_sha256(path)
    _write_manifest(golden_copy, manifest)
    with pytest.raises(UserError, match=r"single\.npz cannot be read as an npz without pickle"):
        load_golden(golden_copy)


def test_pickled_arrays_are_never_loaded(golden_copy):
    path = golden_copy / "single.npz"
    np.savez(path, **{"in.x": np.array([{"evil": 1}], dtype=object)})
    manifest = _manifest(golden_copy)
    manifest["cases"][0]["sha256"] = file_sha256(path)
    _write_manifest(golden_copy, manifest)
    with pytest.raises(UserError, match="cannot be read as an npz without pickle"):
        load_golden(golden_copy)


def test_array_hash_shape_and_dtype_are_checked(golden_copy):
    manifest = _manifest(golden_copy)
    spec = manifest["cases"][0]["outputs"]["pooled"]
    spec["sha256"] = "0" * 64
    spec["shape"] = [1, 7]
    spec["dtype"] = "float16"
    _write_manifest(golden_copy, manifest)
    with pytest.raises(UserError) as e:
        load_golden(golden_copy)
    text = str(e.value)
    assert "array 'out.pooled'" in text
    assert "shape [1, 6] but manifest records [1, 7]" in text
    assert "dtype float32 but manifest records float16" in text
    assert f"but manifest records {'0' * 64}" in text


def test_arrays_missing_from_the_file_or_the_manifest(golden_copy):
    manifest = _manifest(golden_copy)
    manifest["cases"][0]["outputs"]["logits"] = manifest["cases"][0]["outputs"]["pooled"]
    _write_manifest(golden_copy, manifest)
    with pytest.raises(UserError, match=r"has no array 'out\.logits' \(has: "):
        load_golden(golden_copy)

    manifest["cases"][0]["outputs"].pop("logits")
    manifest["cases"][0]["outputs"].pop("pooled")
    _write_manifest(golden_copy, manifest)
    with pytest.raises(UserError, match="arrays the manifest does not list: out.pooled"):
        load_golden(golden_copy)


def test_mechanism_and_preset_must_match(linear):
    with pytest.raises(UserError) as e:
        load_golden(linear.golden, mechanism="qformer")
    assert "is for mechanism 'linear', but the model is mechanism 'qformer'" in str(e.value)
    with pytest.raises(UserError, match="is for preset 'tiny', but the model is preset 'base'"):
        load_golden(linear.golden, mechanism="linear", preset="base")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format=2), "format 2 was written by a newer qcexport; this qcrun reads "
                                       "format 1"),
        (lambda m: m.pop("mechanism"), "mechanism: required key is missing"),
        (lambda m: m.update(cases=[]), "has no cases"),
        (lambda m: m["cases"].append(dict(m["cases"][0])), "lists case 'single' twice"),
        (lambda m: m["cases"][0].pop("sha256"), r"cases\[0\]\.sha256: required key is missing"),
        (lambda m: m["cases"][0]["inputs"]["x"].pop("sha256"),
             r"cases\[0\]\.inputs\.x\.sha256: required key is missing"),
    ],
)
def test_malformed_manifests(golden_copy, edit, message):
    manifest = _manifest(golden_copy)
    edit(manifest)
    _write_manifest(golden_copy, manifest)
    with pytest.raises(UserError, match=message):
        load_golden(golden_copy)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(UserError, match="no golden set at"):
        load_golden(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_golden(tmp_path)

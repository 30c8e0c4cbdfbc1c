"""Models over the 2 GB protobuf limit, in miniature: with the external-data threshold lowered,
a tiny model takes the large-model path of every stage (export, lower, check, verify, save,
golden, parity, quantize, bundle, load), so the mechanics are tested without writing 2 GB.
Also the memory side of real sizes: staged weights written back as the same model, and a
module handed over to convert freed once exported.
"""

from __future__ import annotations

import gc
import json
import os
import stat
import subprocess
import sys
import weakref

import numpy as np
import onnx
import pytest
import qcrun
import torch
from qcrun.errors import UserError

import qcexport
from qcexport.export import pipeline, save
from qcexport.export.capture import Owned

# Every test converts a module (seconds each): `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

AXES = {"x": {0: "batch", 1: "tokens"}}


@pytest.fixture
def large(monkeypatch):
    """Every model with more than 1000 bytes of weights counts as over the limit."""
    monkeypatch.setattr(save, "EXTERNAL_DATA_THRESHOLD", 1000)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _data_files(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".data"))


@pytest.mark.parametrize("attention,target", [("onnx", "ort-cpu"), ("ort", "ort-cpu"),
                                              ("decomposed", "jetson-orin")])
def test_every_attention_form_converts_with_external_data(tmp_path, large, custom_modules,
                                                          attention, target):
    torch.manual_seed(0)
    module = custom_modules["sdpa"]().eval()
    result = qcexport.convert(module, {"x": _x(2, 5, 16)}, AXES, attention=attention,
                              target=target, output_dir=tmp_path / "m")
    data = _data_files(tmp_path / "m")
    assert len(data) == 1 and result.manifest["files"] == ["model.onnx", data[0]]
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert any("onnxsim cannot read" in w for w in result.warnings)
    x = _x(3, 7, 16, seed=1)
    with torch.no_grad():
        expected = module(x).numpy()
    with qcrun.load(tmp_path / "m", target="ort-cpu") as model:
        np.testing.assert_allclose(model(x=x.numpy())["output"], expected, rtol=1e-4, atol=1e-5)


def test_golden_parity_quantize_bundle_and_verify(tmp_path, large, custom_modules):
    torch.manual_seed(0)
    module = custom_modules["sdpa"]().eval()
    example = {"x": _x(2, 5, 16)}
    qcexport.convert(module, example, AXES, output_dir=tmp_path / "m")
    qcexport.write_golden(module, example, tmp_path / "g", dynamic_axes=AXES)
    run = qcexport.parity(tmp_path / "m", ["ort-cpu", "openvino-cpu", "onnx-reference"],
                          golden=tmp_path / "g")
    assert run.passed and run.report.records
    assert {r.target for r in run.report.records} == {"ort-cpu", "openvino-cpu", "onnx-reference"}

    quantized = qcexport.quantize(tmp_path / "m", "int8-dynamic", tmp_path / "m-int8")
    assert all(r.passed for r in quantized.loss)

    result = qcexport.bundle(tmp_path / "m", "ort-cpu", tmp_path / "m.bundle",
                             golden=tmp_path / "g")
    bundle = tmp_path / "m.bundle"
    assert _data_files(bundle) == _data_files(tmp_path / "m")
    assert set(_data_files(bundle)) <= set(result.files)
    verified = subprocess.run([sys.executable, "-m", "qcrun.cli", "verify", str(bundle)],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    with qcrun.load(bundle, target="ort-cpu") as model:
        x = _x(1, 3, 16, seed=2)
        with torch.no_grad():
            expected = module(x).numpy()
        np.testing.assert_allclose(model(x=x.numpy())["output"], expected, rtol=1e-4,
                                   atol=1e-5)


def test_a_changed_data_file_is_refused(tmp_path, large, custom_modules):
    """The weights live in the data file: changing it must not go unnoticed."""
    torch.manual_seed(0)
    module = custom_modules["sdpa"]().eval()
    example = {"x": _x(2, 5, 16)}
    qcexport.convert(module, example, AXES, output_dir=tmp_path / "m")
    qcexport.write_golden(module, example, tmp_path / "g", dynamic_axes=AXES)
    data = tmp_path / "m" / _data_files(tmp_path / "m")[0]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=data.name):
        qcexport.parity(tmp_path / "m", ["ort-cpu"], golden=tmp_path / "g")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert data.name in manifest["files_sha256"]


# --- quantize with external data, file modes, staged saves, owned modules ----------------------


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("precision", ["int8-dynamic", "fp16"])
def test_quantize_reads_external_data_and_writes_its_own(tmp_path, large, custom_modules,
                                                        precision):
    torch.manual_seed(0)
    module = custom_modules["sdpa"](dim=64).eval()  # int8 weights over the inline size too
    qcexport.convert(module, {"x": _x(2, 5, 64)}, AXES, output_dir=tmp_path / "m")
    before = _snapshot(tmp_path / "m")
    assert len(_data_files(tmp_path / "m")) == 1

    result = qcexport.quantize(tmp_path / "m", precision, tmp_path / "q")
    assert _snapshot(tmp_path / "m") == before  # the source is read in place, never changed
    data = _data_files(tmp_path / "q")
    assert len(data) == 1 and data[0].startswith("model.onnx.")
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["files"] == ["model.onnx", data[0]] and manifest["precision"] == precision
    assert set(manifest["files_sha256"]) == {data[0]}
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert all(r.passed for r in result.loss)
    x = _x(3, 7, 64, seed=3)
    with torch.no_grad():
        expected = module(x).numpy()
    with qcrun.load(tmp_path / "q", target="ort-cpu") as model:
        got = model(x=x.numpy())["output"]
    cosine = float((got * expected).sum() / np.linalg.norm(got) / np.linalg.norm(expected))
    assert cosine > 0.99 and not np.array_equal(got, expected)  # reduced, and still right


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_file_follows_the_umask(tmp_path, large, custom_modules, umask):
    torch.manual_seed(0)
    old = os.umask(umask)
    try:
        qcexport.convert(custom_modules["sdpa"](dim=64).eval(), {"x": _x(2, 5, 64)}, AXES,
                         output_dir=tmp_path / "m")
        qcexport.quantize(tmp_path / "m", "int8-dynamic", tmp_path / "q")
    finally:
        os.umask(old)
    files = [p for d in ("m", "q") for p in (tmp_path / d).iterdir()]
    assert any(p.name.endswith(".data") for p in files) and len(files) == 6
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        p.name: oct(0o666 & ~umask) for p in files}


def test_a_staged_model_saves_as_the_same_model(tmp_path):
    """Staged weights are written back one record at a time; a protobuf parser merges the
    records, so the file reads back as exactly the original model."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"]),
         onnx.helper.make_node("Add", ["y", "b"], ["z"]),
         onnx.helper.make_node("Reshape", ["z", "shape"], ["out"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", 1, 32])],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b"),
         onnx.numpy_helper.from_array(np.array([0, 1, 32], np.int64), "shape")])
    original = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    staged = save.externalize(copy, tmp_path, "w.data")
    assert [t.data_location for t in staged.graph.initializer] == [
        onnx.TensorProto.EXTERNAL, onnx.TensorProto.DEFAULT, onnx.TensorProto.DEFAULT]
    assert staged.ByteSize() < weight.nbytes

    written = bytes(save.inline_bytes(staged, tmp_path))
    assert written != original.SerializeToString()  # not one serialisation of the whole...
    back = onnx.load_from_string(written)  # ...but the same model once parsed
    assert back.SerializeToString() == original.SerializeToString()
    import onnxruntime as ort

    x = rng.standard_normal((3, 64)).astype(np.float32)
    got = ort.InferenceSession(written, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], (x @ weight + bias).reshape(3, 1, 32), rtol=1e-5,
                               atol=1e-5)


def test_an_owned_module_is_freed_once_exported(tmp_path, custom_modules, monkeypatch):
    """convert(Owned(module)) frees the weights before the graph stages (peak memory); the
    exporter's own objects must not keep them either."""
    torch.manual_seed(0)
    module = custom_modules["sdpa"]().eval()
    x = _x(3, 7, 16, seed=1)
    with torch.no_grad():
        expected = module(x).numpy()
    weights = [weakref.ref(p) for p in module.parameters()]
    owned = Owned(module)
    del module
    seen_alive = []
    real_simplify = pipeline.simplify

    def simplify(*args):
        gc.collect()
        seen_alive.append(sum(w() is not None for w in weights))
        return real_simplify(*args)

    monkeypatch.setattr(pipeline, "simplify", simplify)
    result = qcexport.convert(owned, {"x": _x(2, 5, 16)}, AXES, output_dir=tmp_path / "m")
    assert seen_alive == [0] and owned.module is None
    assert result.passed and {r.case for r in result.verification} == {"export_shape",
                                                                       "other_shape"}
    with qcrun.load(tmp_path / "m", target="ort-cpu") as model:
        np.testing.assert_allclose(model(x=x.numpy())["output"], expected, rtol=1e-4,
                                   atol=1e-5)


def test_a_module_the_caller_keeps_is_left_as_it_was(tmp_path, custom_modules):
    torch.manual_seed(0)
    module = custom_modules["sdpa"]().eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    qcexport.convert(module, {"x": _x(2, 5, 16)}, AXES, output_dir=tmp_path / "m")
    assert all(p is not None for p in module.parameters())
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())

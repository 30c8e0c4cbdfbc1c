"""Models over the 2 GB protobuf limit, in miniature: with the external-data threshold lowered,
a tiny model takes the large-model path of every stage (export, lower, check, verify, save,
golden, parity, quantize, bundle, load), so the mechanics are tested without writing 2 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import qcrun
import torch
from qcrun.errors import UserError

import qcexport
from qcexport.export import save

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

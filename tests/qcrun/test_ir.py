"""OpenVINO IR beside and instead of model.onnx: written by `qcexport ir`, read by OpenVINO
targets, refused with the reason (and the command that makes ONNX) by engines that read ONNX
only. Real OpenVINO, onnxruntime and golden data throughout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import qcrun
from qcrun.engines import model_file
from qcrun.errors import UserError
from qcrun.files import read_model_dir
from qcrun.golden import load_golden
from qcrun.ir import ir_precision
from qcrun.parity import policy_for, run_parity

from qcexport.ir import write_ir

pytestmark = pytest.mark.slow
pytest.importorskip("openvino")


@pytest.fixture
def ir_dir(tmp_path, tiny_models):
    directory = tiny_models.copy(tmp_path / "qformer", "qformer")
    write_ir(directory)
    return directory


def test_ir_round_trip_matches_golden_and_onnx(ir_dir):
    model = read_model_dir(ir_dir)
    assert model.ir == ir_dir / "model.xml" and model.onnx == ir_dir / "model.onnx"
    assert ir_precision(model.ir) == "fp32"  # save_model's fp16 compression was turned off
    files = model.model_files()
    assert model_file(files, "openvino-cpu") == model.ir
    assert model_file(files, "ort-cpu") == model.onnx
    golden = load_golden(model.golden_dir() or
                         f"golden/{model.manifest.mechanism}/{model.manifest.preset}")
    report = run_parity(files, golden, ["openvino-cpu", "ort-cpu"], policy_for("fp32"), "fp32")
    assert report.passed and not report.skips(), report.format_matrix()
    # the IR computes what the ONNX computes on the same engine (fp32 policy: 1e-4 here)
    case = golden.cases[0]
    with qcrun.engines.adapter_for(model.ir, "openvino-cpu") as a, \
            qcrun.engines.adapter_for(model.onnx, "openvino-cpu") as b:
        for name, value in a.run(case.inputs).items():
            np.testing.assert_allclose(value, b.run(case.inputs)[name], atol=1e-5, rtol=0)


def test_load_reads_ir_on_openvino(ir_dir):
    with qcrun.load(ir_dir, target="openvino-cpu") as model:
        assert model._adapter.model_path.name == "model.xml"
    with qcrun.load(ir_dir, target="ort-cpu") as model:
        assert model._adapter.model_path.name == "model.onnx"


def _make_ir_only(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["model"] = manifest["ir"]["xml"]
    manifest["model_sha256"] = manifest["ir"]["xml_sha256"]
    manifest["ir"]["source_sha256"] = None
    (directory / "model.onnx").unlink()
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_ir_only_refused_by_onnx_engines_with_the_reason(ir_dir):
    _make_ir_only(ir_dir)
    model = read_model_dir(ir_dir)
    assert model.onnx is None
    for target in ("ort-cpu", "onnx-reference"):
        with pytest.raises(UserError) as info:
            qcrun.load(ir_dir, target=target)
        assert "holds only OpenVINO IR" in str(info.value)
        assert "qcexport convert" in info.value.hint or "qcexport convert" in str(info.value)
    golden = load_golden("golden/qformer/tiny")
    report = run_parity(model.model_files(), golden, ["ort-cpu", "openvino-cpu"],
                        policy_for("fp32"), "fp32")
    skipped = {r.target for r in report.skips()}
    assert skipped == {"ort-cpu"} and report.passed
    assert all("only OpenVINO IR" in r.message for r in report.skips())
    with qcrun.load(ir_dir) as auto:  # auto skips onnxruntime and says why
        assert auto.target == "openvino-cpu"


def test_tampered_or_fp16_ir_is_refused(ir_dir, tmp_path):
    manifest = json.loads((ir_dir / "manifest.json").read_text())
    data = bytearray((ir_dir / "model.bin").read_bytes())
    data[len(data) // 2] ^= 1
    (ir_dir / "model.bin").write_bytes(bytes(data))
    with pytest.raises(UserError, match="was changed after export"):
        read_model_dir(ir_dir)
    # IR written with openvino's default fp16 compression is not an fp32 model's IR
    import openvino as ov
    from qcrun.golden import file_sha256
    ov.save_model(ov.convert_model(str(ir_dir / "model.onnx")), str(tmp_path / "model.xml"))
    assert ir_precision(tmp_path / "model.xml") == "fp16"
    for name in ("model.xml", "model.bin"):
        (ir_dir / name).write_bytes((tmp_path / name).read_bytes())
    manifest["ir"].update(xml_sha256=file_sha256(ir_dir / "model.xml"),
                          bin_sha256=file_sha256(ir_dir / "model.bin"))
    (ir_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="stores fp16"):
        read_model_dir(ir_dir)


def test_ir_command_refuses_foreign_files(tmp_path, tiny_models):
    directory = tiny_models.copy(tmp_path / "qformer", "qformer")
    (directory / "model.xml").write_text("mine")
    with pytest.raises(UserError, match="refusing to overwrite"):
        write_ir(directory)
    assert (directory / "model.xml").read_text() == "mine"

"""int8-nncf: NNCF post-training quantization to OpenVINO IR, with and without accuracy control,
and bf16 as a declared precision, on real NNCF and OpenVINO."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import qcrun
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from qcrun.engines import availability, open_adapter
from qcrun.errors import UserError
from qcrun.files import read_model_dir
from qcrun.parity import TolerancePolicy

from qcexport import mechanisms
from qcexport.cli import main as cli
from qcexport.optimize import quantize_model_dir
from qcexport.optimize.nncf import INSTALL, case_score, import_nncf, quantize_ir
from qcexport.optimize.precision import Calibration, cpu_flags

pytest.importorskip("nncf", reason="NNCF is not installed (pip install 'qcexport[nncf]')")
pytestmark = pytest.mark.skipif(not availability("openvino-cpu")[0],
                                reason="OpenVINO CPU is not available here")


@pytest.mark.slow
@pytest.mark.parametrize("name", mechanisms.names())
def test_nncf_quantizes_every_tiny_mechanism_to_ir(name, tiny_models, tmp_path):
    source = tiny_models.dir(name, "tiny", precision="int8-nncf")
    out = tmp_path / "q"
    # accuracy control: plain NNCF leaves flamingo-resampler tiny one element over the policy
    result = quantize_model_dir(source, "int8-nncf", out, calibration_cases=8,
                                evaluation_cases=4, accuracy_control=True)
    assert result.path == out / "model.xml" and (out / "model.bin").is_file()
    assert not (out / "model.onnx").exists()
    model = read_model_dir(out)  # hashes and the IR's stored precision checked
    assert model.precision == "int8-nncf" and model.manifest.ir.bin == "model.bin"
    counts = result.manifest["quantization"]["counts"]
    assert counts["quantized"]["top"] > 0  # FakeQuantize on real matrix products
    if mechanisms.get(name).quantize_exclude:  # the spec's float modules (routing: controller)
        assert counts["float"]["top"] > 0
    assert all(r.passed for r in result.loss)
    assert max(r.max_abs for r in result.loss) > 1e-4  # really int8, not fp32 rounding
    loaded = qcrun.load(out, "openvino-cpu")
    assert loaded.precision == "int8-nncf" and loaded.inference_precision == "fp32"


def _sensitive_model(path):
    """Two products: ``safe = x @ a`` on ordinary activations, ``sensitive = z @ b`` on
    activations where one token is 1000x the others, so that one per-tensor int8 scale rounds
    every other token to zero."""
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    b = (rng.standard_normal((32, 32)) / 6).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["safe"], name="safe_mm"),
         helper.make_node("MatMul", ["z", "b"], ["sensitive"], name="sensitive_mm")], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16, 32]) for n in "xz"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 16, 32])
         for n in ("safe", "sensitive")],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _feeds(count, seed):
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        z = rng.standard_normal((1, 16, 32)).astype(np.float32)
        z[0, 0] *= 1000.0
        feeds.append({"x": rng.standard_normal((1, 16, 32)).astype(np.float32), "z": z})
    return feeds


@pytest.mark.slow
def test_accuracy_control_keeps_the_sensitive_layer_in_float(tmp_path):
    src = _sensitive_model(tmp_path / "m.onnx")
    calibration = Calibration("test", _feeds(8, 1))
    evaluation = [(f"case{i}", f) for i, f in enumerate(_feeds(4, 2))]
    outputs = ["safe", "sensitive"]
    plain, settings = quantize_ir(src, calibration, evaluation, outputs)
    assert settings.counts["float"]["top"] == 0  # plain NNCF quantizes both
    controlled, settings = quantize_ir(src, calibration, evaluation, outputs,
                                       accuracy_control=True)
    # OpenVINO names the op after the ONNX node's output
    assert settings.counts["float_ops"] == ["sensitive"]
    assert settings.counts["quantized"]["top"] == 1  # the safe product stays int8
    # judged here with the policy, on the fp32 model's outputs computed by numpy
    policy = TolerancePolicy()
    import openvino as ov

    scores = {}
    for label, model in (("plain", plain), ("controlled", controlled)):
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = []
        for _, feed in evaluation:
            result = compiled(feed)
            outputs_ = {p.get_any_name(): np.asarray(result[p]) for p in compiled.outputs}
            reference = {"safe": feed["x"] @ _weights(src, "a"),
                         "sensitive": feed["z"] @ _weights(src, "b")}
            got.append(case_score(outputs_, reference, policy))
        scores[label] = got
    assert min(scores["plain"]) < 1.0  # the check that accuracy control answers: it fails
    assert scores["controlled"] == [1.0] * len(evaluation)


def _weights(path, name):
    model = onnx.load(path)
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_without_nncf_the_error_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` raises ImportError
    with pytest.raises(UserError) as caught:
        import_nncf()
    assert INSTALL in caught.value.hint and INSTALL == "pip install 'qcexport[nncf]'"
    result = CliRunner().invoke(cli, ["quantize", str(tmp_path), "--precision", "int8-nncf"])
    assert result.exit_code == 1
    assert "fix: install it with pip install 'qcexport[nncf]'" in result.output
    assert "Traceback" not in result.output


def test_accuracy_control_is_refused_for_other_precisions(tmp_path):
    with pytest.raises(UserError, match="applies to --precision int8-nncf"):
        quantize_model_dir(tmp_path, "int8-static", tmp_path / "out", accuracy_control=True)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_flags() & {"avx512_bf16", "amx_bf16"},
                    reason="this CPU has no AVX-512 BF16 or AMX: OpenVINO cannot compute bf16")
def test_bf16_model_directory_declares_bf16_and_is_computed_in_it(tiny_models, tmp_path):
    source = tiny_models.dir("qformer", "tiny")
    out = tmp_path / "bf16"
    result = quantize_model_dir(source, "bf16", out)
    assert result.manifest["precision"] == "bf16"
    assert read_model_dir(out).graph.precision == "fp32"  # the graph is stored in fp32
    assert all(r.passed for r in result.loss)
    assert max(r.max_abs for r in result.loss) > 1e-5  # computed in bf16, not fp32
    model = qcrun.load(out, "openvino-cpu")
    assert (model.precision, model.inference_precision) == ("bf16", "bf16")
    assert qcrun.load(source, "openvino-cpu").inference_precision == "fp32"
    with pytest.raises(UserError, match="bf16 is an inference precision"):
        qcrun.load(out, "ort-cpu")
    with open_adapter(out / "model.onnx", "openvino-cpu", precision="bf16") as adapter:
        assert adapter.inference_precision() == "bf16"

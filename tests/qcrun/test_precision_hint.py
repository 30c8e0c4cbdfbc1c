"""The declared precision pins what the engine computes: set, read back, recorded, refused.

OpenVINO's CPU plugin computes fp32 models in bf16 by default on CPUs with AVX-512 BF16 or
AMX; every runner sets ``INFERENCE_PRECISION_HINT`` from the declared precision and reads the
compiled model's value back. Real OpenVINO and onnxruntime on a hand-built MatMul model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qcrun.engines import TargetUnavailable, availability, open_adapter
from qcrun.latency import SweepPoint
from qcrun.parity import TolerancePolicy, compare
from qcrun.profile import profile_model
from qcrun.targets import get_target, list_targets

OPENVINO = pytest.mark.skipif(not availability("openvino-cpu")[0],
                              reason="OpenVINO CPU is not available here")
ORT = pytest.mark.skipif(not availability("ort-cpu")[0], reason="onnxruntime is not installed")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


BF16_CPU = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
NEEDS_BF16 = pytest.mark.skipif(not BF16_CPU, reason="this CPU has no AVX-512 BF16 or AMX: "
                                "OpenVINO cannot compute bf16 here")


@pytest.fixture(scope="module")
def matmul(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """y = x @ w with values whose bf16 rounding is visible (8-bit mantissa)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("hint") / "mm.onnx"
    onnx.save(model, path)
    return path, x, (x.astype(np.float64) @ w.astype(np.float64))


@OPENVINO
@pytest.mark.parametrize("accuracy", [True, False])
def test_fp32_is_computed_in_fp32_in_performance_mode_too(matmul, accuracy):
    path, x, expected = matmul
    with open_adapter(path, "openvino-cpu", precision="fp32", accuracy=accuracy) as adapter:
        assert adapter.inference_precision() == "fp32"
        reported, _ = adapter.reported_options()
        assert reported["INFERENCE_PRECISION_HINT"] == "f32"  # read from the compiled model
        y = adapter.run({"x": x})["y"]
    assert np.abs(y - expected).max() < 1e-3  # bf16 would be off by ~1e-1 here


@OPENVINO
def test_a_bare_model_is_computed_in_fp32(matmul):
    path, _, _ = matmul
    with open_adapter(path, "openvino-cpu", accuracy=False) as adapter:
        assert adapter.precision == "fp32"
        assert adapter.inference_precision() == "fp32"


@OPENVINO
@NEEDS_BF16
def test_bf16_is_computed_in_bf16_and_within_its_policy(matmul):
    path, x, expected = matmul
    with open_adapter(path, "openvino-cpu", precision="bf16", accuracy=False) as adapter:
        assert adapter.inference_precision() == "bf16"
        reported, _ = adapter.reported_options()
        assert reported["INFERENCE_PRECISION_HINT"] == "bf16"
        y = adapter.run({"x": x})["y"]
    error = np.abs(y - expected).max()
    assert error > 1e-3  # really bf16: the inputs were rounded to 8 bits of mantissa
    bound = TolerancePolicy().resolve("bf16", "openvino-cpu", "y")
    assert compare(y, expected.astype(np.float32), bound).passed


@OPENVINO
def test_a_precision_the_engine_does_not_compute_is_refused(matmul):
    """An option that overrides the hint makes the engine compute another precision than the
    declared one: the load is refused, never timed or judged."""
    path, _, _ = matmul
    other = "f32" if BF16_CPU else "bf16"
    declared = "bf16" if BF16_CPU else "fp32"
    with pytest.raises(TargetUnavailable, match="compute in"):
        open_adapter(path, "openvino-cpu", precision=declared,
                     config={"INFERENCE_PRECISION_HINT": other})


@ORT
def test_onnxruntime_has_no_inference_precision_setting(matmul):
    path, _, _ = matmul
    with open_adapter(path, "ort-cpu", precision="fp32") as adapter:
        assert adapter.inference_precision() is None


def test_bf16_is_accepted_only_on_openvino_cpu_and_refused_with_a_reason():
    accepting = [t.name for t in list_targets() if not t.refusals(precision="bf16")]
    assert accepting == ["openvino-cpu"]
    for target in list_targets():
        if target.name == "openvino-cpu":
            continue
        why = target.incompatibility(precision="bf16")
        assert "bf16 is an inference precision of OpenVINO's CPU plugin" in why, target.name
    assert "only OpenVINO reads" in get_target("ort-cpu").incompatibility(precision="int8-nncf")


def test_an_unknown_declared_precision_is_a_user_error(matmul):
    from qcrun.engines import adapter_for
    from qcrun.errors import UserError

    with pytest.raises(UserError, match="bf8"):
        adapter_for(matmul[0], "openvino-cpu", precision="bf8")


@OPENVINO
@ORT
@pytest.mark.slow
def test_profile_times_the_declared_precision_and_records_it(matmul):
    path, x, _ = matmul
    point = SweepPoint((("n", 4),))
    targets = ["ort-cpu", "openvino-cpu"]
    kwargs = {"runs": 3, "warmup": 1, "op_runs": 0, "gemm_sizes": None, "count": False}
    report = profile_model(path, targets, [point], lambda _p: {"x": x},
                           model_info={"precision": "fp32"}, **kwargs)
    ov = report.target("openvino-cpu")
    assert ov.status == "ok" and ov.inference_precision == "fp32"
    assert ov.engine_options["INFERENCE_PRECISION_HINT"] == "f32"
    assert report.target("ort-cpu").inference_precision is None
    assert "computes in" in report.to_markdown()
    if BF16_CPU:
        report = profile_model(path, targets, [point], lambda _p: {"x": x},
                               model_info={"precision": "bf16"}, **kwargs)
        assert report.target("openvino-cpu").inference_precision == "bf16"
        skipped = report.target("ort-cpu")
        assert skipped.status == "skipped" and "bf16" in skipped.reason

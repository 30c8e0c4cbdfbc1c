"""Reduced precision: every mechanism in every precision, on real engines.

Each tiny mechanism is exported once (fp32), then reduced to int8-dynamic, int8-static and
fp16; each reduced model must pass its precision's golden policy on ort-cpu and openvino-cpu
and agree with onnx-reference on the same model (kernel error).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from qcrun.errors import UserError
from qcrun.graphs import all_graphs

from qcexport import mechanisms
from qcexport.export.lowering import count_ops
from qcexport.optimize import check_target_precision, quantize_model_dir
from qcexport.optimize.precision import (
    calibration_from_npz,
    guard_qattention,
    has_vnni,
    node_modules,
    reduced_precision_of,
    topological_sort,
)
from qcexport.parity import parity_for_model_dir

TARGETS = ["ort-cpu", "openvino-cpu", "onnx-reference"]
REDUCED = ("int8-dynamic", "int8-static", "fp16")


@pytest.fixture(scope="module")
def fp32_dirs(tiny_models):
    """fp32_dirs(name, precision) -> the tiny fp32 export to reduce, shared by the session:
    int8-static may export another form of the same math (spec.precision_overrides)."""

    def get(name: str, precision: str = "fp32"):
        return tiny_models.dir(name, "tiny", precision=precision)

    return get


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("name", mechanisms.names())
def test_every_mechanism_in_every_precision_passes_its_policy(name, precision, fp32_dirs, tmp_path):
    out = tmp_path / precision
    result = quantize_model_dir(fp32_dirs(name, precision), precision, out)
    assert result.manifest["precision"] == precision
    assert all(r.passed for r in result.loss)
    run = parity_for_model_dir(out, TARGETS, require=TARGETS)
    counts = run.report.counts()
    assert counts["fail"] == 0 and counts["skip"] == 0, run.report.format_matrix()
    assert counts["pass"] > 0
    assert run.kernel is not None and run.kernel.passed, run.kernel.format_matrix()
    # The reduction is real: the model differs from fp32 by more than fp32 rounding.
    assert max(r.max_abs for r in result.loss) > 1e-4


def _initializer_types(model):
    return {t.data_type for g in all_graphs(model.graph) for t in g.initializer}


def test_int8_initializers_really_are_int8(fp32_dirs, tmp_path):
    for precision in ("int8-dynamic", "int8-static"):
        out = tmp_path / precision
        result = quantize_model_dir(fp32_dirs("qformer", precision), precision, out)
        model = onnx.load(out / "model.onnx")
        weights = [t for t in model.graph.initializer if t.data_type == TensorProto.INT8]
        assert len(weights) >= result.manifest["quantization"]["counts"]["quantized"]["top"]
        assert result.manifest["quantization"]["counts"]["quantized"]["top"] == 20
        assert result.manifest["quantization"]["counts"]["float"]["top"] == 0


def test_fp16_weights_are_half_and_io_stays_fp32(fp32_dirs, tmp_path):
    quantize_model_dir(fp32_dirs("qformer"), "fp16", tmp_path / "h")
    model = onnx.load(tmp_path / "h" / "model.onnx")
    assert TensorProto.FLOAT16 in _initializer_types(model)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    onnx.checker.check_model(model)  # topologically sorted again


def test_if_branch_matmuls_are_quantized(fp32_dirs, tmp_path):
    result = quantize_model_dir(fp32_dirs("routing"), "int8-dynamic", tmp_path / "r")
    counts = result.manifest["quantization"]["counts"]
    assert counts["quantized"]["branches"] == 20 and counts["float"]["branches"] == 0
    model = onnx.load(tmp_path / "r" / "model.onnx")
    branch_ops = [n.op_type for g in list(all_graphs(model.graph))[1:] for n in g.node]
    assert "MatMulInteger" in branch_ops and "MatMul" not in branch_ops


def test_router_stays_float(fp32_dirs, tmp_path):
    result = quantize_model_dir(fp32_dirs("routing"), "int8-dynamic", tmp_path / "r")
    excluded = result.manifest["quantization"]["excluded_nodes"]
    paths = node_modules(onnx.load(fp32_dirs("routing") / "model.onnx"))
    assert excluded and all(paths[n].startswith("controller") for n in excluded)
    model = onnx.load(tmp_path / "r" / "model.onnx")
    float_weights = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    # ORT splits each Gemm into MatMul + Add; the controller's two stay float MatMuls.
    products = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")
                and n.input[1].startswith("controller.") and n.input[1] in float_weights]
    assert len(products) == 2
    assert not [n for n in model.graph.node if n.op_type == "MatMulInteger"
                and any(i.startswith("controller.") for i in n.input)]


def test_qattention_trap_is_guarded(fp32_dirs, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    src = fp32_dirs("qformer") / "model.onnx"
    # The trap: default op types turn the standard Attention into com.microsoft.QAttention.
    quantize_dynamic(src, tmp_path / "trap.onnx")
    trapped = onnx.load(tmp_path / "trap.onnx")
    if count_ops(trapped).get("com.microsoft::QAttention"):
        with pytest.raises(RuntimeError, match="QAttention"):
            guard_qattention(trapped)
    # Ours keeps the standard Attention nodes.
    quantize_model_dir(fp32_dirs("qformer"), "int8-dynamic", tmp_path / "ok")
    ops = count_ops(onnx.load(tmp_path / "ok" / "model.onnx"))
    assert ops["Attention"] == 3 and not ops.get("com.microsoft::QAttention")


def test_guard_rejects_a_qattention_graph():
    node = helper.make_node("QAttention", ["x"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    with pytest.raises(RuntimeError, match="QAttention"):
        guard_qattention(helper.make_model(graph))


def test_quantizing_a_quantized_model_is_refused(fp32_dirs, tmp_path):
    quantize_model_dir(fp32_dirs("matryoshka"), "int8-dynamic", tmp_path / "q")
    with pytest.raises(UserError, match="already int8-dynamic"):
        quantize_model_dir(tmp_path / "q", "int8-static", tmp_path / "qq")
    model = onnx.load(tmp_path / "q" / "model.onnx")
    assert "MatMulInteger" in reduced_precision_of(model)


def test_target_without_the_precision_says_why():
    with pytest.raises(UserError, match="ort-cuda does not run int8-dynamic") as info:
        check_target_precision("ort-cuda", "int8-dynamic")
    assert "MatMulInteger" in str(info.value)
    check_target_precision("ort-cpu", "fp16")


def _manifest_inputs(fp32_dir):
    import json

    return json.loads((fp32_dir / "manifest.json").read_text())["inputs"]


def test_calibration_file_round_trip_and_mismatches(fp32_dirs, tmp_path):
    d = fp32_dirs("matryoshka")
    inputs = _manifest_inputs(d)
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, image_features=rng.standard_normal((4, 1, 20, 48)).astype(np.float32),
             num_queries=np.array([1, 4, 9, 16], dtype=np.int64))
    cal = calibration_from_npz(good, inputs)
    assert cal.count == 4 and cal.feeds[0]["image_features"].shape == (1, 20, 48)
    assert cal.feeds[0]["num_queries"].shape == () and len(cal.sha256) == 64
    result = quantize_model_dir(d, "int8-static", tmp_path / "s", calibration_file=good)
    assert result.manifest["calibration"] == {"source": str(good), "count": 4,
                                              "sha256": cal.sha256}

    wrong_name = tmp_path / "wrong.npz"
    np.savez(wrong_name, features=np.zeros((2, 1, 5, 48), np.float32))
    with pytest.raises(UserError, match="missing inputs") as info:
        calibration_from_npz(wrong_name, inputs)
    assert "image_features" in str(info.value)
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, image_features=np.zeros((2, 1, 5, 47), np.float32),
             num_queries=np.full((2,), 3, np.int64))
    with pytest.raises(UserError, match="axis 2 is 47, expected 48"):
        calibration_from_npz(wrong_shape, inputs)
    assert not (tmp_path / "never").exists()


def test_accuracy_loss_over_policy_names_outputs_and_suggests_exclusion(fp32_dirs, tmp_path):
    d = fp32_dirs("perceiver")
    # Calibrating on constant inputs collapses every range: the model then loses far more
    # than the int8 policy allows, and nothing is written.
    bad = tmp_path / "flat.npz"
    np.savez(bad, image_features=np.full((2, 1, 9, 64), 1e-3, np.float32),
             image_mask=np.ones((2, 1, 9), bool))
    with pytest.raises(UserError) as info:
        quantize_model_dir(d, "int8-static", tmp_path / "o", calibration_file=bad)
    text = str(info.value)
    assert "latent_tokens" in text and "--exclude-modules" in text
    assert not (tmp_path / "o" / "model.onnx").exists()


def test_unknown_module_exclusion_lists_modules(fp32_dirs, tmp_path):
    with pytest.raises(UserError, match="top-level modules") as info:
        quantize_model_dir(fp32_dirs("qformer"), "int8-dynamic", tmp_path / "x",
                           exclude_modules=["nope"])
    assert "layers" in str(info.value)


def test_weight_range_follows_the_cpu():
    assert has_vnni({"avx2", "avx512_vnni"}) is True
    import platform

    if platform.machine().lower() not in ("arm64", "aarch64"):
        assert has_vnni({"avx2"}) is False


def test_topological_sort_sees_branch_reads():
    # An If whose branch reads `a` placed before the node producing `a`.
    then = helper.make_graph([helper.make_node("Identity", ["a"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", 1, [1])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", 1, [1])])
    nodes = [
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("Neg", ["x"], ["a"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1]),
                                           helper.make_tensor_value_info("c", 9, [])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    topological_sort(graph)
    assert [n.op_type for n in graph.node] == ["Neg", "If"]

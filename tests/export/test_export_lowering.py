"""lowering: opset-18 -> 17 downgrade and op counting, on hand-built graphs run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qcrun.engines import open_adapter
from qcrun.errors import UserError

from qcexport.export.lowering import count_ops, downgrade_to_opset17, fused_attention_count


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 18,
               check: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def value(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def run(model: onnx.ModelProto, path, feed) -> dict[str, np.ndarray]:
    onnx.save(model, str(path))
    with open_adapter(path, "ort-cpu") as session:
        return session.run(feed)


def axes_of(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "axes"), None)


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 4])


def reduce_model(axes_source: str) -> onnx.ModelProto:
    """y = ReduceMax(x, axes=[1], keepdims=1); z = ReduceMean(y, axes=[-1], keepdims=0)."""
    nodes, inits = [], []
    if axes_source == "initializer":
        inits = [numpy_helper.from_array(np.array([1], np.int64), "axes_max"),
                 numpy_helper.from_array(np.array([-1], np.int64), "axes_mean")]
    else:
        nodes = [helper.make_node("Constant", [], ["axes_max"],
                                  value=numpy_helper.from_array(np.array([1], np.int64))),
                 helper.make_node("Constant", [], ["axes_mean"],
                                  value=numpy_helper.from_array(np.array([-1], np.int64)))]
    nodes += [
        helper.make_node("ReduceMax", ["x", "axes_max"], ["y"], name="max", keepdims=1),
        helper.make_node("ReduceMean", ["y", "axes_mean"], ["z"], name="mean", keepdims=0),
    ]
    outputs = [value("y", ["batch", 1, 4]), value("z", ["batch", 1])]
    return make_model(nodes, [X], outputs, inits)


@pytest.mark.parametrize("axes_source", ["initializer", "constant"])
def test_reduce_axes_become_attributes(tmp_path, axes_source):
    model = reduce_model(axes_source)
    low = downgrade_to_opset17(model)

    assert [(op.domain, op.version) for op in low.opset_import] == [("", 17)]
    reduces = {n.name: n for n in low.graph.node if n.op_type.startswith("Reduce")}
    assert [list(n.input) for n in reduces.values()] == [["x"], ["y"]]
    assert axes_of(reduces["max"]) == [1] and axes_of(reduces["mean"]) == [-1]
    onnx.checker.check_model(low, full_check=True)
    assert model.opset_import[0].version == 18  # the input model is left alone

    x = np.random.default_rng(0).standard_normal((3, 6, 4)).astype(np.float32)
    before = run(model, tmp_path / "m18.onnx", {"x": x})
    after = run(low, tmp_path / "m17.onnx", {"x": x})
    np.testing.assert_array_equal(after["y"], before["y"])
    np.testing.assert_array_equal(after["z"], before["z"])
    np.testing.assert_allclose(after["y"], x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(after["z"], x.max(axis=1).mean(axis=-1, keepdims=True), rtol=1e-6)


def test_reduce_inside_if_branches_is_downgraded(tmp_path):
    def branch(name: str, axis: int) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_axes"],
                              value=numpy_helper.from_array(np.array([axis], np.int64))),
             helper.make_node("ReduceMax", ["x", f"{name}_axes"], [f"{name}_out"], keepdims=0)],
            name, [], [value(f"{name}_out", ["batch", None])])

    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    model = make_model(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", 1),
                          else_branch=branch("else", 2))],
        [X, flag], [value("y", ["batch", None])])
    low = downgrade_to_opset17(model)
    branches = {a.name: a.g for a in low.graph.node[0].attribute}
    reduce_axes = {name: [axes_of(n) for n in g.node if n.op_type == "ReduceMax"]
                   for name, g in branches.items()}
    assert reduce_axes == {"then_branch": [[1]], "else_branch": [[2]]}

    x = np.random.default_rng(1).standard_normal((2, 6, 4)).astype(np.float32)
    for flag_value, axis in ((True, 1), (False, 2)):
        got = run(low, tmp_path / "if17.onnx", {"x": x, "flag": np.array(flag_value)})["y"]
        np.testing.assert_array_equal(got, x.max(axis=axis))


def test_split_num_outputs_becomes_sizes(tmp_path):
    model = make_model(
        [helper.make_node("Split", ["x"], ["a", "b", "c"], name="split", axis=1, num_outputs=3)],
        [X], [value(n, ["batch", 2, 4]) for n in "abc"])
    low = downgrade_to_opset17(model)
    split = low.graph.node[0]
    assert "num_outputs" not in {a.name for a in split.attribute}
    sizes = {t.name: numpy_helper.to_array(t) for t in low.graph.initializer}[split.input[1]]
    assert sizes.tolist() == [2, 2, 2]
    x = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
    got = run(low, tmp_path / "split17.onnx", {"x": x})
    for i, name in enumerate("abc"):
        np.testing.assert_array_equal(got[name], x[:, 2 * i:2 * i + 2])


def test_reduce_axes_computed_at_run_time_is_an_error():
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    model = make_model([helper.make_node("ReduceMax", ["x", "axes"], ["y"], name="dyn_max")],
                       [X, axes], [value("y", [None, None, None])])
    with pytest.raises(UserError) as info:
        downgrade_to_opset17(model)
    assert info.value.stage == "lower"
    assert "'dyn_max'" in str(info.value) and "computed at run time" in str(info.value)
    assert "--opset 18" in info.value.hint


def test_split_over_a_dynamic_axis_is_an_error():
    model = make_model(
        [helper.make_node("Split", ["x"], ["a", "b"], name="dyn_split", axis=0, num_outputs=2)],
        [X], [value(n, [None, 6, 4]) for n in "ab"])
    with pytest.raises(UserError, match="dyn_split"):
        downgrade_to_opset17(model)


def test_count_ops_walks_if_branches():
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Attention", ["q", "k", "v"], [f"{name}_out"])], name, [],
            [value(f"{name}_out", [1, 2, 3, 4])])

    qkv = [value(n, [1, 2, 3, 4]) for n in "qkv"]
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    model = make_model(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"),
                          else_branch=branch("else")),
         helper.make_node("MultiHeadAttention", ["y", "y", "y"], ["z"], domain="com.microsoft",
                          num_heads=2)],
        [*qkv, flag], [value("z", None)], opset=23, check=False)  # structure only
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    assert sum(n.op_type == "Attention" for n in model.graph.node) == 0  # top level only
    ops = count_ops(model)
    assert ops["Attention"] == 2 and ops["If"] == 1
    assert ops["com.microsoft::MultiHeadAttention"] == 1
    assert fused_attention_count(model, "onnx") == 2
    assert fused_attention_count(model, "ort") == 1
    assert fused_attention_count(model, "decomposed") == 0

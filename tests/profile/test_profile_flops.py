"""FLOP counting from the graph (qcrun.flops): exact counts on hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qcrun.flops import (
    attention_flops,
    count_flops,
    eval_dim,
    matmul_flops,
    mha_flops,
    observe_shapes,
)


def _model(nodes, inputs, outputs, initializers=(), opset=23, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _info(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_formulas():
    assert matmul_flops([2, 3, 4, 5], [5, 6]) == 2 * 2 * 3 * 4 * 5 * 6
    assert matmul_flops([7, 1, 4, 5], [3, 5, 6]) == 2 * 7 * 3 * 4 * 5 * 6  # broadcast batch
    assert matmul_flops([5], [5, 6]) == 2 * 5 * 6
    assert attention_flops([1, 4, 10, 16], [1, 4, 20, 16], [1, 4, 20, 8]) == 2 * 4 * 10 * 20 * 24
    # 3-D with grouped queries: 8 query heads of 16 over 2 kv heads
    assert attention_flops([2, 10, 128], [2, 20, 32], [2, 20, 32], q_num_heads=8,
                           kv_num_heads=2) == 2 * 2 * 8 * 10 * 20 * (16 + 16)
    assert attention_flops([1, 1, 1, 8], [1, 1, 3, 8], [1, 1, 3, 8], past_length=5) == (
        2 * 1 * 1 * 1 * 8 * 16)
    assert mha_flops([1, 32, 768], [1, 257, 768], [1, 257, 768], 12) == 2 * 32 * 257 * 1536
    assert mha_flops([1, 32, 768], [1, 12, 257, 64], [1, 12, 257, 64], 12) == (
        2 * 32 * 257 * 1536)


def test_matmul_graph_exact_count(lib):
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        [_info("x", ["batch", "tokens", 8])],
        [_info("y", ["batch", "tokens", 6])],
        [numpy_helper.from_array(np.zeros((8, 6), np.float32), "w")],
    )
    count = count_flops(model, {"x": (3, 257, 8)})
    assert count.total == 2 * 3 * 257 * 8 * 6
    assert count.exact
    assert count.by_op_type == {"MatMul": 2 * 3 * 257 * 8 * 6}
    assert [(n.name, n.op_type) for n in count.nodes] == [("proj", "MatMul")]


def test_attention_graph_exact_count(lib, tmp_path):
    model = lib.attention_graph_model()
    for batch, tokens in ((1, 5), (2, 257), (1, 4097)):
        count = count_flops(model, {"queries": (batch, 2, 4, 8), "visual": (batch, 2, tokens, 8)})
        assert count.total == lib.expected_attention_flops(batch, tokens)
        assert count.by_op_type["Attention"] == 2 * batch * 2 * 4 * tokens * 16
        assert count.exact
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert count_flops(path, {"queries": (1, 2, 4, 8), "visual": (1, 2, 33, 8)}).total == (
        lib.expected_attention_flops(1, 33))


def test_gemm_conv_and_mha():
    gemm = _model(
        [helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1)],
        [_info("a", [5, 7])],
        [_info("y", [5, 3])],
        [numpy_helper.from_array(np.zeros((3, 7), np.float32), "b"),
         numpy_helper.from_array(np.zeros(3, np.float32), "c")],
        opset=17,
    )
    assert count_flops(gemm, {"a": (5, 7)}).total == 2 * 5 * 7 * 3

    conv = _model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [_info("x", [1, 3, 32, 32])],
        [_info("y", [1, 16, 32, 32])],
        [numpy_helper.from_array(np.zeros((16, 3, 3, 3), np.float32), "w")],
        opset=17,
    )
    assert count_flops(conv, {"x": (1, 3, 32, 32)}).total == 2 * 16 * 32 * 32 * 3 * 9

    mha = _model(
        [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                          num_heads=4)],
        [_info("q", [1, "queries", 64]), _info("k", [1, "tokens", 64]),
         _info("v", [1, "tokens", 64])],
        [_info("y", [1, "queries", 64])],
        domains=["com.microsoft"],
    )
    count = count_flops(mha, {"q": (1, 32, 64), "k": (1, 257, 64), "v": (1, 257, 64)})
    assert count.total == 2 * 32 * 257 * 128
    assert count.by_op_type == {"MultiHeadAttention": 2 * 32 * 257 * 128}


def _if_model():
    """y = If(flag, then: Attention(q, k, v) @ wo, else: q @ wo): the branches differ."""
    wo = numpy_helper.from_array(np.eye(8, dtype=np.float32), "wo")
    then_graph = helper.make_graph(
        [helper.make_node("Attention", ["q", "k", "v"], ["a"], name="then_attn"),
         helper.make_node("MatMul", ["a", "wo"], ["t_out"], name="then_proj")],
        "then", [], [_info("t_out", None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["q", "wo"], ["e_out"], name="else_proj")],
        "else", [], [_info("e_out", None)],
    )
    return _model(
        [helper.make_node("If", ["flag"], ["y"], name="route", then_branch=then_graph,
                          else_branch=else_graph)],
        [_info("flag", [], TensorProto.BOOL), _info("q", [1, 2, 4, 8]),
         _info("k", [1, 2, "tokens", 8]), _info("v", [1, 2, "tokens", 8])],
        [_info("y", None)],
        [wo],
    )


def test_attention_inside_if_counts_the_branch_that_ran(tmp_path):
    path = tmp_path / "if.onnx"
    onnx.save(_if_model(), str(path))
    attention = 2 * 2 * 4 * 33 * 16
    proj = 2 * 2 * 4 * 8 * 8
    shapes = {"flag": (), "q": (1, 2, 4, 8), "k": (1, 2, 33, 8), "v": (1, 2, 33, 8)}

    static = count_flops(path, shapes)  # no run: the costlier branch, as an upper bound
    assert static.total == attention + proj
    assert not static.exact
    assert "upper bound" in static.branches[0]

    rng = np.random.default_rng(0)
    feed = {"q": rng.standard_normal((1, 2, 4, 8), dtype=np.float32),
            "k": rng.standard_normal((1, 2, 33, 8), dtype=np.float32),
            "v": rng.standard_normal((1, 2, 33, 8), dtype=np.float32)}
    ran_then = count_flops(path, observed=observe_shapes(path, {**feed, "flag": np.array(True)}))
    assert ran_then.total == attention + proj
    assert ran_then.by_op_type == {"Attention": attention, "MatMul": proj}
    assert ran_then.exact and "then_branch ran" in ran_then.branches[0]
    ran_else = count_flops(path, observed=observe_shapes(path, {**feed, "flag": np.array(False)}))
    assert ran_else.total == proj
    assert ran_else.exact and "else_branch ran" in ran_else.branches[0]


def test_unknown_shapes_are_listed_not_guessed():
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("MatMul", ["r", "w"], ["y"], name="after_reshape")],
        [_info("x", ["n", 8]), _info("shape", [2], TensorProto.INT64)],
        [_info("y", None)],
        [numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")],
    )
    count = count_flops(model, {"x": (6, 8), "shape": (2,)})
    assert count.total == 0
    assert not count.exact
    assert count.unresolved == ["after_reshape (MatMul)"]


def test_symbolic_dims_written_by_the_exporter():
    assert eval_dim("text + 8", {"text": 6}) == 14
    assert eval_dim("2*tokens - 1", {"tokens": 257}) == 513
    assert eval_dim("Max(1, tokens//4)", {"tokens": 257}) == 64
    assert eval_dim("unk__3", {"tokens": 257}) is None
    assert eval_dim("__import__('os')", {}) is None


@pytest.mark.parametrize("tokens", [17, 1025])
def test_observed_and_inferred_counts_agree_on_a_plain_graph(lib, tmp_path, tokens):
    path = tmp_path / "m.onnx"
    onnx.save(lib.attention_graph_model(), str(path))
    rng = np.random.default_rng(1)
    feed = {"queries": rng.standard_normal((1, 2, 4, 8), dtype=np.float32),
            "visual": rng.standard_normal((1, 2, tokens, 8), dtype=np.float32)}
    observed = count_flops(path, observed=observe_shapes(path, feed))
    assert observed.shapes_from == "observed"
    assert observed.total == lib.expected_attention_flops(1, tokens)

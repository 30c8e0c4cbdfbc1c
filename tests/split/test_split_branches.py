"""The split of a model with ``If`` branches taken on the query: the branches' context-only
heavy work (their visual keys and values) moves to the context graph, and the pair stays exact
for every branch choice."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import qcrun
import torch
from onnx import TensorProto, helper, numpy_helper
from qcrun.files import read_model_dir
from qcrun.graphs import all_graphs

from qcexport import mechanisms
from qcexport.split.graph import split_graph
from qcexport.split.hoist import hoist_branches
from qcexport.split.model_dir import CONTEXT_FILE, QUERY_FILE, split_model_dir

FP32_ATOL = 1e-5  # as tests/split/test_split.py: tighter than the fp32 policy's bound
TARGETS = ["ort-cpu", "openvino-cpu"]


def _matmuls(graph: onnx.GraphProto, *, branches_only: bool = False) -> int:
    graphs = list(all_graphs(graph))[1:] if branches_only else all_graphs(graph)
    return sum(n.op_type == "MatMul" for g in graphs for n in g.node)


# --- a constructed model: an If whose branches project an outer context value -------------


def _branch(name: str, seed: int) -> onnx.GraphProto:
    """k = img @ W (W a branch initializer named like the main graph's), then the query's
    scores against k; both branches use the same node, value and initializer names."""
    w = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["img", "W"], ["k"], name="proj"),  # context: moves out
        helper.make_node("Transpose", ["k"], ["kt"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q3", "kt"], ["scores"], name="score"),  # query: stays
        helper.make_node("MatMul", ["q3", "W"], ["qw"], name="qproj"),  # query, reads W
        helper.make_node("ReduceSum", ["qw"], ["qs"], name="qsum", keepdims=1),
        helper.make_node("Add", ["scores", "qs"], ["y_" + name], name="out"),
    ]
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info("y_" + name, TensorProto.FLOAT,
                                                     [1, 1, "tokens"])],
        initializer=[numpy_helper.from_array(w, "W")])


def _model_with_if() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Relu", ["image"], ["img"]),
        helper.make_node("MatMul", ["img", "W"], ["main_k"]),  # the main graph's own W
        helper.make_node("ReduceMean", ["main_k", "one"], ["pooled"], keepdims=0),
        helper.make_node("Unsqueeze", ["q", "one"], ["q3"]),
        helper.make_node("If", ["choice"], ["y"], name="route", then_branch=_branch("a", 1),
                         else_branch=_branch("b", 2)),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, "tokens", 4]),
         helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("choice", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "tokens"]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(w, "W"),
                     numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return dict(zip([o.name for o in session.get_outputs()],
                    session.run(None, {k: v for k, v in feed.items() if k in names}),
                    strict=True))


def test_branch_projection_of_a_context_value_moves_out_and_the_split_is_exact():
    model = _model_with_if()
    before = model.SerializeToString()
    parts = split_graph(model, ["image"])
    assert model.SerializeToString() == before  # the single graph is left as it was
    # the main graph's MatMul and both branches' projections of the image are context work;
    # the query's MatMuls stay in their branches
    assert _matmuls(parts.context.graph) == 3
    assert _matmuls(parts.query.graph, branches_only=True) == 4
    assert all(n.op_type != "If" for n in parts.context.graph.node)
    onnx.checker.check_model(parts.context)
    onnx.checker.check_model(parts.query)
    g = np.random.default_rng(3)
    image = g.standard_normal((1, 7, 4)).astype(np.float32)
    context = _run(parts.context, {"image": image})
    for choice in (True, False):
        feed = {"image": image, "q": g.standard_normal((1, 4)).astype(np.float32),
                "choice": np.array(choice)}
        whole = _run(model, feed)
        pair = _run(parts.query, {**feed, **context})
        for name, value in whole.items():
            np.testing.assert_allclose(pair[name], value, atol=FP32_ATOL, rtol=0)
    # the two branches' weights, both named W like the main graph's, kept their values: the
    # branches differ (a mix-up of the three would make them agree with each other)
    feed = {"image": image, "q": np.ones((1, 4), np.float32)}
    a = _run(parts.query, {**feed, **context, "choice": np.array(True)})["y"]
    b = _run(parts.query, {**feed, **context, "choice": np.array(False)})["y"]
    assert not np.allclose(a, b)


def test_only_context_only_work_leaves_a_branch():
    model = _model_with_if()
    # with q as the context, the image is the query: only the projection of q moves
    hoisted = hoist_branches(model, ["q"])
    left = [n.name for g in list(all_graphs(hoisted.graph))[1:] for n in g.node
            if n.op_type == "MatMul"]
    assert sorted(left) == ["proj", "proj", "score", "score"]
    # an If taken on the context is context work whole: nothing moves out of it
    same = hoist_branches(model, ["image", "choice"])
    assert _matmuls(same.graph, branches_only=True) == 6


# --- routing: hard routing, If per layer (global | (local | mlp)) -------------------------


@pytest.fixture(scope="module")
def routing_split(tiny_models, tmp_path_factory):
    dest = tmp_path_factory.mktemp("split") / "routing"
    tiny_models.copy(dest, "routing")
    split_model_dir(dest)  # verifies the pair against the single graph and eager (ort-cpu)
    return dest


@pytest.mark.slow
def test_routing_context_graph_holds_every_branch_projection(routing_split):
    whole = onnx.load(str(routing_split / "model.onnx"), load_external_data=False)
    context = onnx.load(str(routing_split / CONTEXT_FILE), load_external_data=False)
    query = onnx.load(str(routing_split / QUERY_FILE), load_external_data=False)
    layers = mechanisms.get("routing").config("tiny").layers
    # Layer 0 reads the learned queries (constants), not the task: all of its branches are
    # image-only work and every MatMul of them moves (q, k, v and out of the global and the
    # local attention, the mlp's two). Later layers read the previous layer's output, which
    # depends on the task's choice: only their attentions' keys and values (4) move.
    moved = (4 + 4 + 2) + 4 * (layers - 1)
    in_branches = _matmuls(whole.graph, branches_only=True)
    assert _matmuls(whole.graph) == in_branches  # routing's main graph has Gemms, no MatMul
    assert _matmuls(context.graph, branches_only=True) == 0
    assert _matmuls(context.graph) == moved
    assert _matmuls(query.graph) == _matmuls(query.graph, branches_only=True) \
        == in_branches - moved  # each MatMul is on one side only: none lost, none doubled
    # what crosses is the projections, not the normalised image the branches read the token
    # count of (a shape read left in a branch would make it cross for one integer)
    width = mechanisms.get("routing").config("tiny").vision_dim
    cut = read_model_dir(routing_split).manifest.split
    assert [b.name for b in cut.boundary if "tokens" in b.shape and b.shape[-1] == width] == []


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_routing_pair_is_exact_for_every_branch_choice(routing_split, target):
    ok, why = qcrun.engines.availability(target)
    if not ok:
        pytest.skip(why)
    spec = mechanisms.get("routing")
    config = spec.config("tiny")
    module = mechanisms.create("routing", "tiny")
    seen = []
    with qcrun.load(routing_split, target=target) as model:
        for case in (*spec.golden_cases, spec.verify_case):
            tensors = spec.inputs(config, case)
            feed = {k: v.numpy() for k, v in tensors.items()}
            ctx = model.encode(**{k: feed[k] for k in spec.context_inputs})
            pair = model.query(ctx, task_embedding=feed["task_embedding"])
            whole = model(**feed)
            with torch.no_grad():
                eager = dict(zip(spec.output_names, module(**tensors), strict=True))
            for name, ref in eager.items():
                np.testing.assert_allclose(pair[name], whole[name], atol=FP32_ATOL, rtol=0)
                np.testing.assert_allclose(pair[name], ref.numpy(), atol=FP32_ATOL, rtol=1e-4)
            seen.append((case, tensors, eager))
    # the cases took every branch of every layer, on the pair as in eager
    assert spec.golden_check(module, seen) == []

"""Observation must not change the answer: a graph whose result depends on whether ORT fuses a
decomposed LayerNorm, so that exposing one of its intermediates changes the final output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qcrun.localize import Case, format_table, localize, observation_bound
from qcrun.parity import Tolerance, TolerancePolicy, compare

D = 64
SCALE = 1e4  # the (fused - decomposed) difference is ~1e-7: made visible to the policy
rng = np.random.default_rng(0)
GAIN = rng.standard_normal(D).astype(np.float32)
BIAS = rng.standard_normal(D).astype(np.float32)
X = (rng.standard_normal((2, 8, D)) * 3 + 1).astype(np.float32)


def _node(op, inputs, outputs, module, **attrs):
    node = helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)
    scopes = ["", *[".".join(module.split(".")[:i + 1]) for i in range(module.count(".") + 1)],
              op.lower()]
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
    return node


def _model(path: Path, scale: float = SCALE) -> Path:
    """``head((norm_a(x) - norm_b(x)) * SCALE)``: ``norm_a`` the decomposed LayerNorm (its
    centring a child module, so its output leaves the child and gets exposed), ``norm_b``
    a LayerNormalization node with the same weights."""
    consts = {"ax": np.array([-1], np.int64), "two": np.array(2.0, np.float32),
              "eps": np.array(1e-5, np.float32), "scale": np.array(scale, np.float32),
              "norm_a.weight": GAIN, "norm_a.bias": BIAS, "norm_b.weight": GAIN,
              "norm_b.bias": BIAS}
    nodes = [
        _node("ReduceMean", ["x", "ax"], ["mu"], "norm_a.center"),
        _node("Sub", ["x", "mu"], ["xc"], "norm_a.center"),
        _node("Pow", ["xc", "two"], ["sq"], "norm_a"),
        _node("ReduceMean", ["sq", "ax"], ["var"], "norm_a"),
        _node("Add", ["var", "eps"], ["ve"], "norm_a"),
        _node("Sqrt", ["ve"], ["sd"], "norm_a"),
        _node("Div", ["xc", "sd"], ["nx"], "norm_a"),
        _node("Mul", ["nx", "norm_a.weight"], ["ng"], "norm_a"),
        _node("Add", ["ng", "norm_a.bias"], ["a"], "norm_a"),
        _node("LayerNormalization", ["x", "norm_b.weight", "norm_b.bias"], ["b"], "norm_b",
              axis=-1, epsilon=1e-5),
        _node("Sub", ["a", "b"], ["d"], "head"),
        _node("Mul", ["d", "scale"], ["y"], "head"),
    ]
    graph = helper.make_graph(
        nodes, "observed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, D])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def _layer_norm(x):
    x = x.astype(np.float64)
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * GAIN + BIAS


class _Exact:
    """The modules' values in float64: the mathematically exact answer."""

    name = "float64 numpy"

    def __init__(self):
        centred = X - X.mean(-1, keepdims=True, dtype=np.float64)
        self._values = {"norm_a.center": centred, "norm_a": _layer_norm(X),
                        "norm_b": _layer_norm(X), "head": np.zeros_like(centred)}

    def order(self, case):
        return list(self._values)

    def nbytes(self, case, module):
        return self._values[module].size * 4

    def values(self, case, modules):
        return {m: self._values[m].astype(np.float32) for m in modules}


POLICY = TolerancePolicy(defaults={"fp32": Tolerance(1e-4, 1e-4, 0.99999)},
                         use_target_settings=False)


def test_exposing_an_intermediate_unfuses_the_layer_norm_on_ort(tmp_path):
    """The premise, checked on the real engine: ORT fuses the decomposition (the output is
    exactly 0); once ``xc`` is a graph output it cannot, and the output moves."""
    from qcrun.engines import adapter_for

    path = _model(tmp_path / "m.onnx")
    with adapter_for(path, "ort-cpu").load() as adapter:
        fused = adapter.run({"x": X})["y"]
    exposed = onnx.load(str(path))
    exposed.graph.output.append(helper.make_tensor_value_info("xc", TensorProto.FLOAT, None))
    onnx.save(exposed, str(tmp_path / "exposed.onnx"))
    with adapter_for(tmp_path / "exposed.onnx", "ort-cpu").load() as adapter:
        observed = adapter.run({"x": X})["y"]
    assert np.abs(fused).max() == 0.0
    bound = observation_bound(POLICY.resolve("fp32", "ort-cpu"))
    assert not compare(observed, fused, bound).passed  # beyond the observation bound


def test_fusion_change_triggers_bisection(tmp_path):
    path = _model(tmp_path / "m.onnx")
    case = Case("c0", {"x": X}, {"y": np.zeros((2, 8, D), np.float32)})
    report = localize(path, ["ort-cpu", "onnx-reference"], [case], _Exact(), POLICY, "fp32")
    ort, ref = report.targets
    assert ort.method == "bisection", format_table(report)
    assert "moved output 'y'" in ort.observation
    # run as deployed (fused), nothing diverges; the reference evaluator never fuses, so it
    # is observed directly and its own decomposition error at the head is the divergence
    assert ort.final_passed is True and ort.first is None, format_table(report)
    assert ref.method == "exposed", format_table(report)


@pytest.mark.parametrize("force", [False, True])
def test_observation_within_the_bound_keeps_the_exposed_run(tmp_path, force):
    """Without the amplification the same unfusing moves the output by ~1e-7: far inside a
    tenth of the fp32 policy, so the exposed run is trusted."""
    path = _model(tmp_path / "m.onnx", scale=1.0)
    case = Case("c0", {"x": X}, {"y": np.zeros((2, 8, D), np.float32)})
    report = localize(path, ["ort-cpu"], [case], _Exact(), POLICY, "fp32",
                      force_bisection=["ort-cpu"] if force else ())
    (ort,) = report.targets
    assert ort.method == ("bisection" if force else "exposed"), format_table(report)
    assert ort.first is None and ort.final_passed is True, format_table(report)

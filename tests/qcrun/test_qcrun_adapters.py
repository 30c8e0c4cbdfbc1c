"""Adapters on the real engines: lifecycle, metadata, results and feed validation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper
from qcrun.engines import LoadFailed, TargetUnavailable, TensorInfo, adapter_for, open_adapter
from qcrun.engines.ort import OrtAdapter
from qcrun.engines.ov import OpenVinoAdapter
from qcrun.engines.reference import ReferenceAdapter
from qcrun.errors import UserError

CPU_TARGETS = ("ort-cpu", "openvino-cpu", "onnx-reference")
# OpenVINO keeps no names for dynamic axes.
SYMBOLIC = {"ort-cpu": ("batch", "tokens"), "openvino-cpu": (None, None)}
SYMBOLIC["onnx-reference"] = SYMBOLIC["ort-cpu"]


@pytest.fixture
def x():
    return np.random.default_rng(7).standard_normal((2, 5, 8)).astype(np.float32)


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_adapter_runs_the_model(linear, x, target):
    with open_adapter(linear.model, target) as adapter:
        batch, tokens = SYMBOLIC[target]
        assert adapter.inputs[0].name == "x" and adapter.inputs[0].dtype == "float32"
        assert adapter.inputs[0].shape == (batch, tokens, 8)
        assert [o.name for o in adapter.outputs] == ["tokens", "pooled"]
        assert [o.dtype for o in adapter.outputs] == ["float32", "float32"]
        result = adapter.run({"x": x})
        assert list(result) == ["tokens", "pooled"]
        for name, want in linear_outputs(linear, x).items():
            assert result[name].shape == want.shape
            np.testing.assert_allclose(result[name], want, atol=1e-5, rtol=1e-5)
        # a second run with another token count uses the dynamic axes
        again = adapter.run({"x": x[:1, :2]})
        assert again["pooled"].shape == (1, 6)
    assert not adapter.is_loaded


def linear_outputs(linear, x):
    tokens = x.astype(np.float64) @ linear.weights["w"] + linear.weights["b"]
    return {"tokens": tokens, "pooled": tokens.mean(axis=1)}


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_attention_model_runs_on_every_cpu_engine(attention, target):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 11, 8)).astype(np.float32)
    with open_adapter(attention.model, target) as adapter:
        got = adapter.run({"queries": q, "visual": v})["attended"]
    k_, v_ = v @ attention.weights["wk"], v @ attention.weights["wv"]
    scores = q @ np.swapaxes(k_, -1, -2) / np.sqrt(8)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = (probs / probs.sum(-1, keepdims=True)) @ v_
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    "target, cls",
    [
        ("ort-cpu", OrtAdapter),
        ("openvino-cpu", OpenVinoAdapter),
        ("onnx-reference", ReferenceAdapter),
    ],
)
def test_init_stores_and_load_does_the_work(linear, target, cls):
    adapter = adapter_for(
        linear.model, target, **({"intra_op_threads": 1} if cls is OrtAdapter else {})
    )
    assert isinstance(adapter, cls) and not adapter.is_loaded
    with pytest.raises(RuntimeError, match="call load"):
        _ = adapter.inputs
    assert adapter.load() is adapter and adapter.is_loaded
    assert adapter.load() is adapter  # idempotent
    adapter.close()
    adapter.load()  # loadable again after close
    assert adapter.inputs[0].name == "x"
    adapter.close()


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize(
    "feed, message",
    [
        ({}, "input 'x' is missing"),
        (
            {"x": np.zeros((1, 2, 8), np.float32), "mask": np.zeros(2)},
            "input 'mask' is not an input of the model",
        ),
        ({"x": np.zeros((1, 2, 8))}, "input 'x' has dtype float64, expected float32"),
        (
            {"x": np.zeros((2, 8), np.float32)},
            "input 'x' has rank 2 (shape [2, 8]), expected rank 3",
        ),
        ({"x": np.zeros((1, 2, 7), np.float32)}, "input 'x' axis 2 has size 7, expected 8"),
    ],
)
def test_feed_mismatches_name_the_input(linear, target, feed, message):
    with open_adapter(linear.model, target) as adapter:
        with pytest.raises(UserError) as e:
            adapter.run(feed)
    text = str(e.value)
    assert message in text
    assert f"feed does not match model.onnx on {target}" in text
    assert "the model expects x float32[" in text


def test_openvino_matches_inputs_through_every_port_name(tmp_path):
    # k passes through a no-op Cast: OpenVINO merges the Cast's output name into the input.
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["k"], ["k_cast"], to=TensorProto.FLOAT),
            helper.make_node("Attention", ["q", "k_cast", "k_cast"], ["y"]),
        ],
        "cast",
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", 2, 3, 4]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", 2, "tokens", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 3, 4])],
    )
    path = tmp_path / "cast.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]), path)
    rng = np.random.default_rng(0)
    feed = {
        "q": rng.standard_normal((1, 2, 3, 4)).astype(np.float32),
        "k": rng.standard_normal((1, 2, 6, 4)).astype(np.float32),
    }
    with open_adapter(path, "openvino-cpu") as ov, open_adapter(path, "ort-cpu") as ort:
        assert [i.name for i in ov.inputs] == ["q", "k"]
        k_info = ov.inputs[1]
        assert isinstance(k_info, TensorInfo) and "k_cast" in k_info.aliases
        got = ov.run(feed)
        np.testing.assert_allclose(got["y"], ort.run(feed)["y"], atol=1e-6)
        # the merged name is accepted too
        by_alias = ov.run({"q": feed["q"], "k_cast": feed["k"]})
        np.testing.assert_array_equal(by_alias["y"], got["y"])


def test_openvino_accuracy_hint_is_set(linear):
    with open_adapter(linear.model, "openvino-cpu") as adapter:
        assert str(adapter._compiled.get_property("EXECUTION_MODE_HINT")).endswith("ACCURACY")
    with open_adapter(linear.model, "openvino-cpu", accuracy=False) as adapter:
        assert str(adapter._compiled.get_property("EXECUTION_MODE_HINT")).endswith("PERFORMANCE")


def test_unavailable_target_says_why(linear):
    from qcrun.engines import availability

    ok, reason = availability("ort-cuda")
    if ok:  # a CUDA host: the session really runs on CUDA
        with open_adapter(linear.model, "ort-cuda") as adapter:
            assert adapter.run({"x": np.ones((1, 3, 8), np.float32)})
        return
    assert "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    with pytest.raises(TargetUnavailable) as e:
        open_adapter(linear.model, "ort-cuda")
    assert "target ort-cuda is unavailable" in str(e.value)
    assert reason in str(e.value) and "no CUDAExecutionProvider" in reason
    assert isinstance(e.value, UserError)


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_load_failure_names_target_and_engine(tmp_path, target):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(LoadFailed) as e:
        open_adapter(path, target)
    engine = {"ort-cpu": "onnxruntime", "openvino-cpu": "openvino"}.get(target, "onnx-reference")
    assert str(e.value).startswith(f"load: {target}: {engine} could not load {path}: ")
    assert len(str(e.value)) > len(f"load: {target}: {engine} could not load {path}: ")


def test_bad_options_and_missing_files(linear, tmp_path):
    with pytest.raises(UserError) as e:
        open_adapter(linear.model, "ort-cpu", threads=2)
    assert "unknown onnxruntime option 'threads'" in str(e.value)
    assert "intra_op_threads" in str(e.value)
    with pytest.raises(UserError, match="valid graph optimization levels: all, basic"):
        open_adapter(linear.model, "ort-cpu", graph_optimization_level="max")
    with pytest.raises(UserError, match="model file .*missing.onnx does not exist"):
        open_adapter(tmp_path / "missing.onnx", "openvino-cpu")


def test_session_options_reach_onnxruntime(linear):
    with open_adapter(
        linear.model, "ort-cpu", intra_op_threads=1, graph_optimization_level="disable"
    ) as adapter:
        options = adapter._session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert (
            options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        )


def test_tensorrt_providers_are_built_from_the_model_inputs(linear, tmp_path):
    # No TensorRT needed: the profile comes from a CPU session reading the model's inputs.
    feeds = [{"x": np.zeros((1, 3, 8), np.float32)}, {"x": np.zeros((2, 17, 8), np.float32)}]
    adapter = adapter_for(
        linear.model, "jetson-orin", cache_dir=tmp_path / "c", profile_feeds=feeds
    )
    providers = adapter._providers(onnxruntime)
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_profile_min_shapes"] == "x:1x3x8"
    assert options["trt_profile_opt_shapes"] == "x:2x17x8"
    assert options["trt_profile_max_shapes"] == "x:2x17x8"
    assert options["trt_fp16_enable"] == "True"
    assert options["trt_max_workspace_size"] == str(2 << 30)
    assert options["trt_engine_cache_path"] == str(tmp_path / "c" / "trt-engines")
    assert (tmp_path / "c" / "trt-engines").is_dir() and (tmp_path / "c" / "trt-timing").is_dir()

    explicit = adapter_for(
        linear.model,
        "ort-tensorrt",
        cache_dir=tmp_path / "c",
        profile_shapes={"batch": (1, 1, 8), "tokens": (1, 64, 576)},
    )
    name, options = explicit._providers(onnxruntime)[0]
    assert options["trt_profile_max_shapes"] == "x:8x576x8"
    assert options["trt_fp16_enable"] == "False"
    with pytest.raises(UserError, match="input 'x' axis 0 \\('batch'\\) has no min/opt/max range"):
        adapter_for(linear.model, "ort-tensorrt", cache_dir=tmp_path / "c")._providers(onnxruntime)

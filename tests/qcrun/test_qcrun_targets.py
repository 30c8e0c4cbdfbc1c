"""Targets, availability on this machine, and TensorRT provider options."""

from __future__ import annotations

import dataclasses

import onnx
import onnxruntime
import openvino
import pytest
from onnx import TensorProto, helper
from qcrun.engines import availability
from qcrun.engines.ort import PROBE_MODEL
from qcrun.errors import UserError
from qcrun.targets import (
    axis_ranges_from_shapes,
    default_cache_dir,
    get_target,
    list_targets,
    target_names,
    tensorrt_provider_options,
)

ALL = [
    "ort-cpu",
    "ort-cuda",
    "ort-tensorrt",
    "jetson-orin",
    "openvino-cpu",
    "openvino-gpu",
    "onnx-reference",
]


def test_every_target_is_listed_once_in_order():
    assert target_names() == ALL
    assert [t.name for t in list_targets()] == ALL


@pytest.mark.parametrize(
    "name, forms, max_opset",
    [
        ("ort-cpu", ("onnx", "ort", "decomposed"), 23),
        ("ort-cuda", ("ort", "onnx", "decomposed"), 23),
        ("ort-tensorrt", ("decomposed",), 17),
        ("jetson-orin", ("decomposed",), 17),
        ("openvino-cpu", ("onnx", "ort", "decomposed"), 23),
        ("openvino-gpu", ("onnx", "ort", "decomposed"), 23),
        ("onnx-reference", ("onnx", "decomposed"), 23),
    ],
)
def test_attention_forms_and_opset(name, forms, max_opset):
    target = get_target(name)
    assert target.attention_forms == forms
    assert target.preferred_attention == forms[0]
    assert target.max_opset == max_opset
    for form in ("onnx", "ort", "decomposed"):
        assert target.accepts_attention(form) == (form in forms)


def test_engines_devices_and_providers():
    assert get_target("ort-cpu").providers == ("CPUExecutionProvider",)
    assert get_target("ort-cuda").providers[0] == "CUDAExecutionProvider"
    jetson = get_target("jetson-orin")
    assert jetson.providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert jetson.needs_shape_ranges and not get_target("ort-cuda").needs_shape_ranges
    assert jetson.options["trt_fp16"] is True and jetson.options["trt_cache"] is True
    assert get_target("ort-tensorrt").options["trt_fp16"] is False
    assert get_target("openvino-gpu").device == "GPU"
    assert get_target("openvino-cpu").options["accuracy"] is True
    assert get_target("onnx-reference").engine == "onnx-reference"


def test_targets_are_immutable():
    target = get_target("ort-cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.name = "other"
    with pytest.raises(TypeError):
        target.options["graph_optimization_level"] = "disable"
    hash(target)  # usable as a dict key


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(UserError) as e:
        get_target("ort-gpu")
    text = str(e.value)
    assert "unknown target 'ort-gpu'" in text
    for name in ALL:
        assert name in text
    assert "--target" in text


def test_probe_model_is_an_identity_model():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="qcrun"
    )
    assert PROBE_MODEL == model.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(PROBE_MODEL))


@pytest.mark.parametrize("name", ["ort-cpu", "openvino-cpu", "onnx-reference"])
def test_cpu_targets_are_available(name):
    ok, reason = availability(name)
    assert ok, reason
    engine_version = {
        "ort-cpu": onnxruntime.__version__,
        "openvino-cpu": openvino.__version__.split("-")[0],
        "onnx-reference": onnx.__version__,
    }[name]
    assert engine_version in reason


def test_ort_cuda_availability_says_why():
    installed = onnxruntime.get_available_providers()
    ok, reason = availability("ort-cuda")
    if ok:  # a CUDA host: a real session attached the provider
        assert "CUDAExecutionProvider" in installed and "with CUDAExecutionProvider" in reason
        return
    if "CUDAExecutionProvider" in installed:  # onnxruntime-gpu without working CUDA libraries
        assert "CUDAExecutionProvider" in reason and ("fell back" in reason
                                                      or "could not create" in reason)
        return
    assert "no CUDAExecutionProvider" in reason
    assert ", ".join(installed) in reason
    assert "install onnxruntime-gpu on a CUDA host" in reason


@pytest.mark.parametrize("name", ["ort-tensorrt", "jetson-orin"])
def test_tensorrt_targets_availability_says_why(name):
    ok, reason = availability(name)
    if ok:  # a TensorRT host: a real session attached the provider
        assert "TensorrtExecutionProvider" in reason
        return
    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        assert "TensorrtExecutionProvider" in reason and ("fell back" in reason
                                                          or "could not create" in reason)
        return
    assert "no TensorrtExecutionProvider" in reason and "TensorRT" in reason


def test_openvino_gpu_availability_matches_the_devices():
    devices = openvino.Core().available_devices
    ok, reason = availability("openvino-gpu")
    assert ok == any(d.split(".")[0] == "GPU" for d in devices)
    if not ok:
        assert "sees no GPU device" in reason
        assert f"available: {', '.join(devices)}" in reason


# --- TensorRT --------------------------------------------------------------------------------

INPUTS = {"x": ["batch", 16, 64], "mask": ["batch", "tokens"], "scale": [1]}
RANGES = {"batch": (1, 2, 4), "tokens": (16, 64, 256)}


def test_tensorrt_options_for_jetson_orin(tmp_path):
    jetson = get_target("jetson-orin")
    options = tensorrt_provider_options(
        INPUTS,
        RANGES,
        cache_dir=tmp_path / "cache",
        fp16=jetson.options["trt_fp16"],
        workspace_bytes=jetson.options["trt_workspace_bytes"],
    )
    assert options == {
        "trt_fp16_enable": "True",
        "trt_max_workspace_size": str(2 << 30),
        "trt_engine_cache_enable": "True",
        "trt_timing_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path / "cache" / "trt-engines"),
        "trt_timing_cache_path": str(tmp_path / "cache" / "trt-timing"),
        # static-only inputs ("scale") need no profile
        "trt_profile_min_shapes": "x:1x16x64,mask:1x16",
        "trt_profile_opt_shapes": "x:2x16x64,mask:2x64",
        "trt_profile_max_shapes": "x:4x16x64,mask:4x256",
    }
    assert not (tmp_path / "cache").exists()  # building options creates nothing


def test_tensorrt_options_without_cache_or_dynamic_inputs(tmp_path):
    options = tensorrt_provider_options({"x": [1, 3]}, {}, cache_dir=tmp_path, cache=False)
    assert options["trt_engine_cache_enable"] == "False"
    assert options["trt_fp16_enable"] == "False"
    assert not any(k.startswith("trt_profile") or k.endswith("_path") for k in options)


def test_tensorrt_options_name_a_missing_axis_range(tmp_path):
    with pytest.raises(UserError) as e:
        tensorrt_provider_options(INPUTS, {"batch": (1, 2, 4)}, cache_dir=tmp_path)
    text = str(e.value)
    assert "input 'mask' axis 1 ('tokens') has no min/opt/max range" in text
    assert "ranges given for: batch" in text
    assert "profile_shapes={'tokens': (min, opt, max)}" in text


def test_tensorrt_options_reject_unnamed_axes_and_bad_ranges(tmp_path):
    with pytest.raises(UserError, match="input 'x' axis 0 is dynamic but has no name"):
        tensorrt_provider_options({"x": [None, 4]}, {}, cache_dir=tmp_path)
    with pytest.raises(UserError, match=r"range for axis 'batch' is \(4, 2, 1\)"):
        tensorrt_provider_options({"x": ["batch", 4]}, {"batch": (4, 2, 1)}, cache_dir=tmp_path)


def test_axis_ranges_from_observed_shapes():
    seen = [{"x": (1, 16, 64), "mask": (1, 16)}, {"x": (3, 16, 64), "mask": (3, 100)}]
    assert axis_ranges_from_shapes(INPUTS, seen) == {"batch": (1, 3, 3), "tokens": (16, 100, 100)}


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QCRUN_CACHE_DIR", str(tmp_path / "q"))
    assert default_cache_dir() == tmp_path / "q"
    monkeypatch.delenv("QCRUN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "qcrun"


def test_tolerance_overrides_are_per_precision():
    assert get_target("ort-cpu").tolerance_overrides == {}
    assert get_target("ort-cuda").tolerance_overrides["fp32"]["max_abs"] == 1e-3
    assert get_target("jetson-orin").tolerance_overrides["fp32"]["min_cosine"] == 0.999
    assert "fp16" in get_target("jetson-orin").precisions
    assert "int8-dynamic" not in get_target("jetson-orin").precisions

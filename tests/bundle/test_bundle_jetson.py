"""The Jetson / TensorRT path without hardware: the provider options a bundle leads to.

No GPU here, so nothing runs on TensorRT; what is tested is everything up to the session:
the options the bundle computes from its own specs (fp16, workspace, engine and timing caches
inside a writable cache path, min/opt/max for every dynamic input), that the real adapter --
which reads the model's inputs with a CPU probe session -- builds exactly the same provider
list with the CUDA and CPU fallbacks, and the profile-range check an app gets at call time.
"""

from __future__ import annotations

import onnxruntime
import pytest
from qcrun.bundle import open_bundle
from qcrun.engines.ort import OrtAdapter
from qcrun.errors import UserError

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture
def orin(jetson_bundle):
    with open_bundle(jetson_bundle.path) as bundle:
        yield bundle


def test_jetson_provider_options_from_the_bundle(orin, tmp_path):
    providers = orin.providers("jetson-orin", cache_root=tmp_path / "cache")
    assert [p if isinstance(p, str) else p[0] for p in providers] == [TRT, CUDA, CPU]
    options = providers[0][1]
    cache = tmp_path / "cache" / "jetson-orin" / orin.model_sha256[:16]
    assert options == {
        "trt_fp16_enable": "True",
        "trt_max_workspace_size": str(2 << 30),
        "trt_engine_cache_enable": "True",
        "trt_timing_cache_enable": "True",
        "trt_engine_cache_path": str(cache / "trt-engines"),
        "trt_timing_cache_path": str(cache / "trt-timing"),
        # every dynamic input; batch 1..2 and text 4..8 from the golden cases, tokens widened
        "trt_profile_min_shapes": "image_features:1x1x48,text_ids:1x4,text_mask:1x4",
        "trt_profile_opt_shapes": "image_features:2x257x48,text_ids:2x8,text_mask:2x8",
        "trt_profile_max_shapes": "image_features:2x1025x48,text_ids:2x8,text_mask:2x8",
    }


def test_ort_tensorrt_profile_differs_only_where_the_target_does(orin, tmp_path):
    orin_options = orin.providers("jetson-orin", cache_root=tmp_path)[0][1]
    desktop = orin.providers("ort-tensorrt", cache_root=tmp_path)[0][1]
    differ = {k for k in orin_options if orin_options[k] != desktop[k]}
    assert differ == {"trt_fp16_enable", "trt_max_workspace_size", "trt_engine_cache_path",
                      "trt_timing_cache_path"}
    assert desktop["trt_fp16_enable"] == "False"
    assert desktop["trt_max_workspace_size"] == str(4 << 30)
    assert "/ort-tensorrt/" in desktop["trt_engine_cache_path"]


def test_the_adapter_builds_the_same_providers_and_creates_the_caches(orin, tmp_path):
    """The code path the device runs, up to the session: a CPU probe session reads the input
    shapes from the model itself, and the result must equal the bundle's own plan."""
    options = orin.adapter_options("jetson-orin", cache_root=tmp_path)
    assert set(options) == {"profile_shapes", "cache_dir"}
    adapter = OrtAdapter(orin.model_path, "jetson-orin", **options)
    built = adapter._providers(onnxruntime)
    assert built == orin.providers("jetson-orin", cache_root=tmp_path)
    cache = tmp_path / "jetson-orin" / orin.model_sha256[:16]
    assert (cache / "trt-engines").is_dir() and (cache / "trt-timing").is_dir()


def test_cache_path_that_cannot_be_written_is_a_user_error(orin, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should go")
    adapter = OrtAdapter(orin.model_path, "jetson-orin",
                         **orin.adapter_options("jetson-orin", cache_root=blocker))
    with pytest.raises(UserError, match="cannot create the TensorRT cache directory"):
        adapter._providers(onnxruntime)


def test_cpu_targets_need_no_tensorrt_options(orin):
    assert orin.adapter_options("ort-cpu") == {}
    assert orin.adapter_options("openvino-cpu") == {}
    assert orin.providers("ort-cuda") == [CUDA, CPU]
    with pytest.raises(UserError, match="runs on openvino"):
        orin.providers("openvino-cpu")


def test_default_cache_root_follows_the_environment(orin, tmp_path, monkeypatch):
    monkeypatch.setenv("QCRUN_CACHE_DIR", str(tmp_path / "env-cache"))
    assert orin.cache_dir("jetson-orin") == (tmp_path / "env-cache" / "jetson-orin"
                                             / orin.model_sha256[:16])


def test_inputs_outside_the_profile_are_named(orin):
    import numpy as np

    feed = {"image_features": np.zeros((1, 2048, 48), np.float32),
            "text_ids": np.zeros((3, 6), np.int64), "text_mask": np.ones((3, 6), bool)}
    problems = orin.profile_problems(feed)
    assert problems == [
        "input 'image_features' axis 'tokens' is 2048, outside the TensorRT profile 1..1025 "
        "of this bundle",
        "input 'text_ids' axis 'batch' is 3, outside the TensorRT profile 1..2 of this bundle",
        "input 'text_mask' axis 'batch' is 3, outside the TensorRT profile 1..2 of this bundle",
    ]
    inside = {"image_features": np.zeros((2, 300, 48), np.float32),
              "text_ids": np.zeros((2, 5), np.int64), "text_mask": np.ones((2, 5), bool)}
    assert orin.profile_problems(inside) == []

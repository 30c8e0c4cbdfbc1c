"""qcrun.load: the embedding API. Target choice, input checks, concurrency, lifecycle."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import qcrun
from qcrun.api import AUTO_ORDER, auto_order, plan_targets
from qcrun.bundle import BundleDamaged, open_bundle, pack_archive
from qcrun.engines import availability
from qcrun.errors import UserError
from qcrun.golden import load_golden
from qcrun.parity import compare

CPU_TARGETS = ["ort-cpu", "openvino-cpu"]
EXAMPLE_APP = Path(__file__).resolve().parents[2] / "scripts" / "example_app.py"


@pytest.fixture(scope="module")
def golden(ov_bundle):
    return load_golden(ov_bundle.path / "golden")


def stream(golden, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Requests like the golden cases, with fresh visual features."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(count):
        case = golden.cases[i % len(golden.cases)]
        feed = dict(case.inputs)
        feed["image_features"] = rng.standard_normal(feed["image_features"].shape).astype(
            np.float32)
        feeds.append(feed)
    return feeds


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_outputs_match_golden_within_the_bundle_policy(ov_bundle, golden, target):
    with qcrun.load(ov_bundle.path, target=target) as model:
        assert model.target == target
        for case in golden.cases:
            out = model(**case.inputs)
            assert list(out) == ["query_outputs"]
            tolerance = model.bundle.policy.resolve("fp32", target, "query_outputs")
            result = compare(out["query_outputs"], case.outputs["query_outputs"], tolerance)
            assert result.passed, result.reason
            assert result.metrics.max_abs < 1e-5


def test_spec(ov_bundle):
    with qcrun.load(ov_bundle.path) as model:
        assert [(i.name, i.dtype, i.shape) for i in model.inputs] == [
            ("image_features", "float32", ("batch", "tokens", 48)),
            ("text_ids", "int64", ("batch", "text")),
            ("text_mask", "bool", ("batch", "text")),
        ]
        assert [(o.name, o.dtype, o.shape) for o in model.outputs] == [
            ("query_outputs", "float32", ("batch", 8, 64))]


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_four_threads_at_once_give_the_serial_outputs(ov_bundle, golden, target):
    feeds = stream(golden, 32, seed=target == "ort-cpu")
    with qcrun.load(ov_bundle.path, target=target) as model:
        serial = [model(**feed) for feed in feeds]
        with ThreadPoolExecutor(max_workers=4) as pool:
            concurrent = list(pool.map(model.run, feeds))
        if target == "openvino-cpu":  # each concurrent call had a request of its own
            assert model._adapter.requests_created > 1
    assert len(concurrent) == len(serial)
    for a, b, feed in zip(serial, concurrent, feeds, strict=True):
        np.testing.assert_array_equal(a["query_outputs"], b["query_outputs"])
        assert a["query_outputs"].shape[0] == feed["image_features"].shape[0]
    # and the requests really differ (the check above is not trivially true)
    assert not np.allclose(serial[0]["query_outputs"], serial[3]["query_outputs"])


def test_auto_picks_the_first_target_that_runs_here_and_says_why_others_not(jetson_bundle):
    """Every target reads the decomposed opset-17 bundle, so the choice is the host's: the
    first target of the auto order that runs here (openvino-cpu on a CPU-only machine, a GPU
    target on a GPU host); each target before it says why it was skipped."""
    order = ["jetson-orin", "ort-tensorrt", "ort-cuda", "openvino-gpu", "openvino-cpu",
             "ort-cpu"]
    here = {name: availability(name) for name in order}
    expected = next(name for name in order if here[name][0])
    with qcrun.load(jetson_bundle.path) as model:
        states = {c.target: c for c in model.choices}
        assert list(states) == order
        assert model.target == expected and states[expected].chosen
        for name, (ok, reason) in here.items():
            assert states[name].usable == ok, (name, states[name])
            assert states[name].reason == reason
            assert states[name].chosen == (name == expected)
        provider = {"jetson-orin": "TensorrtExecutionProvider",
                    "ort-tensorrt": "TensorrtExecutionProvider",
                    "ort-cuda": "CUDAExecutionProvider"}
        for name, needed in provider.items():
            if not here[name][0]:  # skipped: the reason names what is missing
                assert needed in states[name].reason
        assert states["ort-cpu"].usable  # onnxruntime CPU runs everywhere


def test_auto_order_is_documented_and_honoured():
    assert [t for rank in AUTO_ORDER for t in rank] == [
        "ort-tensorrt", "jetson-orin", "ort-cuda", "openvino-gpu", "openvino-cpu", "ort-cpu"]
    # the bundle's own target first within its rank
    assert auto_order("jetson-orin")[:2] == ["jetson-orin", "ort-tensorrt"]
    assert auto_order("openvino-cpu") == auto_order(None)

    def everything(target):
        return True, "available (pretend)"

    def onnx_form_only(target):
        return None if target.accepts_attention("onnx") else "no 'onnx' form"

    # a device with every engine: TensorRT first for a decomposed bundle...
    plan = plan_targets(auto_order("jetson-orin"), available=everything)
    assert [c.target for c in plan if c.usable][0] == "jetson-orin"
    # ...CUDA first for an 'onnx' bundle, which TensorRT cannot read
    plan = plan_targets(auto_order("openvino-cpu"), incompatibility=onnx_form_only,
                        available=everything)
    assert [c.target for c in plan if c.usable] == ["ort-cuda", "openvino-gpu", "openvino-cpu",
                                                    "ort-cpu"]
    assert "no 'onnx' form" in plan[0].reason

    # a device with only onnxruntime CPU
    def cpu_only(target):
        return target.name == "ort-cpu", f"{target.name} is not here"

    plan = plan_targets(auto_order(None), available=cpu_only)
    assert [c.target for c in plan if c.usable] == ["ort-cpu"]


def test_an_order_of_your_own(ov_bundle):
    cuda = availability("ort-cuda")[0]
    with qcrun.load(ov_bundle.path, target=["ort-cuda", "ort-cpu", "openvino-cpu"]) as model:
        assert model.target == ("ort-cuda" if cuda else "ort-cpu")
        assert [c.target for c in model.choices] == ["ort-cuda", "ort-cpu", "openvino-cpu"]


def test_a_target_this_device_lacks_says_why(ov_bundle):
    ok, reason = availability("ort-cuda")
    if ok:  # a CUDA host: the bundle really runs there, and matches its golden case
        golden = load_golden(ov_bundle.path / "golden")
        case = golden.cases[0]
        with qcrun.load(ov_bundle.path, target="ort-cuda") as model:
            assert model.target == "ort-cuda"
            out = model(**case.inputs)["query_outputs"]
        np.testing.assert_allclose(out, case.outputs["query_outputs"], atol=1e-3)
        return
    with pytest.raises(qcrun.UserError) as info:
        qcrun.load(ov_bundle.path, target="ort-cuda")
    text = str(info.value)
    assert "target ort-cuda cannot run" in text and reason in text
    assert "CUDAExecutionProvider" in reason and "onnxruntime" in reason  # what is missing


def test_a_target_that_cannot_read_the_bundle(ov_bundle):
    with pytest.raises(UserError, match="was made for openvino-cpu .*target jetson-orin cannot "
                       "run it: it does not read the 'onnx' attention form"):
        qcrun.load(ov_bundle.path, target="jetson-orin")


def _bad_feeds(case):
    x, ids, mask = (case.inputs[k] for k in ("image_features", "text_ids", "text_mask"))
    return {
        "missing": ({"image_features": x, "text_ids": ids}, "input 'text_mask' is missing"),
        "unknown": ({**case.inputs, "pixels": x}, "input 'pixels' is not an input"),
        "dtype": ({**case.inputs, "image_features": x.astype(np.float64)},
                  "input 'image_features' has dtype float64, expected float32"),
        "rank": ({**case.inputs, "image_features": x[0]},
                 "input 'image_features' has rank 2 (shape [49, 48]), expected rank 3"),
        "static": ({**case.inputs, "image_features": x[..., :40]},
                   "input 'image_features' axis 2 has size 40, expected 48"),
        "batch": ({**case.inputs, "text_ids": np.concatenate([ids, ids])},
                  "axis 'batch' is 1 in 'image_features' but 2 in 'text_ids'"),
        "int-ids": ({**case.inputs, "text_ids": ids.astype(np.int32)},
                    "input 'text_ids' has dtype int32, expected int64"),
        "mask": ({**case.inputs, "text_mask": mask.astype(np.float32)},
                 "input 'text_mask' has dtype float32, expected bool"),
    }


@pytest.mark.parametrize("target", CPU_TARGETS)
@pytest.mark.parametrize("kind", ["missing", "unknown", "dtype", "rank", "static", "batch",
                                  "int-ids", "mask"])
def test_wrong_inputs_are_user_errors(ov_bundle, golden, target, kind):
    feed, message = _bad_feeds(golden.cases[0])[kind]
    with qcrun.load(ov_bundle.path, target=target) as model:
        with pytest.raises(UserError) as info:
            model.run(feed)
        assert message in str(info.value)
        assert "image_features float32[batch, tokens, 48]" in str(info.value)  # the spec
        # the model still serves good inputs afterwards
        assert model(**golden.cases[0].inputs)["query_outputs"].shape == (1, 8, 64)


def test_every_problem_at_once_and_not_a_mapping(ov_bundle, golden):
    with qcrun.load(ov_bundle.path, target="ort-cpu") as model:
        with pytest.raises(UserError) as info:
            model(image_features=np.zeros((1, 5, 48), np.float64), pixels=1)
        text = str(info.value)
        assert all(part in text for part in ("'pixels' is not an input", "dtype float64",
                                             "'text_ids' is missing", "'text_mask' is missing"))
        with pytest.raises(UserError, match="inputs must be a mapping"):
            model.run([golden.cases[0].inputs["image_features"]])


def test_closed_model_and_archive_cleanup(ov_bundle, golden, tmp_path):
    archive = pack_archive(ov_bundle.path, tmp_path / "q.bundle.tar.gz")
    model = qcrun.load(archive, target="ort-cpu")
    extracted = model.bundle.root
    assert (extracted / "model.onnx").is_file() and extracted != ov_bundle.path
    first = model(**golden.cases[0].inputs)
    model.close()
    assert not extracted.exists()
    with pytest.raises(UserError, match="was closed"):
        model(**golden.cases[0].inputs)
    with qcrun.load(ov_bundle.path, target="ort-cpu") as same:
        np.testing.assert_array_equal(same(**golden.cases[0].inputs)["query_outputs"],
                                      first["query_outputs"])
    # a Bundle opened by the caller stays open after the model closes: the caller owns it
    with open_bundle(archive) as bundle:
        with qcrun.load(bundle, target="openvino-cpu") as model:
            np.testing.assert_allclose(model(**golden.cases[0].inputs)["query_outputs"],
                                       first["query_outputs"], atol=1e-5)
        assert (bundle.root / "model.onnx").is_file()
    assert not bundle.root.exists()


def test_a_damaged_bundle_is_not_loaded(bundle_copy, corrupt):
    corrupt(bundle_copy / "golden" / "manifest.json")
    with pytest.raises(BundleDamaged, match="golden/manifest.json: modified"):
        qcrun.load(bundle_copy)
    # an app that verified the bundle before may skip hashing; the model itself is intact
    with qcrun.load(bundle_copy, verify=False, target="ort-cpu") as model:
        assert model.target == "ort-cpu"


def test_load_a_model_directory_and_an_onnx_file(qformer_dir, golden):
    case = golden.cases[1]
    with qcrun.load(qformer_dir) as from_dir, qcrun.load(qformer_dir / "model.onnx",
                                                         target="ort-cpu") as from_file:
        assert from_dir.target == "openvino-cpu" and from_dir.bundle is None
        assert from_dir.inputs[0].shape == ("batch", "tokens", 48)
        a, b = from_dir(**case.inputs), from_file.run(case.inputs)
        np.testing.assert_allclose(a["query_outputs"], b["query_outputs"], atol=1e-5)
    with pytest.raises(UserError, match="does not exist"):
        qcrun.load(qformer_dir / "nothing.onnx")


def test_bundle_without_torch_and_import_is_light(ov_bundle, qcrun_no_torch):
    script = r"""
import json, sys
import qcrun
light = sorted(m for m in ("numpy", "qcrun.api", "onnxruntime", "openvino") if m in sys.modules)
from qcrun.golden import load_golden
model = qcrun.load(sys.argv[1])
case = load_golden(model.bundle.golden_path).cases[0]
out = model(**case.inputs)["query_outputs"]
print(json.dumps({"light": light, "target": model.target,
                  "max_abs": float(abs(out - case.outputs["query_outputs"]).max()),
                  "torch": [m for m in sys.modules if m.split(".")[0] == "torch"
                            and sys.modules[m] is not None]}))
"""
    proc = qcrun_no_torch(ov_bundle.path, script=script)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["light"] == []  # `import qcrun` imports neither numpy nor an engine
    assert result["target"] == "openvino-cpu" and result["torch"] == []
    assert result["max_abs"] < 1e-5


def test_example_app_runs(ov_bundle):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE_APP), str(ov_bundle.path), "--requests", "40",
         "--threads", "4", "--target", "ort-cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"loaded {ov_bundle.path} on ort-cpu")
    assert any(line.startswith("self-test: golden case b1_t49_text passes") for line in lines)
    assert any(line.startswith("served 40 requests with 4 thread(s)") for line in lines)
    checksum = float(lines[-1].rsplit(" ", 1)[1])
    serial = subprocess.run(
        [sys.executable, str(EXAMPLE_APP), str(ov_bundle.path), "--requests", "40",
         "--threads", "1", "--target", "ort-cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert serial.returncode == 0, serial.stderr
    assert float(serial.stdout.splitlines()[-1].rsplit(" ", 1)[1]) == checksum
    assert checksum > 1000  # sum of |outputs| of 40 requests of [1, 8, 64]


def test_example_app_reports_a_damaged_bundle(bundle_copy, corrupt):
    corrupt(bundle_copy / "model.onnx")
    proc = subprocess.run([sys.executable, str(EXAMPLE_APP), str(bundle_copy)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "model.onnx: modified" in proc.stderr and "Traceback" not in proc.stderr


def test_open_bundle_reads_specs_without_an_engine(jetson_bundle):
    with open_bundle(jetson_bundle.path) as bundle:
        assert bundle.target == "jetson-orin" and bundle.opset == 17
        assert bundle.incompatibility("ort-cpu") is None
        assert bundle.incompatibility("onnx-reference") is None  # it reads decomposed too
        assert bundle.inputs[0].describe() == "image_features float32[batch, tokens, 48]"
        assert bundle.profile_shapes["tokens"] == (1, 257, 1025)

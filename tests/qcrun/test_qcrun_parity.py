"""Parity: the verdict rule, the tolerance policy, full runs on real engines, and reports."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto, helper
from qcrun.engines import availability
from qcrun.errors import UserError
from qcrun.golden import load_golden
from qcrun.parity import (
    DEFAULT_TOLERANCES,
    ParityReport,
    Record,
    Tolerance,
    TolerancePolicy,
    compare,
    run_parity,
)
from qcrun.schema import dump

CPU_TARGETS = ("ort-cpu", "openvino-cpu", "onnx-reference")
FP32 = DEFAULT_TOLERANCES["fp32"]
HUGE = Tolerance(max_abs=1e30, max_rel=1e30, min_cosine=-1.0)


#: Whether ort-cuda runs here, read from qcrun.targets (not from a report under test): the
#: tests below check a skip with this reason on a CPU-only host and a run on a CUDA host.
CUDA_OK, CUDA_REASON = availability("ort-cuda")


# --- compare ---------------------------------------------------------------------------------


def test_identical_arrays_pass_with_zero_error():
    e = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    result = compare(e.copy(), e, FP32)
    assert result.passed and result.code == "ok" and result.reason == ""
    m = result.metrics
    assert (m.max_abs, m.max_rel, m.mean_abs, m.violations) == (0.0, 0.0, 0.0, 0)
    assert m.cosine == pytest.approx(1.0, abs=1e-15)
    assert m.shape_match and m.dtype_match and m.actual_shape == (3, 4)


def test_metrics_values():
    expected = np.array([1.0, 2.0, -4.0, 0.0], dtype=np.float32)
    actual = np.array([1.0, 2.5, -4.0, 1e-7], dtype=np.float32)
    m = compare(actual, expected, HUGE).metrics
    assert m.max_abs == pytest.approx(0.5)
    # 1e-7 over an expected 0 is divided by the floor 1e-6, not by zero
    assert m.max_rel == pytest.approx(0.25)
    assert m.mean_abs == pytest.approx((0.5 + 1e-7) / 4)
    a64, e64 = actual.astype(np.float64), expected.astype(np.float64)
    cosine = float(a64 @ e64 / (np.linalg.norm(a64) * np.linalg.norm(e64)))
    assert m.cosine == pytest.approx(cosine, abs=1e-12)
    assert (
        m.dtype_match and not compare(actual.astype(np.float16), expected, HUGE).metrics.dtype_match
    )
    tiny = compare(np.array([1e-7], np.float32), np.array([0.0], np.float32), HUGE).metrics
    assert tiny.max_rel == pytest.approx(0.1, rel=1e-6)


def test_tolerance_failure_reports_the_worst_element():
    expected = np.ones((2, 3), dtype=np.float32)
    actual = expected.copy()
    actual[1, 2] += 0.5
    actual[0, 0] += 0.01
    result = compare(actual, expected, Tolerance(max_abs=1e-3, max_rel=None, min_cosine=0.0))
    assert not result.passed and result.code == "tolerance"
    assert result.metrics.violations == 2 and result.metrics.worst_index == (1, 2)
    assert result.reason == "2 of 6 elements exceed 1e-03 (worst at [1, 2]: actual 1.5, expected 1)"


def test_bound_scales_with_magnitude_like_allclose():
    expected = np.array([100.0, 0.5], dtype=np.float32)
    # bound for 100 is 1e-4 + 1e-4 * 100 = 0.0101
    assert compare(np.array([100.005, 0.5], np.float32), expected, FP32).passed
    result = compare(np.array([100.02, 0.5], np.float32), expected, FP32)
    assert not result.passed and result.reason.startswith(
        "1 of 2 elements exceed 1e-04 + 1e-04*|expected|"
    )


def test_cosine_below_the_minimum_fails_even_within_max_abs():
    expected = np.array([1.0, 0.0], dtype=np.float32)
    actual = np.array([1.0, 0.5], dtype=np.float32)
    result = compare(actual, expected, Tolerance(max_abs=0.6, max_rel=None, min_cosine=0.999))
    assert not result.passed and result.metrics.violations == 0
    assert result.reason == "cosine 0.894427 < 0.999"


def test_cosine_is_not_judged_on_an_all_zero_output():
    expected = np.zeros(8, dtype=np.float32)
    actual = np.full(8, 1e-9, dtype=np.float32)
    result = compare(actual, expected, FP32)
    assert result.metrics.cosine == 0.0 and result.passed


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_output_fails_even_with_a_huge_tolerance(bad):
    expected = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    actual = expected.copy()
    actual[2, 1] = bad
    result = compare(actual, expected, HUGE)
    assert not result.passed and result.code == "nonfinite"
    m = result.metrics
    assert m.nonfinite_mismatch == 1
    assert (m.nan_actual, m.inf_actual) == ((1, 0) if np.isnan(bad) else (0, 1))
    assert (m.nan_expected, m.inf_expected) == (0, 0)
    kind = "1 NaN and 0 Inf" if np.isnan(bad) else "0 NaN and 1 Inf"
    assert result.reason.startswith(f"{kind} in actual where expected is finite (first at [2, 1])")
    # the other metrics stay finite: they cover the finite positions
    assert math.isfinite(m.max_abs) and m.max_abs == 0.0


def test_matching_nonfinite_values_pass_and_lost_ones_fail():
    expected = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    assert compare(expected.copy(), expected, FP32).passed
    result = compare(np.array([0.0, np.inf, 1.0], np.float32), expected, HUGE)
    assert not result.passed
    assert "1 finite values in actual where expected is NaN/Inf" in result.reason


def test_shape_mismatch_fails_without_value_metrics():
    result = compare(np.zeros((2, 3)), np.zeros((2, 4)), HUGE)
    assert not result.passed and result.code == "shape"
    assert result.reason == "shape [2, 3] but expected [2, 4]"
    assert result.metrics.max_abs is None and result.metrics.cosine is None
    assert not result.metrics.shape_match


# --- tolerance policy ------------------------------------------------------------------------


def test_defaults_per_precision():
    policy = TolerancePolicy()
    assert policy.resolve("fp32", "ort-cpu", "y") == Tolerance(1e-4, 1e-4, 0.99999)
    assert policy.resolve("fp16", "ort-cpu", "y") == Tolerance(1e-2, 1e-2, 0.999)
    assert policy.resolve("int8-dynamic", "openvino-cpu").min_cosine == 0.99
    assert policy.resolve("int8-static", "openvino-cpu").min_cosine == 0.99
    assert (
        policy.resolve("int8-static", "ort-cpu").max_abs
        > policy.resolve("int8-dynamic", "ort-cpu").max_abs
    )


def test_target_profiles_then_policy_targets_then_outputs():
    policy = TolerancePolicy(
        targets={"ort-cuda": {"*": {"min_cosine": 0.9998}, "fp16": {"max_abs": 5e-2}}},
        outputs={"logits": {"*": {"max_rel": 1e-2}, "fp32": {"max_abs": 2e-3}}},
    )
    # ort-cuda's profile loosens fp32 for TF32; the policy then sets the cosine
    assert policy.resolve("fp32", "ort-cuda", "y") == Tolerance(1e-3, 1e-4, 0.9998)
    assert policy.resolve("fp16", "ort-cuda", "y") == Tolerance(5e-2, 1e-2, 0.9998)
    assert policy.resolve("fp32", "ort-cuda", "logits") == Tolerance(2e-3, 1e-2, 0.9998)
    assert policy.resolve("fp32", "ort-cpu", "logits") == Tolerance(2e-3, 1e-2, 0.99999)
    # jetson-orin runs fp32 graphs with fp16 kernels: held to fp16 numbers
    assert policy.resolve("fp32", "jetson-orin", "y") == Tolerance(1e-2, 1e-2, 0.999)
    no_profiles = TolerancePolicy(use_target_settings=False)
    assert no_profiles.resolve("fp32", "jetson-orin", "y") == FP32


def test_policy_round_trips_and_rejects_unknowns():
    policy = TolerancePolicy.from_dict(
        {
            "defaults": {"fp32": {"max_abs": 3e-4}},
            "outputs": {"pooled": {"fp32": {"min_cosine": 0.9}}},
        }
    )
    assert policy.resolve("fp32", "ort-cpu", "pooled") == Tolerance(3e-4, 1e-4, 0.9)
    assert TolerancePolicy.from_dict(json.loads(json.dumps(dump(policy)))) == policy
    with pytest.raises(UserError, match="unknown precision 'fp64'; valid precisions: bf16, fp16, fp32"):
        policy.resolve("fp64", "ort-cpu")
    with pytest.raises(UserError, match="unknown tolerance field 'atol'"):
        TolerancePolicy(outputs={"y": {"*": {"atol": 1}}})
    with pytest.raises(UserError, match="unknown precision 'fp8'"):  # bf16 is a precision now
        TolerancePolicy(targets={"ort-cpu": {"fp8": {"max_abs": 1}}})
    with pytest.raises(UserError, match="unknown target 'cpu'"):
        policy.resolve("fp32", "cpu")


# --- run_parity on real engines --------------------------------------------------------------


def _golden(example):
    return load_golden(example.golden)


def test_parity_passes_on_every_cpu_engine(example):
    report = run_parity(example.model, _golden(example), CPU_TARGETS, precision="fp32")
    assert report.passed, report.format_matrix()
    assert len(report.records) == len(CPU_TARGETS) * len(example.cases) * len(example.outputs)
    assert {(r.target, r.case, r.output) for r in report.records} == {
        (t, c, o) for t in CPU_TARGETS for c in example.cases for o in example.outputs
    }
    for r in report.records:
        assert r.verdict == "pass" and r.code == "ok"
        assert r.metrics.max_abs < 1e-5 and r.metrics.cosine > 0.999999
        assert r.tolerance == FP32
    assert report.counts() == {"pass": len(report.records), "fail": 0, "skip": 0}


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_perturbed_model_fails_naming_output_and_numbers(example, target):
    report = run_parity(example.perturbed, _golden(example), [target])
    assert not report.passed
    failures = report.failures()
    assert {r.output for r in failures} <= set(example.outputs) and failures
    assert {r.case for r in failures} == set(example.cases)
    for r in failures:
        assert r.target == target and r.code == "tolerance"
        # one weight moved by 1e-2 moves outputs by up to ~1e-2, far above 1e-4
        assert 1e-3 < r.metrics.max_abs < 0.1
        assert "elements exceed 1e-04 + 1e-04*|expected| (worst at [" in r.message
    text = report.format_matrix()
    for r in failures:
        m = r.metrics
        assert (
            f"{target} / {r.case} / {r.output}: max_abs {m.max_abs:.3g} "
            f"(tolerance 1e-04 + 1e-04*|expected|), cosine {m.cosine:.6f} (min 0.99999) -- "
            f"{r.message}"
        ) in text
    assert f"failures ({len(failures)}):" in text


def test_unavailable_target_is_skipped_with_its_reason(linear):
    report = run_parity(linear.model, _golden(linear), ["ort-cpu", "ort-cuda"])
    skips = report.skips()
    assert report.passed
    if CUDA_OK:
        assert skips == [] and report.counts() == {"pass": 8, "fail": 0, "skip": 0}
        return
    assert "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    assert all(r.message == CUDA_REASON for r in skips)
    assert [(r.target, r.case, r.output, r.code) for r in skips] == [
        ("ort-cuda", c, None, "unavailable") for c in linear.cases
    ]
    assert "no CUDAExecutionProvider" in skips[0].message
    assert report.counts() == {"pass": 4, "fail": 0, "skip": 2}
    assert "skip" in report.format_matrix() and "ort-cuda: onnxruntime" in report.format_matrix()


def test_required_target_that_cannot_run_is_a_failure(linear):
    report = run_parity(
        linear.model, _golden(linear), ["ort-cpu", "ort-cuda"], require=["ort-cuda"]
    )
    assert report.required == ["ort-cuda"]
    if CUDA_OK:
        assert report.passed and report.counts() == {"pass": 8, "fail": 0, "skip": 0}
        return
    assert not report.passed
    assert report.failures()[0].message == f"ort-cuda is required but was not run: {CUDA_REASON}"
    assert [r.target for r in report.failures()] == ["ort-cuda", "ort-cuda"]
    assert report.failures()[0].message.startswith("ort-cuda is required but was not run: ")
    assert report.required == ["ort-cuda"]
    with pytest.raises(UserError, match="required target 'ort-cuda' is not among the targets"):
        run_parity(linear.model, _golden(linear), ["ort-cpu"], require=["ort-cuda"])


def test_precision_and_attention_form_the_target_cannot_run(linear):
    golden = _golden(linear)
    report = run_parity(linear.model, golden, ["ort-cuda"], precision="int8-dynamic")
    assert {r.code for r in report.records} == {"precision"}
    assert "ort-cuda does not run int8-dynamic models" in report.records[0].message
    report = run_parity(linear.model, golden, ["jetson-orin", "ort-cpu"], attention_form="onnx")
    jetson = [r for r in report.records if r.target == "jetson-orin"]
    assert {r.verdict for r in jetson} == {"skip"} and {r.code for r in jetson} == {
        "attention-form"
    }
    assert "jetson-orin cannot run (it accepts decomposed)" in jetson[0].message
    assert report.passed


def test_load_failure_on_one_target_does_not_stop_the_others(tmp_path, lib):
    # com.microsoft.Gelu runs on onnxruntime and OpenVINO; onnx.reference has no kernel for it.
    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
        "gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    path = lib.save(model, tmp_path / "gelu.onnx")
    x = np.linspace(-3, 3, 8, dtype=np.float32).reshape(2, 4)
    y = (x * 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))).astype(np.float32)
    golden = lib.write_golden(
        tmp_path / "golden",
        "gelu",
        "tiny",
        {},
        [{"name": "c", "description": "", "inputs": {"x": x}, "outputs": {"y": y}}],
    )
    report = run_parity(path, load_golden(golden), CPU_TARGETS)
    by_target = {r.target: r for r in report.records}
    assert by_target["ort-cpu"].verdict == "pass"
    assert by_target["openvino-cpu"].verdict == "pass"
    failed = by_target["onnx-reference"]
    assert (failed.verdict, failed.code, failed.output) == ("fail", "load", None)
    assert "onnx-reference: onnx-reference could not load" in failed.message
    assert "Gelu" in failed.message
    assert "fail load" in report.format_matrix()


def test_feed_that_does_not_match_the_model_is_a_user_error(linear, attention):
    with pytest.raises(UserError) as e:
        run_parity(linear.model, _golden(attention), ["ort-cpu"])
    assert "input 'queries' is not an input of the model" in str(e.value)
    assert "input 'x' is missing" in str(e.value)


def test_missing_output_is_a_failure(tmp_path, linear, lib):
    case = lib.linear_cases(linear.weights)[0]
    case["outputs"] = {"logits": case["outputs"]["pooled"]}
    golden = lib.write_golden(tmp_path / "g", "linear", "tiny", linear.weights, [case])
    report = run_parity(linear.model, load_golden(golden), ["ort-cpu"])
    (record,) = report.records
    assert (record.verdict, record.code, record.output) == ("fail", "missing-output", "logits")
    assert record.message == "the model has no output 'logits' (its outputs: tokens, pooled)"


def test_unknown_target_or_precision(linear):
    with pytest.raises(UserError, match="unknown target 'gpu'; valid targets: jetson-orin"):
        run_parity(linear.model, _golden(linear), ["ort-cpu", "gpu"])
    with pytest.raises(UserError, match="unknown precision 'int4'"):
        run_parity(linear.model, _golden(linear), ["ort-cpu"], precision="int4")


# --- reports ---------------------------------------------------------------------------------


@pytest.fixture
def mixed_report(linear):
    """The perturbed model: fails on ort-cpu (tokens and pooled move by ~1e-2), skips ort-cuda
    (runs and fails there too on a CUDA host)."""
    return run_parity(linear.perturbed, _golden(linear), ["ort-cpu", "ort-cuda"])


def test_json_report_round_trips(mixed_report):
    text = mixed_report.to_json()
    again = ParityReport.from_json(text)
    assert again == mixed_report
    assert again.records == mixed_report.records
    assert all(isinstance(r, Record) for r in again.records)
    data = json.loads(text)
    assert data["passed"] is False and data["counts"] == mixed_report.counts()
    env = data["environment"]
    assert env["python"].count(".") == 2 and env["platform"]
    assert env["versions"]["onnxruntime"] == onnxruntime.__version__
    assert "numpy" in env["versions"]


def test_junit_xml_counts(mixed_report):
    root = ET.fromstring(mixed_report.to_junit_xml())
    counts = mixed_report.counts()
    assert root.tag == "testsuites"
    assert int(root.get("failures")) == counts["fail"] == len(root.findall(".//failure"))
    assert int(root.get("skipped")) == counts["skip"] == len(root.findall(".//skipped")) == (
        0 if CUDA_OK else 2)
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["ort-cpu", "ort-cuda"]
    cpu, cuda = suites["ort-cpu"], suites["ort-cuda"]
    cpu_failures = int(cpu.get("failures"))
    assert int(cpu.get("tests")) == 4 and cpu_failures > 0
    if CUDA_OK:  # the perturbed model fails on CUDA as on the CPU
        assert int(cuda.get("failures")) == cpu_failures == counts["fail"] // 2
        return
    assert cpu_failures == counts["fail"]
    assert int(cuda.get("skipped")) == 2 and int(cuda.get("failures")) == 0
    names = [c.get("name") for c in cpu.findall("testcase")]
    assert names == ["single/tokens", "single/pooled", "batch/tokens", "batch/pooled"]
    failure = cpu.find(".//failure")
    assert failure.get("type") == "tolerance" and "max_abs" in failure.text
    assert cuda.find(".//skipped").get("message") == CUDA_REASON


def test_matrix_layout(linear):
    report = run_parity(linear.model, _golden(linear), ["ort-cpu", "ort-cuda", "onnx-reference"])
    lines = report.format_matrix().splitlines()
    assert lines[0].split() == ["case", "ort-cpu", "ort-cuda", "onnx-reference"]
    if CUDA_OK:
        assert lines[1].split()[:2] == ["single", "pass"] and lines[1].split()[3] == "pass"
        assert lines[-1] == "12 passed, 0 failed, 0 skipped"
        return
    single = lines[1].split()
    assert single[0] == "single" and single[1] == "pass" and single[3] == "skip"
    assert float(single[2]) < 1e-5  # worst max_abs of the case, e.g. "pass 5e-07"
    assert lines[-1] == "8 passed, 0 failed, 2 skipped"

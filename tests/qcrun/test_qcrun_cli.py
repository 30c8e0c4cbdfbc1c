"""The qcrun command line: exit codes, messages without tracebacks, report files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import onnxruntime
import pytest
from click.testing import CliRunner
from qcrun.cli import main
from qcrun.engines import availability
from qcrun.parity import ParityReport
from qcrun.targets import target_names


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_dir(tmp_path, linear, lib):
    return lib.write_model_dir(
        tmp_path / "linear-tiny", linear.model, linear.golden, mechanism="linear"
    )


@pytest.fixture
def perturbed_dir(tmp_path, linear, lib):
    return lib.write_model_dir(
        tmp_path / "perturbed", linear.perturbed, linear.golden, mechanism="linear"
    )


def test_targets_json_lists_every_target_with_availability():
    result = invoke("targets", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert list(rows) == target_names()
    assert rows["ort-cpu"]["available"] is True
    assert rows["onnx-reference"]["attention_forms"] == ["onnx", "decomposed"]
    assert all(r["reason"] for r in rows.values())


def test_targets_text():
    result = invoke("targets")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == len(target_names())
    assert lines[0].split()[:2] == ["ort-cpu", "available"]


def test_verify_passes(model_dir, tmp_path):
    report_path, junit_path = tmp_path / "out" / "report.json", tmp_path / "report.xml"
    result = invoke(
        "verify",
        model_dir,
        "--target",
        "ort-cpu",
        "--target",
        "openvino-cpu",
        "--json",
        report_path,
        "--junit",
        junit_path,
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split() == ["case", "ort-cpu", "openvino-cpu"]
    assert "8 passed, 0 failed, 0 skipped" in result.stdout
    assert result.stderr == ""
    report = ParityReport.from_json(report_path.read_text())
    assert report.passed and report.targets == ["ort-cpu", "openvino-cpu"]
    assert report.required == ["ort-cpu", "openvino-cpu"]
    assert ET.parse(junit_path).getroot().get("failures") == "0"


def test_verify_fails_on_a_perturbed_model(perturbed_dir, tmp_path):
    result = invoke(
        "verify", perturbed_dir, "--target", "onnx-reference", "--json", tmp_path / "r.json"
    )
    assert result.exit_code == 1
    assert "onnx-reference / batch / tokens: max_abs" in result.stdout
    assert result.stderr.startswith(
        "error: verify: parity failed on onnx-reference: 4 failing checks")
    assert "Traceback" not in result.output
    assert not ParityReport.from_json((tmp_path / "r.json").read_text()).passed


def test_verify_on_an_unavailable_target_is_an_error(model_dir):
    result = invoke("verify", model_dir, "--target", "ort-cpu", "--target", "ort-cuda")
    ok, reason = availability("ort-cuda")
    if ok:  # a CUDA host: the target runs and the linear model passes there
        assert result.exit_code == 0, result.output
        assert "8 passed, 0 failed, 0 skipped" in result.stdout
        return
    assert "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    assert result.exit_code == 1
    assert f"ort-cuda is required but was not run: {reason}" in result.stdout
    assert "no CUDAExecutionProvider" in reason or "CUDA" in reason
    assert result.stderr.startswith("error: verify: parity failed on ort-cuda")


def test_unknown_target_lists_valid_ones(model_dir):
    result = invoke("verify", model_dir, "--target", "tensorrt")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: unknown target 'tensorrt'; valid targets: ")
    for name in target_names():
        assert name in result.stderr
    assert "Traceback" not in result.output


def test_damaged_golden_is_rejected(model_dir):
    path = model_dir / "golden" / "single.npz"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    result = invoke("verify", model_dir, "--target", "ort-cpu")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: golden: golden file {path} has sha256 ")
    assert "qcexport golden linear --update" in result.stderr


def test_golden_dir_from_manifest_or_flag(tmp_path, linear, attention, lib):
    # the manifest names a golden set inside the directory; --golden overrides it; a golden
    # path that leaves the directory is refused
    directory = lib.write_model_dir(tmp_path / "m", linear.model, None, mechanism="linear",
                                    golden="sets/linear")
    shutil.copytree(linear.golden, directory / "sets" / "linear")
    assert invoke("verify", directory, "--target", "ort-cpu").exit_code == 0
    result = invoke("verify", directory, "--target", "ort-cpu", "--golden", attention.golden)
    assert result.exit_code == 1
    assert (
        "is for mechanism 'cross-attention', but the model is mechanism 'linear'" in result.stderr
    )
    outside = lib.write_model_dir(tmp_path / "o", linear.model, None, mechanism="linear",
                                  golden=str(linear.golden))
    result = invoke("verify", outside, "--target", "ort-cpu")
    assert result.exit_code == 1 and "is absolute" in result.stderr
    assert invoke("verify", outside, "--target", "ort-cpu", "--golden", linear.golden
                  ).exit_code == 1  # the manifest itself is refused, whatever --golden says


def test_model_dir_problems(tmp_path, linear, lib):
    result = invoke("verify", tmp_path, "--target", "ort-cpu")
    assert result.exit_code == 1 and "is not an exported model directory" in result.stderr
    directory = lib.write_model_dir(tmp_path / "m", linear.model, linear.golden, mechanism="linear")
    manifest = json.loads((directory / "manifest.json").read_text())
    del manifest["precision"]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("verify", directory, "--target", "ort-cpu")
    assert result.exit_code == 1 and "precision: required key is missing" in result.stderr


def test_manifest_tolerances_never_decide_but_a_policy_file_does(tmp_path, linear, attention,
                                                                 lib):
    # the perturbed model fails qcrun's fp32 policy; tolerances in its own manifest (the
    # artifact under test) are not read, a policy file the user names is
    loose = {"defaults": {"fp32": {"max_abs": 0.05, "min_cosine": 0.999}}}
    directory = lib.write_model_dir(tmp_path / "m", linear.perturbed, linear.golden,
                                    mechanism="linear", attention="onnx", tolerances=loose)
    result = invoke("verify", directory, "--target", "ort-cpu")
    assert result.exit_code == 1 and "0 passed, 4 failed" in result.stdout
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": 1, **loose}))
    assert invoke("verify", directory, "--target", "ort-cpu", "--policy", policy).exit_code == 0
    # the attention form is the graph's: one with an opset-23 Attention node is refused by a
    # target that reads only the decomposed form, on any host
    fused = lib.write_model_dir(tmp_path / "a", attention.model, attention.golden,
                                mechanism="cross-attention", attention="onnx")
    result = invoke("verify", fused, "--target", "jetson-orin", "--policy", policy)
    assert result.exit_code == 1
    assert "uses attention form 'onnx', which jetson-orin cannot run" in result.stdout


def test_console_entry_point_exits_cleanly(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "qcrun.cli", "verify", str(model_dir), "--target", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: unknown target 'nope'")
    assert "Traceback" not in proc.stderr

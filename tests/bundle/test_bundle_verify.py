"""qcrun verify on a bundle, on a "device": a fresh interpreter where torch and onnx cannot be
imported. Hashes first (a damaged bundle never passes, and the message names the file), then
the golden subset under the bundle's own tolerance policy."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from qcrun.bundle import pack_archive
from qcrun.cli import main as qcrun_main
from qcrun.engines import availability
from qcrun.parity import ParityReport


def invoke(*args):
    return CliRunner().invoke(qcrun_main, [str(a) for a in args])


def test_verify_a_copied_bundle_without_torch(bundle_copy, qcrun_no_torch, tmp_path):
    report_path = tmp_path / "report.json"
    proc = qcrun_no_torch("verify", bundle_copy, "--json", report_path)
    assert proc.returncode == 0, proc.stderr
    # 9 files: model.xml and model.bin too, an OpenVINO bundle carries the IR
    assert "files: all 9 match bundle.json (sha256)" in proc.stdout
    assert "3 passed, 0 failed, 0 skipped" in proc.stdout
    report = ParityReport.from_json(report_path.read_text())
    assert report.passed and report.targets == ["openvino-cpu"]
    assert report.required == ["openvino-cpu"]  # the bundle's own target must really run
    assert all(r.tolerance.max_abs == 1e-4 for r in report.records)


def test_one_flipped_byte_fails_naming_the_file(bundle_copy, qcrun_no_torch, corrupt):
    corrupt(bundle_copy / "model.onnx")
    proc = qcrun_no_torch("verify", bundle_copy)
    assert proc.returncode == 1
    assert "error: bundle:" in proc.stderr and "is damaged: model.onnx: modified" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "passed" not in proc.stdout  # nothing ran on a damaged bundle


def test_archive_round_trip_without_torch(ov_bundle, tmp_path, qcrun_no_torch, corrupt):
    archive = pack_archive(ov_bundle.path, tmp_path / "device" / "qformer.bundle.tar.gz")
    proc = qcrun_no_torch("verify", archive, "--target", "ort-cpu")
    assert proc.returncode == 0, proc.stderr
    assert "note: bundle made for openvino-cpu, verified on ort-cpu" in proc.stdout
    assert "3 passed, 0 failed" in proc.stdout
    corrupt(archive, offset=archive.stat().st_size // 3)
    proc = qcrun_no_torch("verify", archive)
    assert proc.returncode == 1
    assert "error: bundle:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("victim", ["golden/b2_t17_textpad.npz", "golden/manifest.json",
                                    "manifest.json"])
def test_any_modified_file_fails_by_name(bundle_copy, corrupt, victim):
    corrupt(bundle_copy / victim)
    result = invoke("verify", bundle_copy)
    assert result.exit_code == 1
    assert f"{victim}: modified (sha256 " in result.stderr


def test_a_missing_file_fails_by_name(bundle_copy):
    (bundle_copy / "golden" / "b1_t49_text.npz").unlink()
    result = invoke("verify", bundle_copy, "--target", "ort-cpu")
    assert result.exit_code == 1
    assert "golden/b1_t49_text.npz: missing" in result.stderr


def test_an_edited_tolerance_in_bundle_json_fails(bundle_copy):
    """Loosening the policy by hand is damage too: bundle.json carries its own sha256."""
    path = bundle_copy / "bundle.json"
    manifest = json.loads(path.read_text())
    manifest["tolerances"]["defaults"]["fp32"]["max_abs"] = 1.0
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    result = invoke("verify", bundle_copy)
    assert result.exit_code == 1
    assert "bundle.json: modified (sha256 " in result.stderr


def test_truncated_bundle_json_fails(bundle_copy):
    path = bundle_copy / "bundle.json"
    path.write_bytes(path.read_bytes()[:200])
    result = invoke("verify", bundle_copy)
    assert result.exit_code == 1
    assert "bundle.json: unreadable (not valid JSON" in result.stderr


def test_extra_files_are_noted_not_judged(bundle_copy):
    (bundle_copy / "profile.json").write_text("{}")
    result = invoke("verify", bundle_copy)
    assert result.exit_code == 0, result.output
    assert "note: profile.json is not part of the bundle (ignored)" in result.stdout


def test_a_bundle_made_for_another_target(bundle_copy):
    result = invoke("verify", bundle_copy, "--target", "ort-tensorrt")
    assert result.exit_code == 1
    assert "was made for openvino-cpu" in result.stderr
    assert "target ort-tensorrt cannot run it: it does not read the 'onnx' attention form" \
        in result.stderr
    assert "qcexport bundle MODEL_DIR --target ort-tensorrt" in result.stderr


def test_jetson_bundle_runs_on_its_target_or_says_why_it_cannot(jetson_bundle):
    # with no --target, a bundle is verified on the target it was made for
    result = invoke("verify", jetson_bundle.path)
    if availability("jetson-orin")[0]:  # a TensorRT host: its golden subset really runs
        assert result.exit_code == 0, result.output
        assert "3 passed, 0 failed, 0 skipped" in result.stdout
        return
    assert result.exit_code == 1
    assert "jetson-orin is required but was not run" in result.stdout
    assert "TensorrtExecutionProvider" in result.stdout
    assert "pass a --target that runs here" in result.stderr


def test_jetson_bundle_verifies_on_the_cpu_targets_that_read_it(jetson_bundle, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("verify", jetson_bundle.path, "--target", "ort-cpu", "--target",
                    "openvino-cpu", "--json", report_path)
    assert result.exit_code == 0, result.output
    report = ParityReport.from_json(report_path.read_text())
    assert report.counts() == {"pass": 6, "fail": 0, "skip": 0}
    worst = max(r.metrics.max_abs for r in report.records)
    assert worst < 1e-5  # the decomposed export is the same math


def test_golden_option_is_refused_for_a_bundle(bundle_copy, tmp_path):
    result = invoke("verify", bundle_copy, "--golden", tmp_path)
    assert result.exit_code == 1
    assert "--golden does not apply to a bundle" in result.stderr


def test_model_directory_still_needs_a_target(qformer_dir):
    result = invoke("verify", qformer_dir)
    assert result.exit_code == 1
    assert "name the targets to verify on" in result.stderr


def test_not_a_bundle(tmp_path):
    missing = tmp_path / "nothing.bundle.tar.gz"
    result = invoke("verify", missing)
    assert result.exit_code == 1 and "does not exist" in result.stderr
    moved = tmp_path / "moved"
    moved.mkdir()
    result = invoke("verify", moved, "--target", "ort-cpu")
    assert result.exit_code == 1 and "is not an exported model directory" in result.stderr


def test_profile_accepts_a_bundle(bundle_copy, tmp_path):
    report = tmp_path / "profile.json"
    result = invoke("profile", bundle_copy, "--target", "ort-cpu", "--runs", "3", "--warmup",
                    "1", "--op-runs", "0", "--gemm-sizes", "0", "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())  # the profile JSON the host can merge
    assert data["model_info"]["mechanism"] == "qformer"
    assert data["model_info"]["target"] == "openvino-cpu"  # the bundle's, from its manifest
    assert [(t["target"], t["status"]) for t in data["targets"]] == [("ort-cpu", "ok")]
    assert len(data["targets"][0]["points"][0]["samples_ms"]) == 3
    shutil.rmtree(bundle_copy / "golden")
    result = invoke("profile", bundle_copy, "--target", "ort-cpu", "--runs", "1")
    assert result.exit_code == 1
    assert "golden/b1_t49_text.npz: missing" in result.stderr  # never profiles a damaged bundle

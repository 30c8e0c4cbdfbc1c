"""qcexport bundle: what a bundle holds, how the model is chosen or rebuilt, and bad input."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from qcrun.bundle import (
    BUNDLE_MANIFEST,
    open_bundle,
    pack_archive,
    verify_bundle,
)
from qcrun.engines import availability
from qcrun.errors import UserError
from qcrun.golden import file_sha256, load_golden
from qcrun.parity import TolerancePolicy
from qcrun.targets import PRECISIONS, target_names

from qcexport.bundle import make_bundle, output_paths, parse_shape_ranges
from qcexport.cli import main as qcexport_main
from qcexport.golden import golden_dir


def test_bundle_lists_every_file_with_its_hash(ov_bundle):
    root = ov_bundle.path
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    files = ov_bundle.manifest["files"]
    assert sorted([*files, BUNDLE_MANIFEST]) == on_disk
    # an OpenVINO target's bundle carries the IR too (issue 16), hashed like every file
    assert set(files) == {"model.onnx", "model.xml", "model.bin", "manifest.json",
                          "golden/manifest.json",
                          "golden/b1_t49_text.npz", "golden/b2_t17_textpad.npz",
                          "golden/b2_t65_notext.npz"}
    for name, entry in files.items():
        assert entry == {"sha256": file_sha256(root / name), "bytes": (root / name).stat().st_size}
    # bundle.json carries its own sha256: the file with that field zeroed
    raw = (root / BUNDLE_MANIFEST).read_bytes()
    recorded = json.loads(raw)["manifest_sha256"]
    zeroed = raw.replace(recorded.encode(), b"0" * 64)
    assert hashlib.sha256(zeroed).hexdigest() == recorded
    assert verify_bundle(root).ok


def test_openvino_bundle_carries_the_model_as_exported(ov_bundle, qformer_dir):
    m = ov_bundle.manifest
    assert ov_bundle.rebuilt is None
    assert file_sha256(ov_bundle.path / "model.onnx") == file_sha256(qformer_dir / "model.onnx")
    assert (m["target"], m["precision"], m["attention"], m["opset"]) == (
        "openvino-cpu", "fp32", "onnx", 23)
    source = json.loads((qformer_dir / "manifest.json").read_text())
    assert m["inputs"] == source["inputs"]
    assert m["outputs"] == source["outputs"]
    assert m["dynamic_axes"]["image_features"] == {"0": "batch", "1": "tokens"}
    # TensorRT ranges from the golden cases: batch 1..2, tokens 17..65, text 4..8 (opt = max)
    assert m["profile_shapes"] == {"batch": [1, 2, 2], "tokens": [17, 65, 65], "text": [4, 8, 8]}


def test_provenance(ov_bundle, qformer_dir):
    p = ov_bundle.manifest["provenance"]
    source = json.loads((qformer_dir / "manifest.json").read_text())
    assert (p["mechanism"], p["preset"]) == ("qformer", "tiny")
    assert p["config"] == source["config"]
    assert p["weights_sha256"] == source["weights_sha256"]
    assert p["source_model"]["sha256"] == file_sha256(qformer_dir / "model.onnx")
    assert {"qcexport", "qcrun", "torch", "onnx", "onnxruntime", "openvino"} <= set(p["toolkit"])
    assert p["exporter"]["versions"]["torch"].startswith(p["toolkit"]["torch"].split("+")[0])
    assert p["golden"]["cases"] == ["b1_t49_text", "b2_t17_textpad", "b2_t65_notext"]
    assert p["golden"]["writer"] == "pytorch-eager"
    parity = p["host_parity"]
    assert parity["passed"] is True
    ran = {r["target"] for r in parity["records"] if r["verdict"] == "pass"}
    assert {"ort-cpu", "openvino-cpu"} <= ran
    assert "onnx-reference" not in parity["targets"]
    for r in parity["records"]:
        if r["verdict"] == "pass":
            assert r["metrics"]["max_abs"] < 1e-4 and r["metrics"]["cosine"] > 0.99999
        else:  # a GPU target this host lacks, with the reason
            assert r["verdict"] == "skip" and r["message"]


def test_golden_subset_lists_only_its_cases_and_matches_the_golden_set(ov_bundle):
    subset = load_golden(ov_bundle.path / "golden", mechanism="qformer", preset="tiny")
    full = load_golden(golden_dir("qformer", "tiny"))
    assert subset.manifest.weights is None  # the model carries the weights
    assert "weights" not in json.loads((ov_bundle.path / "golden" / "manifest.json").read_text())
    assert subset.manifest.subset_of.cases == [c.name for c in full.cases]
    for case in subset.cases:
        original = full.case(case.name)
        for name, value in case.outputs.items():
            np.testing.assert_array_equal(value, original.outputs[name])


def test_bundle_policy_is_the_host_policy_written_out(ov_bundle):
    """A device that trusts the bundle's signature judges with these numbers whatever its
    qcrun's target profiles say (unsigned, it uses its own: tests/bundle/test_bundle_trust.py)."""
    with open_bundle(ov_bundle.path) as bundle:
        policy = bundle.host_policy
    assert policy.use_target_settings is False
    host = TolerancePolicy()
    for target in target_names():
        for precision in PRECISIONS:
            assert policy.resolve(precision, target) == host.resolve(precision, target)
    assert policy.resolve("fp32", "jetson-orin").max_abs == 1e-2


def test_model_manifest_in_the_bundle_points_inside_it(ov_bundle):
    manifest = json.loads((ov_bundle.path / "manifest.json").read_text())
    assert manifest["golden"] == "golden"
    assert manifest["model"] == "model.onnx"
    assert manifest["target"] == "openvino-cpu"
    assert manifest["tolerances"] == ov_bundle.manifest["tolerances"]


def test_jetson_bundle_is_exported_again_decomposed_at_opset_17(jetson_bundle, qformer_dir):
    m = jetson_bundle.manifest
    assert "exported again as 'decomposed' attention" in jetson_bundle.rebuilt
    assert (m["attention"], m["opset"], m["target"]) == ("decomposed", 17, "jetson-orin")
    model = onnx.load(str(jetson_bundle.path / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "Attention" not in ops and "MultiHeadAttention" not in ops
    assert {"MatMul", "Softmax"} <= ops
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {17}
    # same weights as the model it came from, checked before exporting
    source = json.loads((qformer_dir / "manifest.json").read_text())
    assert m["provenance"]["weights_sha256"] == source["weights_sha256"]
    assert m["provenance"]["source_model"]["attention"] == "onnx"
    assert m["profile_shapes"]["tokens"] == [1, 257, 1025]
    # host parity: every target that reads the decomposed graph (onnx-reference only on
    # request) ran its 3 cases where it is available here and was skipped where it is not
    parity = m["provenance"]["host_parity"]
    host = {"ort-cpu", "openvino-cpu", "ort-cuda", "openvino-gpu", "ort-tensorrt",
            "jetson-orin"}
    ran = {name for name in host if availability(name)[0]}
    assert {"ort-cpu", "openvino-cpu"} <= ran
    assert {r["target"] for r in parity["records"]} == host
    assert parity["passed"] and parity["counts"]["pass"] == 3 * len(ran)
    skipped = {r["target"] for r in parity["records"] if r["verdict"] == "skip"}
    assert skipped == host - ran


def test_cases_and_archive(tmp_path, qformer_dir):
    result = make_bundle(qformer_dir, "ort-cpu", output=tmp_path / "two.bundle", archive=True,
                         cases=["b2_t65_notext", "b1_t49_text"], host_targets=["ort-cpu"])
    assert result.path == tmp_path / "two.bundle.tar.gz" and result.path.is_file()
    assert list(tmp_path.iterdir()) == [result.path]  # no staging directory left behind
    with tarfile.open(result.path) as tar:
        names = sorted(tar.getnames())
    assert names[0] == "two.bundle" and "two.bundle/bundle.json" in names
    with open_bundle(result.path) as bundle:
        assert bundle.verify().ok
        golden = load_golden(bundle.golden_path)
        assert [c.name for c in golden.cases] == ["b1_t49_text", "b2_t65_notext"]
        extracted = bundle.root
        # the same tree always packs to the same bytes
        again = pack_archive(bundle.root, tmp_path / "again.tar.gz", arcname="two.bundle")
        assert again.read_bytes() == result.path.read_bytes()
    assert not extracted.exists()  # closing removes the extracted copy


def test_reduced_precision_is_quantized_for_the_bundle(tmp_path, qformer_dir):
    result = make_bundle(qformer_dir, "openvino-cpu", "int8-dynamic",
                         output=tmp_path / "q8.bundle", cases=1, host_targets=["ort-cpu"])
    assert result.rebuilt == "quantized to int8-dynamic (the model is fp32)"
    assert result.manifest["precision"] == "int8-dynamic"
    ops = {n.op_type for n in onnx.load(str(result.path / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
    record = result.manifest["provenance"]["host_parity"]["records"][0]
    assert record["verdict"] == "pass" and record["tolerance"]["max_abs"] == 0.15


def test_rebuilding_replaces_an_older_bundle(tmp_path, qformer_dir):
    out = tmp_path / "q.bundle"
    first = make_bundle(qformer_dir, "ort-cpu", output=out, cases=1, host_targets=["ort-cpu"])
    second = make_bundle(qformer_dir, "ort-cpu", output=out, cases=2, host_targets=["ort-cpu"])
    assert len(second.manifest["provenance"]["golden"]["cases"]) == 2
    assert first.manifest["manifest_sha256"] != second.manifest["manifest_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.bundle"]
    assert verify_bundle(out).ok


def test_cli_bundle(tmp_path, qformer_dir):
    out = tmp_path / "cli.bundle"
    result = CliRunner().invoke(qcexport_main, [
        "bundle", str(qformer_dir), "--target", "openvino-cpu", "-o", str(out),
        "--cases", "b1_t49_text", "--host-targets", "openvino-cpu"])
    assert result.exit_code == 0, result.output
    assert "1 passed, 0 failed, 0 skipped" in result.output
    assert f"qcrun verify {out}" in result.output
    assert verify_bundle(out).ok


@pytest.mark.parametrize("args, message", [
    (["--target", "nowhere"], "unknown target 'nowhere'"),
    (["--target", "jetson-orin", "--precision", "int8-dynamic"],
     "target jetson-orin does not run int8-dynamic models"),
    (["--target", "ort-cpu", "--cases", "nope"], "unknown golden case 'nope'"),
    (["--target", "ort-cpu", "--cases", "0"], "at least one golden case"),
    (["--target", "ort-cpu", "--profile", "tokens=5"], "is not AXIS=MIN:OPT:MAX"),
    (["--target", "ort-cpu", "--profile", "pixels=1:2:3"], "no input has"),
    (["--target", "ort-cpu", "--profile", "tokens=20:30:40"],
     "leaves out golden cases with tokens from 17 to 65"),
    (["--target", "ort-cpu", "--host-targets", "onnx-reference,ort-tensorrt"],
     "host target(s) ort-tensorrt cannot run the bundled model"),
])
def test_cli_bad_input_is_a_clean_error(tmp_path, qformer_dir, args, message):
    out = tmp_path / "bad.bundle"
    result = CliRunner().invoke(qcexport_main, ["bundle", str(qformer_dir), "-o", str(out), *args])
    assert result.exit_code == 1
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written


def test_golden_set_of_another_mechanism_is_refused(tmp_path, qformer_dir):
    with pytest.raises(UserError, match="is for mechanism 'perceiver'"):
        make_bundle(qformer_dir, "ort-cpu", output=tmp_path / "x.bundle",
                    golden=golden_dir("perceiver", "tiny"))


def test_golden_set_with_other_weights_is_refused(tmp_path, qformer_dir):
    """A golden set whose weights are not the model's would judge the wrong model."""
    import shutil

    other = tmp_path / "other-golden"
    shutil.copytree(golden_dir("qformer", "tiny"), other)
    manifest = json.loads((other / "manifest.json").read_text())
    with np.load(other / "weights.npz") as data:
        weights = {k: data[k].copy() for k in data.files}
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    np.savez(other / "weights.npz", **weights)
    manifest["weights"]["sha256"] = file_sha256(other / "weights.npz")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds other weights than the model"):
        make_bundle(qformer_dir, "ort-cpu", output=tmp_path / "x.bundle", golden=other)
    assert not (tmp_path / "x.bundle").exists()


def test_output_that_is_not_a_bundle_is_not_replaced(tmp_path, qformer_dir):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a bundle; refusing to replace it"):
        make_bundle(qformer_dir, "ort-cpu", output=out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_not_a_model_directory(tmp_path):
    with pytest.raises(UserError, match="is not an exported model directory"):
        make_bundle(tmp_path, "ort-cpu", output=tmp_path / "x.bundle")


def test_a_model_changed_after_export_is_refused(tmp_path, qformer_dir, corrupt):
    import shutil

    copy = shutil.copytree(qformer_dir, tmp_path / "model")
    corrupt(copy / "model.onnx", offset=100)
    with pytest.raises(UserError, match="model.onnx has sha256 .* was changed after export"):
        make_bundle(copy, "ort-cpu", output=tmp_path / "x.bundle")


def test_option_parsing():
    assert parse_shape_ranges(["tokens=1:257:1025", "batch=1:1:8"]) == {
        "tokens": (1, 257, 1025), "batch": (1, 1, 8)}
    assert output_paths("q.bundle", archive=True)[0].name == "q.bundle.tar.gz"
    assert output_paths("q.bundle.tar.gz", archive=True) == (
        output_paths("q.bundle", archive=True)[0], "q.bundle")
    with pytest.raises(UserError, match="--archive was not given"):
        output_paths("q.tar.gz", archive=False)

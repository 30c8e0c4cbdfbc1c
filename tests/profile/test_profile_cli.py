"""`qcrun profile` and `qcexport profile`: outputs, exit codes and clean user errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from qcrun.cli import main as qcrun_main
from qcrun.engines import availability
from qcrun.errors import UserError
from qcrun.files import read_model_dir
from qcrun.latency import SweepPoint
from qcrun.profile import ProfileReport
from qcrun.targets import list_targets

from qcexport.cli import main as qcexport_main
from qcexport.mechanisms.feeds import spec_feeds

# Profiles on real engines through the CLIs: `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

FAST = ["--runs", "4", "--warmup", "1", "--op-runs", "2", "--gemm-sizes", "64"]


def qcrun(*args):
    return CliRunner().invoke(qcrun_main, [str(a) for a in args])


def qcexport(*args):
    return CliRunner().invoke(qcexport_main, [str(a) for a in args])


def test_qcrun_profile_writes_json_markdown_and_html(toy_dir, tmp_path):
    out = tmp_path / "reports"
    result = qcrun("profile", toy_dir, "--target", "ort-cpu,ort-cuda", "--tokens", "9,33", *FAST,
                   "--json", out / "p.json", "--markdown", out / "p.md", "--html", out / "p.html")
    assert result.exit_code == 0, result.output
    assert "| ort-cpu | batch=1 tokens=9 | 4 |" in result.stdout
    cuda = availability("ort-cuda")[0]  # a CUDA host profiles it, a CPU host skips it
    assert ("**ort-cuda skipped:**" in result.stdout) != cuda
    report = ProfileReport.from_json((out / "p.json").read_text())
    assert [t.status for t in report.targets] == ["ok", "ok" if cuda else "skipped"]
    assert [p.sizes["tokens"] for p in report.target("ort-cpu").points] == [9, 33]
    assert (out / "p.md").read_text() == report.to_markdown()
    assert (out / "p.html").read_text().count("<svg") >= 3


def test_runs_zero_or_negative_is_a_clean_error(toy_dir):
    for runs in ("0", "-3"):
        result = qcrun("profile", toy_dir, "--target", "ort-cpu", "--runs", runs)
        assert result.exit_code == 1
        assert "--runs must be a positive number of timed runs" in result.output
        assert "Traceback" not in result.output


def test_sweep_on_a_static_axis_names_it(static_dir, lib, tmp_path):
    # a manifest whose dynamic_axes calls an axis dynamic that the graph fixed does not
    # describe its model: refused before anything runs, naming the axis and the fixed size
    result = qcrun("profile", static_dir, "--target", "ort-cpu", "--tokens", "257", *FAST)
    assert result.exit_code == 1
    assert result.output.startswith("error: manifest: ")
    assert ("dynamic_axes['visual']['2'] says 'tokens', but the graph has fixed size 5 there"
            in result.output)
    assert "Traceback" not in result.output
    # the manifest that describes the graph: a sweep of the fixed axis names the axes it has
    honest = lib.write_model_dir(tmp_path / "honest", lib.attention_graph_model(tokens=5),
                                 dynamic_axes={"queries": {"0": "batch"},
                                               "visual": {"0": "batch"}})
    result = qcrun("profile", honest, "--target", "ort-cpu", "--tokens", "257", *FAST)
    assert result.exit_code == 1
    assert "no input has an axis named 'tokens' (the model's symbolic axes: batch)" in (
        result.output)
    ok = qcrun("profile", honest, "--target", "ort-cpu", "--batch", "1,2", *FAST)
    assert ok.exit_code == 0, ok.output


def test_unknown_and_unavailable_targets(toy_dir):
    unknown = qcrun("profile", toy_dir, "--target", "tpu")
    assert unknown.exit_code == 1 and "valid targets:" in unknown.output
    absent = [t.name for t in list_targets() if not availability(t)[0]]
    if not absent:
        return  # every target runs on this machine: there is no empty run to try
    none_ran = qcrun("profile", toy_dir, "--target", absent[0], *FAST)
    assert none_ran.exit_code == 1
    assert "skipped" in none_ran.output and "no target could run here" in none_ran.output


def test_budget_too_short_warns_and_reports_one_run(toy_dir, tmp_path):
    result = qcrun("profile", toy_dir, "--target", "ort-cpu", "--budget", "0.000001",
                   "--op-runs", "0", "--gemm-sizes", "0", "--json", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "shorter than one run" in result.output
    point = ProfileReport.from_json((tmp_path / "p.json").read_text()).targets[0].points[0]
    assert point.stats.runs == 1


def test_not_a_model_dir(tmp_path):
    result = qcexport("profile", tmp_path, "--targets", "ort-cpu")
    assert result.exit_code == 1
    assert "not an exported model directory" in result.output


@pytest.fixture(scope="module")
def perceiver_dir(tmp_path_factory, lib):
    """A model directory that names the built-in `perceiver` (tiny config) and takes its inputs:
    latents = mean over valid tokens of (image_features @ w). Hand-built, so that the test does
    not spend seconds exporting: what is checked is that `qcexport profile` makes its inputs
    with the spec's own factory."""
    from qcexport import mechanisms

    config = mechanisms.get("perceiver").config("tiny")
    dv = config.vision_dim
    w = numpy_helper.from_array(np.ones((dv, 8), np.float32) / dv, "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["image_features", "w"], ["proj"], name="proj"),
            helper.make_node("Cast", ["image_mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "minus1"], ["mask3"]),
            helper.make_node("Mul", ["proj", "mask3"], ["masked"]),
            helper.make_node("ReduceMean", ["masked", "axes"], ["latent_tokens"], keepdims=0),
        ],
        "perceiver_standin",
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT,
                                       ["batch", "tokens", dv]),
         helper.make_tensor_value_info("image_mask", TensorProto.BOOL, ["batch", "tokens"])],
        [helper.make_tensor_value_info("latent_tokens", TensorProto.FLOAT, ["batch", 8])],
        initializer=[w, axes, numpy_helper.from_array(np.array([-1], np.int64), "minus1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    directory = lib.write_model_dir(
        tmp_path_factory.mktemp("perceiver") / "perceiver-tiny", model, mechanism="perceiver",
        dynamic_axes={"image_features": {"0": "batch", "1": "tokens"},
                      "image_mask": {"0": "batch", "1": "tokens"}})
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["inputs"][1]["dtype"] = "bool"
    manifest["config"] = dataclasses.asdict(config)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_qcexport_profile_builds_inputs_from_the_mechanism_spec(perceiver_dir, tmp_path):
    result = qcexport("profile", perceiver_dir, "--targets", "ort-cpu,openvino-cpu",
                      "--tokens", "17,65", "--batch", "2", *FAST, "--json", tmp_path / "q.json",
                      "--html", tmp_path / "q.html")
    assert result.exit_code == 0, result.output
    report = ProfileReport.from_json((tmp_path / "q.json").read_text())
    assert report.model_info["mechanism"] == "perceiver"
    ort = report.target("ort-cpu")
    assert [p.input_shapes for p in ort.points] == [
        {"image_features": [2, t, 64], "image_mask": [2, t]} for t in (17, 65)]
    assert [p.flops for p in ort.points] == [2 * 2 * t * 64 * 8 for t in (17, 65)]
    assert all(p.flops_exact for p in ort.points)
    assert 'data-plot="growth-tokens"' in (tmp_path / "q.html").read_text()


def test_spec_feeds_are_the_mechanism_inputs(perceiver_dir):
    from qcexport import mechanisms

    manifest = read_model_dir(perceiver_dir).manifest
    feed = spec_feeds(manifest)(manifest, SweepPoint.of({"batch": 3, "tokens": 257}))
    spec = mechanisms.get("perceiver")
    expected = spec.make_inputs(spec.config("tiny"), seed=0, batch=3, tokens=257)
    assert set(feed) == set(expected)
    for name, tensor in expected.items():
        assert np.array_equal(feed[name], tensor.numpy())
    with pytest.raises(UserError, match="cannot be built with text"):
        spec_feeds(manifest)(manifest, SweepPoint.of({"batch": 1, "text": 4}))
    assert spec_feeds(dataclasses.replace(manifest, mechanism="custom")) is None


BLOCKED = r"""
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"{name} is blocked: qcrun must run without torch")
        return None

sys.meta_path.insert(0, NoTorch())
sys.modules["torch"] = None
from qcrun.cli import main
main(["profile", sys.argv[1], "--target", "ort-cpu,openvino-cpu", "--runs", "3", "--warmup",
      "1", "--op-runs", "2", "--gemm-sizes", "64", "--tokens", "9,17", "--json", sys.argv[2],
      "--html", sys.argv[3]])
"""


def test_qcrun_profile_runs_without_torch(toy_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(toy_dir), str(tmp_path / "p.json"),
         str(tmp_path / "p.html")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = ProfileReport.from_json((tmp_path / "p.json").read_text())
    assert report.target("ort-cpu").status == "ok"
    assert report.target("openvino-cpu").status in ("ok", "skipped")
    assert all(p.flops_exact for t in report.targets for p in t.points)
    assert (tmp_path / "p.html").read_text().count("<svg") >= 3


def test_qcexport_profile_writes_json_and_html_beside_the_model_by_default(perceiver_dir):
    result = qcexport("profile", perceiver_dir, "--targets", "ort-cpu", *FAST)
    assert result.exit_code == 0, result.output
    report = ProfileReport.from_json((perceiver_dir / "profile.json").read_text())
    assert report.target("ort-cpu").points[0].sizes == {"batch": 1, "tokens": 257}
    assert "<svg" in (perceiver_dir / "profile.html").read_text()

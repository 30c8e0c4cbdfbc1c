"""Profiles on real engines: the record, its JSON round trip, per-op folding, the GEMM peak,
and that no timed run includes session creation."""

from __future__ import annotations

import json
import os
import time

import pytest
from qcrun.engines import availability
from qcrun.engines.ort import OrtAdapter
from qcrun.errors import UserError
from qcrun.latency import SweepPoint, percentile, sweep_points, synthetic_feed
from qcrun.profile import (
    NO_METADATA,
    ProfileReport,
    gemm_peak,
    parse_scopes,
    profile_model,
)

OPENVINO = pytest.mark.skipif(not availability("openvino-cpu")[0],
                              reason=availability("openvino-cpu")[1])
LOAD_DELAY_S = 0.5


def _feeds(model_dir):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    return lambda point: synthetic_feed(manifest["inputs"], point.as_dict(), seed=0)


@pytest.fixture(scope="module")
def report(toy_dir) -> ProfileReport:
    """One profile of the toy model on ort-cpu, openvino-cpu and the unavailable ort-cuda."""
    return profile_model(
        toy_dir / "model.onnx",
        ["ort-cpu", "openvino-cpu", "ort-cuda"],
        sweep_points({"batch": [1], "tokens": [17, 65, 257]}),
        _feeds(toy_dir),
        warmup=2,
        runs=12,
        op_runs=3,
        gemm_sizes=(96, 128),
        model_info={"mechanism": "toy", "precision": "fp32"},
    )


@pytest.mark.slow
def test_points_statistics_come_from_their_samples(report, lib):
    ort = report.target("ort-cpu")
    assert ort.status == "ok"
    assert [p.sizes for p in ort.points] == [{"batch": 1, "tokens": t} for t in (17, 65, 257)]
    for point in ort.points:
        stats = point.stats
        assert stats.runs == len(point.samples_ms) == 12
        assert stats.p50_ms == pytest.approx(percentile(point.samples_ms, 50))
        assert stats.p99_ms == pytest.approx(percentile(point.samples_ms, 99))
        assert stats.min_ms == min(point.samples_ms) and stats.max_ms == max(point.samples_ms)
        assert point.input_shapes == {"queries": [1, 2, 4, 8],
                                      "visual": [1, 2, point.sizes["tokens"], 8]}
        assert point.flops == lib.expected_attention_flops(1, point.sizes["tokens"])
        assert point.flops_exact
        assert point.achieved_flops_per_s == pytest.approx(point.flops / (stats.p50_ms / 1e3))
        assert point.fraction_of_peak == pytest.approx(
            point.achieved_flops_per_s / ort.gemm_peak.flops_per_s)
    assert ort.load_s > 0
    assert ort.threads >= 1
    assert ort.engine_options["providers"] == ["CPUExecutionProvider"]
    assert ort.memory["peak_rss_bytes"] >= ort.memory["rss_after_load_bytes"] > 0
    assert report.model_bytes == os.path.getsize(report.model)
    assert report.environment["physical_cores"] >= 1 and report.environment["cpu"]
    assert "onnxruntime" in report.environment["versions"]
    growth = ort.growth()
    assert [(g.axis, g.sizes) for g in growth] == [("tokens", [17, 65, 257])]


@pytest.mark.slow
def test_unavailable_target_is_skipped_with_the_reason(report):
    cuda = report.target("ort-cuda")
    ok, reason = availability("ort-cuda")
    if ok:  # a CUDA host: profiled like the others
        assert cuda.status == "ok" and len(cuda.points) == 3 and cuda.load_s > 0
        return
    assert cuda.status == "skipped"
    assert cuda.reason == reason and "CUDAExecutionProvider" in reason
    assert cuda.points == [] and cuda.load_s is None


@pytest.mark.slow
def test_per_op_breakdown_folds_to_op_types_and_modules(report):
    ops = report.target("ort-cpu").ops
    assert ops.source == "onnxruntime profiling"
    assert ops.point == {"batch": 1, "tokens": 257} and ops.runs == 3
    assert ops.module_metadata
    kinds = {f.key for f in ops.by_op_type()}
    assert "Attention" in kinds
    modules = {f.key: f for f in ops.by_module(depth=1)}
    assert {"cross", "out_proj"} <= set(modules)
    assert sum(f.share for f in ops.by_module(depth=1)) == pytest.approx(1.0)
    assert ops.module_coverage() > 0.9
    # nothing to fuse in this graph: every node keeps its name and its deepest module
    assert {f.key for f in ops.by_module(depth=None)} == {"cross", "cross.to_k", "cross.to_v",
                                                          "out_proj"}
    attention = [n for n in ops.nodes if n.op_type == "Attention"]
    assert attention and attention[0].onnx_node == "sdpa" and attention[0].mapped == "name"
    assert attention[0].module() == "cross"


@pytest.mark.slow
@OPENVINO
def test_openvino_profile_uses_performance_defaults_and_perf_counters(report):
    ov = report.target("openvino-cpu")
    assert ov.status == "ok"
    assert ov.options["accuracy"] is False  # parity's ACCURACY hint is off for profiling
    assert ov.engine_options["EXECUTION_MODE_HINT"] == "PERFORMANCE"
    assert ov.engine_options["PERF_COUNT"] in ("NO", "False")  # the timed session is clean
    assert ov.ops.source == "OpenVINO performance counters"
    assert ov.ops.total_ms > 0
    # every engine node, reorders and decomposition helpers included, traced to a module
    assert ov.ops.module_coverage() == pytest.approx(1.0)
    assert {f.key for f in ov.ops.by_module(depth=1)} == {"cross", "out_proj"}
    assert ov.gemm_peak is not None and set(ov.gemm_peak.rates) == {96, 128}
    # a model declared fp32 is timed in fp32, whatever OpenVINO's default on this CPU
    assert ov.engine_options["INFERENCE_PRECISION_HINT"] == "f32"
    assert ov.inference_precision == "fp32"


@pytest.mark.slow
def test_json_round_trip(report, tmp_path):
    text = report.to_json()
    again = ProfileReport.from_json(text)
    assert again.to_dict() == report.to_dict()
    assert again.to_json() == text
    path = tmp_path / "profile.json"
    path.write_text(text)
    data = json.loads(path.read_text())
    assert data["kind"] == "qcrun.profile" and data["format"] == 1
    ort = next(t for t in data["targets"] if t["target"] == "ort-cpu")
    assert ort["points"][0]["latency"]["runs"] == 12
    assert set(ort["points"][0]["latency"]) >= {"min_ms", "p50_ms", "p90_ms", "p99_ms",
                                                "max_ms", "mean_ms", "std_ms",
                                                "throughput_per_s", "runs"}
    with pytest.raises(UserError, match="not a qcrun profile"):
        ProfileReport.from_dict({"format": 9})


@pytest.mark.slow
def test_markdown_table(report):
    text = report.to_markdown(top=3)
    assert "| target | shape | runs | min | p50 | p90 | p99 | max |" in text
    p50 = report.target("ort-cpu").points[0].stats.p50_ms
    assert "| ort-cpu | batch=1 tokens=17 | 12 | " in text
    assert f"{p50:.3f}" in text
    assert ("**ort-cuda skipped:**" in text) != availability("ort-cuda")[0]
    assert "| tokens | batch=1 | 17 -> 65 -> 257 |" in text
    assert "## ort-cpu: per-op time at batch=1 tokens=257" in text


@pytest.mark.slow
def test_gemm_peak_is_the_fastest_size_of_the_same_engine():
    peak = gemm_peak("ort-cpu", {"graph_optimization_level": "all"}, sizes=(64, 96), runs=4)
    assert set(peak.rates) == {64, 96}
    assert peak.flops_per_s == max(peak.rates.values())
    assert peak.flops == 2 * peak.size**3 and peak.runs == 4
    assert peak.min_ms <= peak.p50_ms
    assert peak.flops_per_s == pytest.approx(peak.flops / (peak.min_ms / 1e3))
    with pytest.raises(UserError, match="GEMM sizes must be positive"):
        gemm_peak("ort-cpu", sizes=0)


def test_module_scopes_from_exporter_metadata():
    assert parse_scopes({"pkg.torch.onnx.name_scopes":
                         "['', 'layers.0', 'layers.0.attn', 'linear']"}) == (
        ("layers.0", "layers.0.attn"), True)
    assert parse_scopes({"pkg.torch.onnx.name_scopes": "['linear']"}) == ((), False)
    assert parse_scopes({"namespace": ": m.Root/layers.1: m.Layer/view: aten.view"}) == (
        ("layers.1",), True)
    assert parse_scopes({"pkg.torch.onnx.name_scopes":
                         "['_empty_nn_module_stack_from_metadata_hook', 'sym_size']"}) == ((), True)
    assert parse_scopes({}) is None


@pytest.mark.slow
def test_model_without_module_metadata_says_so(tmp_path, lib):
    model_dir = lib.write_model_dir(tmp_path / "bare", lib.attention_graph_model(metadata=False))
    report = profile_model(model_dir / "model.onnx", ["ort-cpu"],
                           [SweepPoint.of({"batch": 1, "tokens": 9})], _feeds(model_dir),
                           warmup=1, runs=3, op_runs=2, gemm_sizes=None)
    ops = report.target("ort-cpu").ops
    assert {f.key for f in ops.by_module()} == {NO_METADATA}
    assert ops.module_coverage() == 0.0
    assert any("no module metadata" in w for w in report.warnings)
    assert report.target("ort-cpu").gemm_peak is None


class SlowLoadingOrtAdapter(OrtAdapter):
    """A real onnxruntime adapter whose session creation takes LOAD_DELAY_S longer."""

    def _load(self):
        time.sleep(LOAD_DELAY_S)
        return super()._load()


@pytest.mark.slow
def test_no_timed_run_includes_session_creation(toy_dir):
    loads = []

    def factory(path, target, **options):
        adapter = SlowLoadingOrtAdapter(path, target, **options)
        loads.append(adapter)
        return adapter

    report = profile_model(toy_dir / "model.onnx", ["ort-cpu"],
                           [SweepPoint.of({"batch": 1, "tokens": 9})], _feeds(toy_dir),
                           warmup=0, runs=6, op_runs=0, gemm_sizes=None, count=False,
                           adapter_factory=factory)
    ort = report.target("ort-cpu")
    assert loads and all(not a.is_loaded for a in loads)  # loaded once, closed after
    assert ort.load_s >= LOAD_DELAY_S
    samples = ort.points[0].samples_ms
    assert len(samples) == 6
    # warm-up 0: even the first timed run comes after the (slow) load, not inside it
    assert max(samples) < LOAD_DELAY_S * 1e3 / 5, samples


@pytest.mark.slow
def test_budget_too_short_for_one_run_reports_one_run(toy_dir):
    report = profile_model(toy_dir / "model.onnx", ["ort-cpu"],
                           [SweepPoint.of({"batch": 1, "tokens": 9})], _feeds(toy_dir),
                           warmup=1, budget_s=1e-9, op_runs=0, gemm_sizes=None, count=False)
    point = report.target("ort-cpu").points[0]
    assert point.stats.runs == 1
    assert any("shorter than one run" in w for w in point.warnings)


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"runs": -2}, {"budget_s": 0.0},
                                    {"warmup": -1}, {"op_runs": -1}])
def test_bad_plans_fail_before_loading_anything(toy_dir, kwargs):
    with pytest.raises(UserError):
        profile_model(toy_dir / "model.onnx", ["ort-cpu"], [SweepPoint.of({"batch": 1})],
                      lambda p: {}, adapter_factory=pytest.fail, **kwargs)


@pytest.mark.slow
def test_feed_arrays_are_built_once_per_point(toy_dir):
    built = []

    def feeds(point):
        built.append(point.label())
        return _feeds(toy_dir)(point)

    profile_model(toy_dir / "model.onnx", ["ort-cpu", "openvino-cpu"],
                  sweep_points({"batch": [1, 2], "tokens": [9]}), feeds, warmup=0, runs=2,
                  op_runs=0, gemm_sizes=None, count=False)
    assert built == ["batch=1 tokens=9", "batch=2 tokens=9"]

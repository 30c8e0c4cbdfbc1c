"""The HTML report: produced, self-contained, and carrying its plots as inline SVG."""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET

import pytest
from qcrun.engines import availability
from qcrun.latency import sweep_points, synthetic_feed
from qcrun.profile import ProfileReport, profile_model
from qcrun.report_html import render_html

# Every test reads a profile made on real engines (seconds): `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def report(toy_dir) -> ProfileReport:
    manifest = json.loads((toy_dir / "manifest.json").read_text())
    return profile_model(
        toy_dir / "model.onnx",
        ["ort-cpu", "openvino-cpu", "ort-tensorrt"],
        sweep_points({"batch": [1, 2], "tokens": [17, 129, 513]}),
        lambda point: synthetic_feed(manifest["inputs"], point.as_dict()),
        warmup=1,
        runs=5,
        op_runs=2,
        gemm_sizes=64,
        model_info={"mechanism": "toy", "preset": "tiny"},
    )


def _svgs(page: str) -> dict[str, ET.Element]:
    plots = {}
    for text in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        element = ET.fromstring(text)  # each plot is well-formed SVG
        plots[element.get("data-plot")] = element
    return plots


@pytest.mark.slow
def test_html_has_the_plots(report):
    page = render_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    plots = _svgs(page)
    ran = [t for t in report.targets if t.status == "ok"]
    assert set(plots) == {"latency-per-target", "growth-tokens", "growth-batch",
                          *(f"ops-{t.target}" for t in ran)}

    latency = plots["latency-per-target"]
    rows = [(t.target, p.label()) for t in ran for p in t.points]
    # one p50 dot per (target, shape)
    assert len(latency.findall(f"{SVG}circle")) == len(rows) == len(ran) * 6
    labels = [t.text for t in latency.findall(f"{SVG}text")]
    for target, label in rows:
        assert f"{target} · {label}" in labels

    tokens = plots["growth-tokens"]
    # per target and batch: 3 points, a fitted line and the exponent in the legend
    assert len(tokens.findall(f"{SVG}circle")) == len(ran) * 2 * 3
    legend = " ".join(t.text for t in tokens.findall(f"{SVG}text"))
    for t in ran:
        for fit in t.growth():
            if fit.axis == "tokens":
                assert f"{t.target} (batch={fit.fixed['batch']}): exponent {fit.exponent:.2f}" in (
                    legend)


def test_html_opens_offline_and_escapes(report):
    page = render_html(report)
    without_namespace = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_namespace and "https://" not in without_namespace
    assert "<script" not in page and "<link" not in page and "@import" not in page
    # ort-tensorrt is skipped with the reason where TensorRT is absent; where it is present it
    # is profiled (its plots are on the page) or, if TensorRT cannot build this opset-23
    # Attention graph, reported as failed with the engine's reason, never as skipped
    ok, reason = availability("ort-tensorrt")
    trt = report.target("ort-tensorrt")
    assert (trt.status == "skipped") != ok
    assert ("ort-tensorrt skipped:" in page) != ok
    assert ('data-plot="ops-ort-tensorrt"' in page) == (trt.status == "ok")
    if not ok:
        assert trt.reason == reason and html.escape(reason) in page
    elif trt.status == "failed":
        assert html.escape(trt.reason) in page
    # the JSON source of truth rides along, escaped
    assert "&quot;kind&quot;: &quot;qcrun.profile&quot;" in page


def test_html_from_a_reloaded_report_is_identical(report):
    again = ProfileReport.from_json(report.to_json())
    assert render_html(again) == render_html(report)

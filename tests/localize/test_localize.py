"""Localisation finds the module that was broken, on every CPU target, for every mechanism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from qcrun.boundaries import node_key, node_modules
from qcrun.files import MANIFEST_FILE, read_model_dir
from qcrun.localize import LocalizeReport, format_table, render_html

from qcexport import mechanisms
from qcexport.export.save import save_model_and_manifest
from qcexport.localize.perturb import module_weights, perturb_weight
from qcexport.localize.run import localize_model_dir

TARGETS = ("ort-cpu", "openvino-cpu", "onnx-reference")
pytestmark = pytest.mark.slow


def _middle_module(model_dir: Path) -> str:
    """A module in the middle of the model that owns a weight of its own (deepest first)."""
    model = onnx.load(str(read_model_dir(model_dir).model))
    modules = sorted({m for m in node_modules(model).values() if m}, key=lambda m: -m.count("."))
    readers = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def verifiable(module):
        # A projection without a bias names no parameter of its own: its scope may be a
        # neighbour's (restored after simplification), so the fault's module is not known.
        return all(any(i.startswith(module + ".") for i in n.input)
                   for w in module_weights(model, module) for n in readers.get(w, []))

    owning = [m for m in modules if module_weights(model, m) and verifiable(m)]
    assert owning, "no module owns a weight"
    ordered = [m for m in dict.fromkeys(node_modules(model).values()) if m in owning]
    return ordered[len(ordered) // 2]


def _first_case(model_dir: Path) -> list[str]:
    spec = mechanisms.get(read_model_dir(model_dir).manifest.mechanism)
    return [spec.golden_cases[0].name]


@pytest.mark.parametrize("name", mechanisms.names())
def test_perturbed_weight_is_named_first_on_every_target(name, tiny_models, tmp_path):
    source = tiny_models.dir(name)
    module = _middle_module(source)
    perturb_weight(source, module, tmp_path / "bad", seed=3)
    report = localize_model_dir(tmp_path / "bad", TARGETS, cases=_first_case(source))
    for t in report.targets:
        assert t.method == "exposed", t
        assert t.first is not None, format_table(report)
        assert t.first == module or t.first.startswith(module + "."), format_table(report)
        assert t.final_passed is False  # the fault reaches the outputs: parity fails too
    assert report.peak_rss_bytes and report.peak_rss_bytes > 0


def test_clean_model_has_no_divergence(tiny_models):
    source = tiny_models.dir("qformer")
    report = localize_model_dir(source, ["ort-cpu"], cases=_first_case(source))
    (t,) = report.targets
    assert t.first is None and t.final_passed is True
    assert len(t.modules) > 10 and all(r.verdict == "pass" for r in t.modules)
    # execution order: a layer's children come before the layer, layers in order
    names = [r.module for r in t.modules]
    assert names.index("layers.0.cross_attn") < names.index("layers.0") < names.index("layers.1")


def test_routing_is_localised_inside_the_taken_branch(tiny_models, tmp_path):
    source = tiny_models.dir("routing")
    clean = localize_model_dir(source, ["ort-cpu"])
    taken = [r.module for r in clean.targets[0].modules if r.module.count(".") == 2
             and r.module.split(".")[2] in ("global_attn", "local_attn", "mlp")]
    assert taken, "no branch module was compared"
    module = taken[-1]  # a branch module that some case ran
    perturb_weight(source, module, tmp_path / "bad", seed=1)
    report = localize_model_dir(tmp_path / "bad", ["ort-cpu", "onnx-reference"])
    for t in report.targets:
        assert t.first is not None and t.first.startswith(module), format_table(report)


def test_mask_bug_in_one_cross_attention_is_localised(tiny_models, tmp_path):
    source = tiny_models.copy(tmp_path / "bad", "flamingo-xattn")
    model_dir = read_model_dir(source)
    model = onnx.load(str(model_dir.model))
    modules = node_modules(model)
    masked = [n for n in model.graph.node if n.op_type == "Attention" and len(n.input) > 3
              and n.input[3]]
    assert masked, "no masked attention in the model"
    broken = masked[-1]
    broken.input[3] = ""  # the mask bug: the media mask is dropped
    module = modules[node_key(broken)]
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    save_model_and_manifest(model, model_dir.model, source / MANIFEST_FILE, manifest)
    report = localize_model_dir(source, TARGETS)
    for t in report.targets:
        assert t.first is not None, format_table(report)
        assert t.first == module or t.first.startswith(module + "."), format_table(report)


def test_bisection_finds_the_same_module(tiny_models, tmp_path):
    source = tiny_models.dir("qformer")
    module = "layers.1.self_attn"
    perturb_weight(source, module, tmp_path / "bad")
    report = localize_model_dir(tmp_path / "bad", ["ort-cpu"], cases=_first_case(source),
                                force_bisection=["ort-cpu"])
    (t,) = report.targets
    assert t.method == "bisection"
    assert t.first is not None and t.first.startswith(module), format_table(report)
    # bisection probes a few prefixes, not every module
    assert len(t.modules) < 12


def test_report_round_trips_and_renders_offline(tiny_models, tmp_path):
    source = tiny_models.dir("qformer")
    perturb_weight(source, "layers.0.cross_attn", tmp_path / "bad")
    report = localize_model_dir(tmp_path / "bad", ["ort-cpu"], cases=_first_case(source))
    again = LocalizeReport.from_json(report.to_json())
    assert again.targets[0].first == report.targets[0].first
    html = render_html(report)
    assert "<svg" in html and "<script" not in html and "http" not in html.replace(
        "http://www.w3.org/2000/svg", "")
    markdown = format_table(report, markdown=True)
    assert "| layers.0.cross_attn.to_q |" in markdown.replace("  ", " ")


def _snr(actual, expected) -> float:
    noise = np.sum((actual.astype(np.float64) - expected) ** 2)
    return float(10 * np.log10(np.sum(expected.astype(np.float64) ** 2) / noise))


def test_quantization_and_kernel_error_are_split_per_module(tiny_models, tmp_path):
    """int8: each module's error against the fp32 model (both on onnx-reference) beside each
    runtime's error against onnx-reference on the int8 model; the fp32 model is found through
    the manifest's source_model."""
    from onnx.reference import ReferenceEvaluator

    from qcexport.optimize import quantize_model_dir

    source = tiny_models.copy(tmp_path / "fp32", "qformer")
    quantize_model_dir(source, "int8-dynamic", tmp_path / "int8")
    report = localize_model_dir(tmp_path / "int8", TARGETS, against="fp32")
    quant, *kernels = report.targets
    assert quant.target == "onnx-reference" and "fp32" in quant.against
    assert {t.target for t in kernels} == {"ort-cpu", "openvino-cpu"}
    assert all(t.cases == quant.cases for t in kernels)  # the same case on both sides
    split = report.split
    assert len(split) > 10
    ranks = [min(v for v in (r.quantization_snr_db, *r.kernel_snr_db.values()) if v is not None)
             for r in split]
    assert ranks == sorted(ranks)
    # int8 weights: quantization dominates the worst modules; kernels agree to ~1e-6
    assert split[0].larger == "quantization" and split[0].quantization_snr_db < 60
    assert all(v is None or v > 80 for r in split for v in r.kernel_snr_db.values())
    # the last module's quantization SNR, recomputed here from both models on the evaluator
    last = quant.modules[-1]
    case = next(c for c in spec_cases(source) if c.name == quant.cases[0])

    def value(model_dir):
        model = onnx.load(str(read_model_dir(model_dir).model))
        model.graph.output.append(onnx.helper.make_tensor_value_info(last.tensor, 1, None))
        return ReferenceEvaluator(model).run([last.tensor], case.inputs)[0]

    assert last.snr_db == pytest.approx(_snr(value(tmp_path / "int8"), value(source)), abs=0.01)
    markdown = format_table(report, markdown=True)
    assert "quantization vs kernel error" in markdown


def spec_cases(model_dir: Path):
    from qcrun.golden import load_golden

    from qcexport.golden import golden_path

    manifest = read_model_dir(model_dir).manifest
    return load_golden(golden_path(manifest.mechanism, manifest.preset)).cases


def test_fp32_reference_must_be_the_recorded_source(tiny_models, tmp_path):
    from qcrun.errors import UserError

    from qcexport.optimize import quantize_model_dir

    source = tiny_models.copy(tmp_path / "fp32", "qformer")
    quantize_model_dir(source, "int8-dynamic", tmp_path / "int8")
    model = read_model_dir(source).model
    model.write_bytes(model.read_bytes() + b"\0")  # the source changed since
    with pytest.raises(UserError, match="missing or changed"):
        localize_model_dir(tmp_path / "int8", ["ort-cpu"], against="fp32")

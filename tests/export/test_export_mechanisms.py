"""Every registered mechanism, in every attention form, through convert_mechanism.

Each (mechanism, form) is exported once per session (the ``converted`` fixture); these tests
read the saved model back, count its fused attention nodes (If branches included), check that
the dynamic axes stayed symbolic, and run it in onnxruntime CPU and OpenVINO CPU at the spec's
export and verify shapes against PyTorch eager of the same module.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from qcrun.engines import open_adapter
from qcrun.golden import file_sha256

from qcexport import mechanisms
from qcexport.export.lowering import MS_DOMAIN, count_ops
from qcexport.export.pipeline import DEFAULT_OPSET, weights_sha256

FORMS = ("onnx", "ort", "decomposed")
TARGETS = ("ort-cpu", "openvino-cpu")
MAX_ABS = 1e-4
MHA = f"{MS_DOMAIN}::MultiHeadAttention"

PAIRS = [(name, form) for name in mechanisms.names() for form in FORMS]


def default_opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


@pytest.mark.parametrize(("name", "form"), PAIRS)
def test_fused_attention_nodes(converted, name, form):
    result = converted(name, form)
    model = onnx.load(str(result.path))
    ops = count_ops(model)  # walks If branches: routing keeps its attention there

    assert result.attention == form
    assert result.opset == DEFAULT_OPSET[form] == default_opset(model)
    if form == "onnx":
        assert result.fused_expected > 0
        assert ops["Attention"] == result.fused_expected == result.fused_found
        assert ops[MHA] == 0
    elif form == "ort":
        assert result.fused_expected > 0
        assert ops[MHA] == result.fused_expected == result.fused_found
        assert ops["Attention"] == 0
        assert {op.domain: op.version for op in model.opset_import}.get(MS_DOMAIN) == 1
    else:
        assert result.fused_expected == result.fused_found == 0
        assert ops["Attention"] == ops[MHA] == 0
        assert default_opset(model) == 17
        # The attention is still there, spelled out: at least one Softmax per fused call.
        assert ops["Softmax"] >= converted(name, "onnx").fused_expected
        assert ops["MatMul"] >= 2 * converted(name, "onnx").fused_expected


@pytest.mark.parametrize("name", mechanisms.names())
def test_fused_count_is_the_same_for_onnx_and_ort(converted, name):
    assert converted(name, "onnx").fused_expected == converted(name, "ort").fused_expected


@pytest.mark.parametrize(("name", "form"), PAIRS)
def test_manifest_and_verification(converted, name, form):
    result = converted(name, form)
    spec = mechanisms.get(name)
    manifest = json.loads((result.path.parent / "manifest.json").read_text())

    assert manifest == json.loads(json.dumps(result.manifest))
    assert (manifest["mechanism"], manifest["preset"]) == (name, "tiny")
    assert (manifest["attention"], manifest["opset"]) == (form, DEFAULT_OPSET[form])
    assert manifest["model_sha256"] == file_sha256(result.path)
    # The module the runtime tests compare with is the module that was exported.
    assert manifest["weights_sha256"] == weights_sha256(mechanisms.create(name, "tiny"))
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert props["qcexport.attention"] == form
    assert props["qcexport.weights_sha256"] == manifest["weights_sha256"]

    cases = {"export_shape", f"{spec.verify_case.name}_shape"}
    assert {(r.case, r.output) for r in result.verification} == {
        (c, o) for c in cases for o in spec.output_names
    }
    assert result.passed
    assert all(r.max_abs <= MAX_ABS and r.cosine > 0.99999 for r in result.verification)
    assert not result.warnings


@pytest.mark.parametrize(("name", "form"), PAIRS)
def test_dynamic_axes_stay_symbolic(converted, name, form):
    spec = mechanisms.get(name)
    model = onnx.load(str(converted(name, form).path))
    defaults = {t.name for t in model.graph.initializer}
    graph_inputs = {v.name: v for v in model.graph.input}
    graph_outputs = {v.name: v for v in model.graph.output}
    # An optional input (ONNX: an input with an initializer of its name as its default).
    assert [n for n in graph_inputs if n not in defaults] == list(spec.input_names)
    assert [n for n in graph_inputs if n in defaults] == list(spec.optional_inputs)
    assert list(graph_outputs) == list(spec.output_names)

    wrong = []
    for tensor, axes in spec.dynamic_axes.items():
        if tensor in graph_inputs:
            dims = graph_inputs[tensor].type.tensor_type.shape.dim
            for axis, label in axes.items():
                if dims[axis].HasField("dim_value") or dims[axis].dim_param != label:
                    wrong.append(f"input {tensor}[{axis}]: {dims[axis]} (want {label!r})")
        else:
            # Output axes follow from the inputs; the exporter names them itself (e.g. 'u0'
            # for matryoshka's query count), so only require them to be symbolic.
            dims = graph_outputs[tensor].type.tensor_type.shape.dim
            for axis in axes:
                if dims[axis].HasField("dim_value") or not dims[axis].dim_param:
                    wrong.append(f"output {tensor}[{axis}]: {dims[axis]} (want symbolic)")
    assert not wrong, wrong


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("name", "form"), PAIRS)
def test_runtime_matches_eager(converted, eager_cases, name, form, target):
    path = converted(name, form).path
    cases = eager_cases(name)
    # OpenVINO parity needs EXECUTION_MODE_HINT=ACCURACY: the adapter's `accuracy` option.
    options = {"accuracy": True} if target.startswith("openvino") else {}
    failures = []
    with open_adapter(path, target, **options) as session:
        for case in cases:
            got = session.run({k: v.numpy() for k, v in case.inputs.items()})
            assert set(got) == set(case.outputs)
            for output, expected in case.outputs.items():
                ref = expected.numpy()
                assert got[output].shape == ref.shape, (case.case, output)
                assert np.isfinite(got[output]).all(), (case.case, output)
                max_abs = float(np.abs(got[output] - ref).max())
                if max_abs > MAX_ABS:
                    failures.append(f"{case.case}/{output}: max abs {max_abs:.3g}")
    assert not failures, f"{name} {form} on {target}: {failures}"


@pytest.mark.slow
@pytest.mark.parametrize("name", mechanisms.names())
def test_eager_references_are_not_degenerate(eager_cases, name):
    """A constant or zero output would make the parity checks above pass trivially."""
    export_case, verify_case = eager_cases(name)
    for output, ref in verify_case.outputs.items():
        assert float(ref.std()) > 1e-3, output
        assert tuple(ref.shape) != tuple(export_case.outputs[output].shape), output

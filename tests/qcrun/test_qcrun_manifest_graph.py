"""A model manifest's description of the model is checked against the graph it describes.

No hash covers manifest.json (it holds the model's hash), so every field that can change a run
or a verdict is compared with the graph, which model_sha256 covers. Each edit below is one a
hand, a damaged disk or a copied manifest could make; the real `qcrun verify` must refuse it
with `error: manifest: ...` naming the field, the manifest's value and the graph's. The graph
facts qcrun reads without the onnx package are compared with what onnx itself reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from qcrun.cli import main as qcrun_main
from qcrun.onnxfile import read_summary

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "golden" / "qformer" / "tiny"


@pytest.fixture(scope="module")
def exported(tiny_models) -> dict[str, Path]:
    """The tiny Q-Former in each attention form, shared by the session: copy before editing."""
    return {
        "onnx": tiny_models.dir("qformer", "tiny"),
        "ort": tiny_models.dir("qformer", "tiny", attention="ort"),
        "decomposed": tiny_models.dir("qformer", "tiny", attention="decomposed", opset=17),
    }


@pytest.fixture
def qformer(tmp_path, exported) -> Path:
    return Path(shutil.copytree(exported["onnx"], tmp_path / "qformer"))


def verify(directory: Path):
    result = CliRunner().invoke(qcrun_main, ["verify", str(directory), "--target", "ort-cpu",
                                             "--golden", str(GOLDEN)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _rename(mapping: dict, old: str, new: str) -> dict:
    return {new if k == old else k: v for k, v in mapping.items()}


def _set(path: tuple, value):
    def edit(m):
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    return edit


def _swap_inputs(m):
    m["inputs"][0], m["inputs"][1] = m["inputs"][1], m["inputs"][0]


def _rename_axes_key(m):
    m["dynamic_axes"] = _rename(m["dynamic_axes"], "image_features", "image_featurez")


# (id, edit, what the message must name); values read from the tiny Q-Former's graph:
# image_features [batch, tokens, 48] float32, text_ids [batch, text] int64 indexing a vocabulary
# of 100, query_outputs [batch, 8, 64], three opset-23 Attention nodes.
EDITS = [
    ("axes-key-renamed", _rename_axes_key,
     "dynamic_axes says an entry 'image_featurez', but the graph has no input or output"),
    ("axes-label", _set(("dynamic_axes", "image_features", "1"), "tokenz"),
     "dynamic_axes['image_features']['1'] says 'tokenz', but the graph has symbolic axis "
     "'tokens' there"),
    ("axes-fixed-dim", _set(("dynamic_axes", "image_features", "2"), "width"),
     "but the graph has fixed size 48 there"),
    ("axes-past-rank", _set(("dynamic_axes", "query_outputs", "7"), "batch"),
     "no axis '7' in 'query_outputs' (rank 3)"),
    ("output-axis-label", _set(("dynamic_axes", "query_outputs", "0"), "tokens"),
     "says 'tokens', but the graph has symbolic axis 'batch'"),
    ("inputs-order", _swap_inputs, "inputs says ['text_ids', 'image_features', 'text_mask']"),
    ("input-name", _set(("inputs", 0, "name"), "pixels"), "inputs says ['pixels'"),
    ("input-dtype", _set(("inputs", 0, "dtype"), "float16"),
     "inputs[0] ('image_features') dtype says float16, but the graph has dtype float32"),
    ("input-fixed-dim", _set(("inputs", 0, "shape", 2), 64),
     "says ['batch', 'tokens', 64], but the graph has shape ['batch', 'tokens', 48]"),
    ("input-fixed-for-symbolic", _set(("inputs", 0, "shape", 1), 49),
     "says ['batch', 49, 48]"),
    ("input-symbolic-for-fixed", _set(("inputs", 0, "shape", 2), "width"),
     "says ['batch', 'tokens', 'width']"),
    ("input-rank", _set(("inputs", 0, "shape"), ["batch", "tokens"]),
     "says ['batch', 'tokens'], but the graph has shape ['batch', 'tokens', 48]"),
    ("output-name", _set(("outputs", 0, "name"), "latents"), "outputs says ['latents']"),
    ("output-dim", _set(("outputs", 0, "shape", 1), 16), "says ['batch', 16, 64]"),
    ("opset", _set(("opset",), 17), "opset says 17, but the graph has opset import 23"),
    ("attention-ort", _set(("attention",), "ort"),
     "attention says 'ort', but the graph has 3 'onnx'"),
    ("attention-decomposed", _set(("attention",), "decomposed"),
     "attention says 'decomposed', but the graph has 3 'onnx'"),
    ("attention-unknown", _set(("attention",), "onnz"), "attention says 'onnz'"),
    ("fused-count", _set(("fused_attention", "found"), 2),
     "fused_attention says 2 'onnx' node(s), but the graph has 3 'onnx'"),
    ("config", _set(("config", "dim"), 96), "config says"),
    ("preset", _set(("preset",), "base"),
     "preset says \"base\", but the graph has tiny in its metadata (qcexport.preset)"),
    ("mechanism", _set(("mechanism",), "perceiver"), "mechanism says \"perceiver\""),
    ("versions", _set(("versions", "torch"), "1.0"), "versions['torch'] says \"1.0\""),
    ("range-wider", _set(("inputs", 1, "range"), {"min": 0, "max": 100}),
     "input 'text_ids' says range [0, 100], but the graph has it indexing a table of 100 rows"),
    ("range-negative", _set(("inputs", 1, "range"), {"min": -1, "max": 99}),
     "says range [-1, 99]"),
    ("range-dropped", lambda m: m["inputs"][1].pop("range"), "input 'text_ids' says no range"),
    ("export-sizes", _set(("export_sizes",), {"tokenz": 2}), "export_sizes['tokenz']"),
    ("verification-output", _set(("verification", 0, "output"), "latents"),
     "verification[0].output says 'latents'"),
    ("verification-shape", _set(("verification", 0, "shape"), [2, 8]),
     "verification[0].shape says [2, 8]"),
    ("verification-failed", _set(("verification", 0, "passed"), False),
     "records a failed export check"),
    ("verification-type", _set(("verification", 0, "max_abs"), "x"), "expected a number"),
    ("structure", _set(("output_structure", "outputs", 0, "name"), "latents"),
     "output_structure.outputs says ['latents']"),
    ("files-null", _set(("files",), None), "expected a list, got null"),
]


def test_the_unedited_directory_passes(qformer):
    result = verify(qformer)
    assert result.exit_code == 0, result.output
    assert "3 passed, 0 failed" in result.stdout


@pytest.mark.parametrize(("edit", "message"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_a_manifest_that_is_not_its_graph_is_refused(qformer, edit, message):
    path = qformer / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    result = verify(qformer)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "passed" not in result.stdout  # nothing ran
    stage = "manifest" if "expected" not in message else "verify"
    assert result.stderr.startswith(f"error: {stage}: "), result.stderr
    assert message in result.stderr, result.stderr
    if stage == "manifest":
        assert "fix: " in result.stderr and "qcexport convert" in result.stderr


def test_other_attention_forms_are_read_from_the_graph(tmp_path, exported):
    ort = Path(shutil.copytree(exported["ort"], tmp_path / "ort"))
    assert verify(ort).exit_code == 0
    manifest = json.loads((ort / "manifest.json").read_text())
    manifest["attention"] = "onnx"
    (ort / "manifest.json").write_text(json.dumps(manifest))
    result = verify(ort)
    assert result.exit_code == 1
    assert "attention says 'onnx', but the graph has 3 'ort'" in result.stderr

    decomposed = Path(shutil.copytree(exported["decomposed"], tmp_path / "dec"))
    assert verify(decomposed).exit_code == 0
    manifest = json.loads((decomposed / "manifest.json").read_text())
    manifest["opset"] = 23
    (decomposed / "manifest.json").write_text(json.dumps(manifest))
    assert "opset says 23, but the graph has opset import 17" in verify(decomposed).stderr


@pytest.mark.parametrize("form", ["onnx", "ort", "decomposed"])
def test_graph_facts_read_without_onnx_match_onnx(exported, form):
    path = exported[form] / "model.onnx"
    summary = read_summary(path)
    model = onnx.load(str(path), load_external_data=False)

    def dims(value):
        return tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                     for d in value.type.tensor_type.shape.dim)

    initializers = {t.name for t in model.graph.initializer}
    expected_inputs = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(
        v.type.tensor_type.elem_type).name, dims(v)) for v in model.graph.input
        if v.name not in initializers]
    assert [(v.name, v.dtype, v.shape) for v in summary.inputs] == expected_inputs
    assert [(v.name, v.shape) for v in summary.outputs] == [(v.name, dims(v))
                                                            for v in model.graph.output]
    assert summary.opsets == {o.domain or "": o.version for o in model.opset_import}
    attention = sum(n.op_type == "Attention" and n.domain in ("", "ai.onnx")
                    for n in model.graph.node)
    mha = sum(n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"
              for n in model.graph.node)
    assert summary.fused_attention() == {k: v for k, v in
                                         (("onnx", attention), ("ort", mha)) if v}
    assert summary.attention == form
    assert {t.name: tuple(t.dims) for t in model.graph.initializer}.items() \
        <= summary.tables.items()
    assert summary.index_bounds() == {"text_ids": 100}  # the tiny preset's vocabulary


def test_a_graph_written_in_parts_is_read_whole(tmp_path, exported):
    """Protobuf merges a message field that occurs twice; a writer that streams its weights
    emits the graph in parts (the inputs in the first, initializers after), and the graph is
    still one graph: nothing read from the first part may be lost or taken for an input."""
    model = onnx.load(str(exported["onnx"] / "model.onnx"))
    weights = onnx.GraphProto()
    weights.initializer.extend(model.graph.initializer)
    del model.graph.initializer[:]
    tag = bytes([7 << 3 | 2])  # ModelProto.graph, length-delimited
    part = weights.SerializeToString()
    length = bytearray()
    n = len(part)
    while True:
        length.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    path = tmp_path / "parts.onnx"
    path.write_bytes(model.SerializeToString() + tag + bytes(length) + part)
    whole = onnx.load(str(path))
    assert len(whole.graph.initializer) == len(weights.initializer)  # onnx merges them too
    summary, original = read_summary(path), read_summary(exported["onnx"] / "model.onnx")
    assert summary.inputs == original.inputs and summary.outputs == original.outputs
    assert summary.initializers == original.initializers
    assert summary.index_bounds() == {"text_ids": 100}

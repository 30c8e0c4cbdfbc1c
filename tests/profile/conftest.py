"""Fixtures for the profile tests: small hand-built ONNX models and model directories.

The models are built with onnx.helper so that their FLOPs are known by hand, and their nodes
carry the module metadata the dynamo exporter writes (``pkg.torch.onnx.name_scopes``), so that
per-module folding can be checked exactly. Every engine is real: nothing mocks a runtime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

DIM = 8
HEADS = 2
QUERIES = 4


def _scopes(*names: str) -> dict[str, str]:
    return {"pkg.torch.onnx.name_scopes": repr(["", *names])}


def _node(op, inputs, outputs, name, scopes=None, **attrs):
    node = helper.make_node(op, inputs, outputs, name=name, **attrs)
    for key, value in (scopes or {}).items():
        node.metadata_props.add(key=key, value=value)
    return node


def attention_graph_model(tokens: int | str = "tokens", *, metadata: bool = True):
    """queries[batch, 2, 4, 8] attend to visual[batch, 2, tokens, 8] projected by wk, wv
    (MatMul), through the opset-23 Attention op; then an output projection (MatMul)."""
    rng = np.random.default_rng(0)
    weights = {k: (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
               for k in ("wk", "wv", "wo")}
    meta = (lambda *n: _scopes(*n)) if metadata else (lambda *n: None)
    graph = helper.make_graph(
        [
            _node("MatMul", ["visual", "wk"], ["k"], "to_k", meta("cross", "cross.to_k", "mm")),
            _node("MatMul", ["visual", "wv"], ["v"], "to_v", meta("cross", "cross.to_v", "mm_1")),
            _node("Attention", ["queries", "k", "v"], ["attended"], "sdpa",
                  meta("cross", "sdpa")),
            _node("MatMul", ["attended", "wo"], ["out"], "to_out",
                  meta("out_proj", "mm_2")),
        ],
        "cross_attention",
        [
            helper.make_tensor_value_info("queries", TensorProto.FLOAT,
                                          ["batch", HEADS, QUERIES, DIM]),
            helper.make_tensor_value_info("visual", TensorProto.FLOAT,
                                          ["batch", HEADS, tokens, DIM]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", HEADS, QUERIES, DIM])],
        initializer=[numpy_helper.from_array(w, k) for k, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def expected_attention_flops(batch: int, tokens: int) -> int:
    projections = 2 * (2 * batch * HEADS * tokens * DIM * DIM)  # k and v
    attention = 2 * batch * HEADS * QUERIES * tokens * (DIM + DIM)  # QK^T and PV
    out = 2 * batch * HEADS * QUERIES * DIM * DIM
    return projections + attention + out


def write_model_dir(directory: Path, model, *, dynamic_axes=None, mechanism="toy") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    inputs = []
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        inputs.append({
            "name": value.name,
            "dtype": "float32",
            "shape": [d.dim_param or d.dim_value for d in dims],
        })
    manifest = {
        "format": 1,
        "mechanism": mechanism,
        "preset": "tiny",
        "precision": "fp32",
        "attention": "onnx",
        "model": "model.onnx",
        "model_sha256": hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest(),
        "inputs": inputs,
        "outputs": [{"name": v.name, "dtype": "float32",
                     "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
                    for v in model.graph.output],
        "dynamic_axes": dynamic_axes
        or {"queries": {"0": "batch"}, "visual": {"0": "batch", "2": "tokens"}},
        # the axis roles an export of a registered mechanism writes (``AxisRoles``' defaults)
        "roles": {"batch": "batch", "tokens": "tokens"},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """A model directory with a dynamic token axis and module metadata on every node."""
    return write_model_dir(tmp_path_factory.mktemp("toy"), attention_graph_model())


@pytest.fixture(scope="session")
def static_dir(tmp_path_factory) -> Path:
    """The same model exported with the token axis fixed at 5 (the spec wanted it dynamic)."""
    return write_model_dir(tmp_path_factory.mktemp("static"), attention_graph_model(tokens=5))


@pytest.fixture(scope="session")
def lib() -> SimpleNamespace:
    return SimpleNamespace(
        attention_graph_model=attention_graph_model,
        expected_attention_flops=expected_attention_flops,
        write_model_dir=write_model_dir,
        node=_node,
        scopes=_scopes,
    )

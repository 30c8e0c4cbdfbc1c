"""Fixtures for the qcrun tests: tiny hand-built ONNX models and golden sets written here.

The models are built with onnx.helper and their expected outputs computed with numpy in
float64, standing in for the PyTorch eager outputs qcexport writes. Nothing here imports torch
and nothing mocks an engine: every test runs the real onnxruntime, OpenVINO and onnx.reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from qcrun.golden import array_sha256, file_sha256

PERTURBATION = 1e-2


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


# --- model 1: token features and their mean (MatMul + Add + ReduceMean), opset 17 ------------


def linear_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": (rng.standard_normal((8, 6)) / np.sqrt(8)).astype(np.float32),
        "b": rng.standard_normal(6).astype(np.float32),
    }


def make_linear_model(path: Path, weights: dict[str, np.ndarray], perturb: float = 0.0) -> Path:
    """x[batch, tokens, 8] -> tokens = x @ w + b, pooled = mean over tokens."""
    w = weights["w"].copy()
    w[0, 0] += perturb
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["tokens"]),
            helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 8])],
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "tokens", 6]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 6]),
        ],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(weights["b"], "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _save(model, path)


def linear_reference(weights, x: np.ndarray) -> dict[str, np.ndarray]:
    tokens = x.astype(np.float64) @ weights["w"].astype(np.float64) + weights["b"]
    return {
        "tokens": tokens.astype(np.float32),
        "pooled": tokens.mean(axis=1).astype(np.float32),
    }


def linear_cases(weights) -> list[dict]:
    rng = np.random.default_rng(1)
    cases = []
    for name, description, shape in (
        ("single", "one image, three tokens", (1, 3, 8)),
        ("batch", "two images, seventeen tokens", (2, 17, 8)),
    ):
        x = rng.standard_normal(shape).astype(np.float32)
        outputs = linear_reference(weights, x)
        cases.append(
            {"name": name, "description": description, "inputs": {"x": x}, "outputs": outputs}
        )
    return cases


# --- model 2: learned-query cross-attention with the opset-23 Attention op --------------------


def attention_weights(seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal((8, 8)) / np.sqrt(8)).astype(np.float32) for k in ("wk", "wv")}


def make_attention_model(path: Path, weights, perturb: float = 0.0) -> Path:
    """queries[batch, 2, 4, 8] attend to visual[batch, 2, tokens, 8] projected by wk, wv."""
    wv = weights["wv"].copy()
    wv[0, 0] += perturb
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["visual", "wk"], ["k"]),
            helper.make_node("MatMul", ["visual", "wv"], ["v"]),
            helper.make_node("Attention", ["queries", "k", "v"], ["attended"]),
        ],
        "cross_attention",
        [
            helper.make_tensor_value_info("queries", TensorProto.FLOAT, ["batch", 2, 4, 8]),
            helper.make_tensor_value_info("visual", TensorProto.FLOAT, ["batch", 2, "tokens", 8]),
        ],
        [helper.make_tensor_value_info("attended", TensorProto.FLOAT, ["batch", 2, 4, 8])],
        initializer=[
            numpy_helper.from_array(weights["wk"], "wk"),
            numpy_helper.from_array(wv, "wv"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    return _save(model, path)


def attention_reference(weights, queries: np.ndarray, visual: np.ndarray) -> dict:
    q, x = queries.astype(np.float64), visual.astype(np.float64)
    k, v = x @ weights["wk"].astype(np.float64), x @ weights["wv"].astype(np.float64)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return {"attended": (probs @ v).astype(np.float32)}


def attention_cases(weights) -> list[dict]:
    rng = np.random.default_rng(3)
    cases = []
    for name, description, batch, tokens in (
        ("few-tokens", "one image, five visual tokens", 1, 5),
        ("many-tokens", "three images, 33 visual tokens", 3, 33),
    ):
        q = rng.standard_normal((batch, 2, 4, 8)).astype(np.float32)
        v = rng.standard_normal((batch, 2, tokens, 8)).astype(np.float32)
        cases.append(
            {
                "name": name,
                "description": description,
                "inputs": {"queries": q, "visual": v},
                "outputs": attention_reference(weights, q, v),
            }
        )
    return cases


# --- golden sets, written the way qcexport writes them --------------------------------------


def write_golden(
    directory: Path, mechanism: str, preset: str, weights: dict, cases: list[dict], seed: int = 0
) -> Path:
    """A golden set in format 1: manifest.json, weights.npz and one npz per case."""
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "weights.npz", **weights)
    entries = []
    for case in cases:
        file = f"{case['name']}.npz"
        arrays = {f"in.{k}": v for k, v in case["inputs"].items()}
        arrays.update({f"out.{k}": v for k, v in case["outputs"].items()})
        np.savez(directory / file, **arrays)

        def specs(group):
            return {
                k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": array_sha256(v)}
                for k, v in group.items()
            }

        entries.append(
            {
                "name": case["name"],
                "description": case["description"],
                "file": file,
                "sha256": file_sha256(directory / file),
                "inputs": specs(case["inputs"]),
                "outputs": specs(case["outputs"]),
            }
        )
    manifest = {
        "format": 1,
        "mechanism": mechanism,
        "preset": preset,
        "config": {"dim": 8},
        "seed": seed,
        "versions": {"numpy": np.__version__},
        "weights": {"file": "weights.npz", "sha256": file_sha256(directory / "weights.npz")},
        "cases": entries,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def _specs(values) -> list[dict]:
    return [{"name": v.name,
             "dtype": helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]}
            for v in values]


def write_model_dir(
    directory: Path,
    model: Path,
    golden: Path | None,
    /,
    *,
    mechanism: str,
    preset: str = "tiny",
    precision: str = "fp32",
    **extra,
) -> Path:
    """An exported-model directory as `qcexport convert` writes it (format 1: the model, its
    sha256, input and output specs read from the graph), with ``extra`` manifest keys."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, directory / "model.onnx")
    if golden is not None:
        shutil.copytree(golden, directory / "golden")
    graph = onnx.load(str(model)).graph
    manifest = {"format": 1, "mechanism": mechanism, "preset": preset, "precision": precision,
                "model": "model.onnx", "model_sha256": file_sha256(directory / "model.onnx"),
                "files": ["model.onnx"], "inputs": _specs(graph.input),
                "outputs": _specs(graph.output), **extra}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


@dataclass
class Example:
    """A model, the same model with one weight moved by PERTURBATION, and its golden set."""

    name: str
    model: Path
    perturbed: Path
    golden: Path
    outputs: list[str]
    cases: list[str]
    weights: dict = field(repr=False, default_factory=dict)


@pytest.fixture(scope="session")
def linear(tmp_path_factory) -> Example:
    root = tmp_path_factory.mktemp("linear")
    weights = linear_weights()
    cases = linear_cases(weights)
    return Example(
        name="linear",
        model=make_linear_model(root / "model.onnx", weights),
        perturbed=make_linear_model(root / "perturbed.onnx", weights, PERTURBATION),
        golden=write_golden(root / "golden" / "linear" / "tiny", "linear", "tiny", weights, cases),
        outputs=["tokens", "pooled"],
        cases=[c["name"] for c in cases],
        weights=weights,
    )


@pytest.fixture(scope="session")
def attention(tmp_path_factory) -> Example:
    root = tmp_path_factory.mktemp("attention")
    weights = attention_weights()
    cases = attention_cases(weights)
    return Example(
        name="attention",
        model=make_attention_model(root / "model.onnx", weights),
        perturbed=make_attention_model(root / "perturbed.onnx", weights, PERTURBATION),
        golden=write_golden(root / "golden", "cross-attention", "tiny", weights, cases),
        outputs=["attended"],
        cases=[c["name"] for c in cases],
        weights=weights,
    )


@pytest.fixture(params=["linear", "attention"])
def example(request) -> Example:
    return request.getfixturevalue(request.param)


@pytest.fixture
def golden_copy(tmp_path, linear) -> Path:
    """A writable copy of the linear golden set, for tests that damage it."""
    return Path(shutil.copytree(linear.golden, tmp_path / "golden"))


@pytest.fixture(scope="session")
def lib() -> SimpleNamespace:
    """The builders above, for tests that need a model or golden set of their own."""
    return SimpleNamespace(
        save=_save,
        make_linear_model=make_linear_model,
        linear_weights=linear_weights,
        linear_cases=linear_cases,
        linear_reference=linear_reference,
        write_golden=write_golden,
        write_model_dir=write_model_dir,
    )

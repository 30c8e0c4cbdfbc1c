"""qcexport.export.convert on modules that are not in the registry.

Bring-your-own modules (fused SDPA and hand-written attention), an axis the exporter fixes,
verification failures, and the atomic save: a failed convert never leaves a model behind and
never damages the one already there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from qcrun import files
from qcrun.engines import open_adapter
from qcrun.errors import UserError
from torch import nn

from qcexport.export import convert
from qcexport.export import pipeline as pipeline_module
from qcexport.export.lowering import MS_DOMAIN, count_ops

# Every test converts a module (seconds each): `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

AXES = {"x": {0: "batch", 1: "tokens"}}


def example(batch: int = 2, tokens: int = 5, dim: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, tokens, dim, generator=g)}


# --- bring your own module -------------------------------------------------------------------


@pytest.mark.parametrize(("form", "node"), [("onnx", "Attention"),
                                            ("ort", f"{MS_DOMAIN}::MultiHeadAttention")])
def test_sdpa_module_converts_with_fused_attention(tmp_path, custom_modules, form, node):
    module = custom_modules["sdpa"]()
    result = convert(module, example(), AXES, attention=form, output_dir=tmp_path / "out")

    assert result.fused_expected == result.fused_found == 2  # two SDPA calls in forward
    assert count_ops(onnx.load(str(result.path)))[node] == 2
    assert not result.warnings
    # Verified at the export shape and at one with every dynamic axis resized.
    shapes = {r.case: r.shape for r in result.verification}
    assert shapes == {"export_shape": [2, 4, 16], "other_shape": [3, 4, 16]}
    assert all(r.passed and r.max_abs <= 1e-4 for r in result.verification)

    # And at a shape of our own, in the saved model.
    feed = example(batch=4, tokens=23, seed=7)
    with torch.no_grad():
        expected = module(**feed).numpy()
    with open_adapter(result.path, "ort-cpu") as session:
        got = session.run({"x": feed["x"].numpy()})["output"]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_einsum_attention_converts_unfused_with_a_warning(tmp_path, custom_modules):
    result = convert(custom_modules["einsum"](), example(), AXES, output_dir=tmp_path / "out")

    assert result.attention == "onnx"
    assert result.fused_expected == result.fused_found == 0
    assert count_ops(onnx.load(str(result.path)))["Attention"] == 0
    assert any("no fused attention" in w for w in result.warnings), result.warnings
    assert result.manifest["warnings"] == result.warnings
    assert result.passed and len(result.verification) == 2


# --- an axis the exporter fixes --------------------------------------------------------------


class LinspacePositions(nn.Module):
    """Adds positions 0..1 over the token axis; linspace(steps=n) makes n a constant."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.linspace(0, 1, steps=x.shape[1])  # [N]
        return self.proj(x) + pos[None, :, None]


class ArangePositions(LinspacePositions):
    """The same positions built from the symbolic size, as the error's hint suggests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        pos = torch.arange(n, dtype=x.dtype) / (n - 1)  # [N]
        return self.proj(x) + pos[None, :, None]


def test_fixed_token_axis_is_an_error_naming_the_axis(tmp_path, listdir):
    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        convert(LinspacePositions(), example(), AXES, output_dir=out)

    message = str(info.value)
    assert info.value.stage == "export"
    assert "fixed" in message
    assert "'tokens'" in message and "x[1]" in message
    assert "batch" not in message.split("fix:")[0]  # only the axis that was fixed is named
    assert listdir(out) == []


def test_symbolic_positions_keep_the_token_axis(tmp_path):
    module = ArangePositions()
    result = convert(module, example(), AXES, output_dir=tmp_path / "out")
    assert result.manifest["inputs"][0]["shape"] == ["batch", "tokens", 16]
    feed = example(batch=1, tokens=9, seed=3)
    with torch.no_grad():
        expected = module(**feed).numpy()
    with open_adapter(result.path, "ort-cpu") as session:
        np.testing.assert_allclose(session.run({"x": feed["x"].numpy()})["output"], expected,
                                   atol=1e-5, rtol=1e-4)


class BranchesOnValues(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.proj(x)
        return -self.proj(x)


def test_data_dependent_control_flow_names_the_line(tmp_path, listdir):
    with pytest.raises(UserError) as info:
        convert(BranchesOnValues(), example(), AXES, output_dir=tmp_path / "out")
    message = str(info.value)
    assert info.value.stage == "export"
    assert "data-dependent" in message and "if x.sum() > 0:" in message
    assert "\x1b" not in message  # the exporter's terminal colours are stripped
    assert "torch.cond" in info.value.hint
    assert listdir(tmp_path / "out") == []


# --- verification failures -------------------------------------------------------------------


class DriftsWhenExported(nn.Module):
    """Adds 0.01 only while being exported: the ONNX model really differs from eager."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if torch.compiler.is_exporting():
            y = y + 0.01
        return y


def test_verify_failure_writes_nothing(tmp_path, listdir):
    out = tmp_path / "fresh"
    with pytest.raises(UserError) as info:
        convert(DriftsWhenExported(), example(), AXES, output_dir=out)

    assert info.value.stage == "verify"
    message = str(info.value)
    assert "export_shape/output" in message and "other_shape/output" in message
    assert "max abs 0.01" in message
    assert listdir(out) == []


def test_verify_failure_keeps_the_previous_model(tmp_path, listdir, monkeypatch):
    out = tmp_path / "out"
    first = convert(LinspacePositions(), example(), {"x": {0: "batch"}}, output_dir=out)
    before = {name: (out / name).read_bytes() for name in listdir(out)}

    real_verify = pipeline_module.verify

    def failing_verify(*args):
        records = real_verify(*args)
        records[-1] = dataclasses.replace(records[-1], verdict="fail",
                                          message="forced by the test")
        return records

    monkeypatch.setattr(pipeline_module, "verify", failing_verify)
    with pytest.raises(UserError, match="forced by the test"):
        convert(LinspacePositions(), example(), {"x": {0: "batch"}}, output_dir=out)

    assert first.passed
    assert {name: (out / name).read_bytes() for name in listdir(out)} == before


# --- atomic save -----------------------------------------------------------------------------


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def good_model_dir(tmp_path, listdir):
    """A directory holding a converted model and manifest, and their bytes."""
    out = tmp_path / "out"
    convert(LinspacePositions(), example(), {"x": {0: "batch"}}, output_dir=out)
    assert listdir(out) == ["manifest.json", "model.onnx"]
    return out, {name: (out / name).read_bytes() for name in listdir(out)}


def other_weights() -> nn.Module:
    torch.manual_seed(123)  # different weights: a completed save would change the bytes
    return LinspacePositions()


@pytest.mark.parametrize("interruption", [OSError(28, "No space left on device"),
                                          KeyboardInterrupt()])
def test_interrupted_save_leaves_the_previous_model(good_model_dir, listdir, monkeypatch,
                                                   interruption):
    out, before = good_model_dir
    calls = []

    real_write = files.fsync_write

    def half_then_fail(path, data):
        # the new pair is staged in a hidden directory inside out; verification saves a copy
        # to its own temporary directory elsewhere
        if path.parent.parent != out or not path.parent.name.startswith(".qcexport-new-"):
            return real_write(path, data)
        calls.append(path)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise interruption

    monkeypatch.setattr(files, "fsync_write", half_then_fail)
    # A full disk is the user's to fix (clean error); Ctrl-C passes through untouched.
    expected = UserError if isinstance(interruption, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        convert(other_weights(), example(), {"x": {0: "batch"}}, output_dir=out)

    assert len(calls) == 1 and calls[0].name == "model.onnx"  # the model came first
    assert listdir(out) == ["manifest.json", "model.onnx"]  # no temporary left behind
    assert {name: (out / name).read_bytes() for name in listdir(out)} == before
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))


def test_completed_save_replaces_model_and_manifest(good_model_dir, listdir):
    out, before = good_model_dir
    result = convert(other_weights(), example(), {"x": {0: "batch"}}, output_dir=out)

    assert listdir(out) == ["manifest.json", "model.onnx"]
    assert (out / "model.onnx").read_bytes() != before["model.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_sha256"] == sha(out / "model.onnx") == result.manifest["model_sha256"]


def test_failure_writing_the_manifest_keeps_model_and_manifest_a_pair(good_model_dir, listdir,
                                                                      monkeypatch):
    out, _ = good_model_dir
    real_write = files.fsync_write

    def fail_on_manifest(path, data):
        if path.name == "manifest.json" and path.parent.name.startswith(".qcexport-new-"):
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(files, "fsync_write", fail_on_manifest)
    with pytest.raises(UserError, match="could not write .* still holds the previous model and "
                       "manifest, unchanged"):
        convert(other_weights(), example(), {"x": {0: "batch"}}, output_dir=out)

    assert listdir(out) == ["manifest.json", "model.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_sha256"] == sha(out / "model.onnx")

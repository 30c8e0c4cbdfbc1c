"""Modules from outside the zoo, as a user brings them: transformers models with their own
output recording, positional example inputs, and a module that fixes its own token axis."""

from __future__ import annotations

import numpy as np
import pytest
import qcrun
import torch
from qcrun.errors import UserError
from torch import nn

import qcexport

# Every test converts a third-party module (seconds each): `make test-fast` leaves them out.
pytestmark = pytest.mark.slow


def test_transformers_hidden_states_are_exported(tmp_path):
    """transformers records hidden states through a per-class registry (keyed on the class
    name): the export wrapper must not hide the user's class from it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    result = qcexport.convert(model, {"pixel_values": pixels, "output_hidden_states": True},
                              {"pixel_values": {0: "batch"}}, output_dir=tmp_path / "clip")
    assert result.output_names == ["last_hidden_state", "pooler_output", "hidden_states.0",
                                   "hidden_states.1", "hidden_states.2"]
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_hidden_states=True)
    with qcrun.load(tmp_path / "clip", target="ort-cpu") as app:
        got = app(pixel_values=pixels.numpy())
    for i, hidden in enumerate(expected.hidden_states):
        np.testing.assert_allclose(got[f"hidden_states.{i}"], hidden.numpy(), atol=1e-4)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, image, text):
        return self.proj(image).sum(1) + self.proj(text).mean(1)


def test_positional_example_inputs_are_named_after_the_forward(tmp_path):
    torch.manual_seed(0)
    module = Pair().eval()
    image, text = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    result = qcexport.convert(module, (image, text), {"image": {1: "tokens"}},
                              output_dir=tmp_path / "pair")
    assert [i["name"] for i in result.manifest["inputs"]] == ["image", "text"]
    with qcrun.load(tmp_path / "pair", target="ort-cpu") as app:
        got = app(image=np.ones((2, 7, 8), np.float32), text=text.numpy())
    with torch.no_grad():
        expected = module(torch.ones(2, 7, 8), text)
    np.testing.assert_allclose(got["output"], expected.numpy(), atol=1e-5)


class Star(nn.Module):
    def forward(self, *xs):
        return xs[0] * 2


def test_positional_inputs_of_a_variadic_forward_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"takes \*xs") as info:
        qcexport.convert(Star(), (torch.randn(2, 3),), output_dir=tmp_path / "star")
    assert info.value.stage == "export"
    assert not (tmp_path / "star" / "model.onnx").exists()


class LearnedPositions(nn.Module):
    """Adds a learned table of 16 positions: the token axis is fixed by the module."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        return x + self.positions


def test_a_token_axis_the_module_fixes_is_named(tmp_path):
    with pytest.raises(UserError) as info:
        qcexport.convert(LearnedPositions(), {"x": torch.randn(2, 16, 32)},
                         {"x": {0: "batch", 1: "tokens"}}, output_dir=tmp_path / "pos")
    text = str(info.value)
    assert "axis fixed by the module" in text and "tokens=" in text
    assert "batch=" not in text  # batch is free: only the culprit is named
    assert "remove the axis from dynamic_axes" in text
    assert not (tmp_path / "pos" / "model.onnx").exists()
    # the same module with only the batch dynamic converts
    result = qcexport.convert(LearnedPositions(), {"x": torch.randn(2, 16, 32)},
                              {"x": {0: "batch"}}, output_dir=tmp_path / "pos")
    assert result.manifest["inputs"][0]["shape"] == ["batch", 16, 32]

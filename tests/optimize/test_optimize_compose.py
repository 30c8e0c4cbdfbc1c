"""``qcexport.convert(..., precision=...)``: fp32 first, then the reduced model from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import qcrun
import torch
from qcrun.errors import UserError
from torch import nn

import qcexport


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _example(seed: int) -> torch.Tensor:
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_convert_at_a_reduced_precision_keeps_the_fp32_reference(tmp_path):
    torch.manual_seed(0)
    module = TwoLayers().eval()
    x = _example(3)
    with torch.no_grad():
        expected = module(x).numpy()
    out = tmp_path / "m"
    seen = []
    result = qcexport.convert(module, {"x": _example(1)}, {"x": {0: "batch", 1: "tokens"}},
                              output_dir=out, precision="fp16",
                              on_stage=lambda name, *_: seen.append(name))
    assert result.path == out / "fp32" / "model.onnx" and result.passed
    assert {p.name for p in out.iterdir()} == {"fp32", "manifest.json", "model.onnx"}
    fp32 = json.loads((out / "fp32" / "manifest.json").read_text())
    reduced = json.loads((out / "manifest.json").read_text())
    assert (fp32["precision"], reduced["precision"]) == ("fp32", "fp16")
    assert reduced["source_model"]["sha256"] == fp32["model_sha256"]
    assert result.reduced is not None and result.reduced.path == out / "model.onnx"
    assert {"quantize", "measure", "save"} <= set(result.reduced.timings)
    assert result.reduced.loss and all(r.passed for r in result.reduced.loss)
    assert seen[:2] == ["eager", "eager"] and "verify" in seen
    with qcrun.load(out, target="ort-cpu") as model:  # the reduced model, by the policy
        np.testing.assert_allclose(model(x=x.numpy())["output"], expected, atol=2e-2)


def test_an_unknown_precision_is_refused_before_any_work(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(UserError, match="unknown precision 'int4'.*fp16"):
        qcexport.convert(TwoLayers(), {"x": _example(1)}, output_dir=out, precision="int4")
    assert not out.exists()

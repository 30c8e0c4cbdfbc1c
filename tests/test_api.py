"""The public API at the package top: one function per stage, imported lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from qcrun.errors import UserError
from torch import nn

import qcexport


def test_import_is_quick_and_light():
    """``import qcexport`` imports neither torch nor onnx nor an engine."""
    code = ("import sys, qcexport\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'openvino', 'transformers')"
            " if m in sys.modules]\n"
            "print(','.join(heavy) or 'none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "none"


@pytest.mark.slow
def test_import_check_detects_a_heavy_import():
    """The check above can fail: a package importing torch at the top is seen."""
    code = "import sys, torch, qcexport\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("name", ["convert", "quantize", "write_golden", "parity", "bundle",
                                  "profile"])
def test_every_stage_is_documented(name):
    fn = getattr(qcexport, name)
    assert callable(fn) and len(fn.__doc__ or "") > 100


def test_result_types_load_lazily():
    from qcexport.export.pipeline import ConvertResult

    assert qcexport.ConvertResult is ConvertResult
    assert qcexport.ParityRun.__name__ == "ParityRun"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        qcexport.nothing  # noqa: B018


def test_mechanism_name_takes_no_inputs(tmp_path):
    with pytest.raises(UserError, match="built-in mechanism"):
        qcexport.convert("qformer", {"x": torch.zeros(1)}, output_dir=tmp_path / "m")


def test_module_needs_example_inputs(tmp_path):
    with pytest.raises(UserError, match="example_inputs"):
        qcexport.convert(nn.Linear(2, 2), output_dir=tmp_path / "m")


def test_write_golden_dispatches_on_a_module(tmp_path):
    torch.manual_seed(0)
    module = nn.Linear(4, 3).eval()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    result = qcexport.write_golden(module, {"input": x}, tmp_path / "g",
                                   dynamic_axes={"input": {0: "batch"}})
    assert result.written and result.cases
    from qcrun.golden import load_golden

    gset = load_golden(tmp_path / "g")
    first = gset.cases[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(first.inputs["input"])).numpy()
    assert list(first.outputs) == ["output"]
    assert (abs(first.outputs["output"] - expected) < 1e-6).all()


def test_stage_functions_survive_submodules_of_the_same_name():
    """qcexport.parity and qcexport.bundle are also submodules; importing them (as the stages
    themselves do) must not replace the functions."""
    import qcexport.bundle as _bundle_module  # noqa: F401
    import qcexport.parity as _parity_module  # noqa: F401
    from qcexport.bundle import make_bundle
    from qcexport.parity import parity_for_model_dir

    assert callable(make_bundle) and callable(parity_for_model_dir)
    assert qcexport.parity.__module__ == "qcexport" and qcexport.parity.__name__ == "parity"
    assert qcexport.bundle.__name__ == "bundle"

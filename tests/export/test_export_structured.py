"""Structured outputs and inputs, the 0/1 trap, and attention reporting for a user's module.

Every converted model is run through ``qcrun.load`` (the code an app uses) at shapes other
than the export shape, and its outputs are compared with PyTorch eager outputs picked out of
the module's own return value here, by hand, not through qcexport's flattening.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import qcrun
import torch
from click.testing import CliRunner
from qcrun.errors import UserError
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from qcexport.cli import main
from qcexport.export import capture as capture_module
from qcexport.export import convert
from qcexport.export.capture import widen_trivial_axes
from qcexport.export.outputs import flatten_outputs, plan_outputs

# Every test converts a module (seconds each): `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

AXES = {"x": {0: "batch", 1: "tokens"}}


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(actual: np.ndarray, expected: torch.Tensor) -> None:
    assert actual.shape == tuple(expected.shape)
    np.testing.assert_allclose(actual, expected.detach().numpy(), rtol=1e-4, atol=1e-5)


class NestedWithNone(nn.Module):
    """Returns (a, (None, b), [c]): positions, a nested tuple holding None, a list."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = self.proj(x)
        return h, (None, h.mean(1)), [h.sum(-1)]


@dataclasses.dataclass
class Aux:
    pooled: torch.Tensor
    extra: torch.Tensor | None = None


class DictDataclass(nn.Module):
    """A dict with a dataclass in it, an output named like its own parameter ("weight"), a
    non-tensor leaf, and two non-tensor arguments that change what it returns."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))

    def forward(self, x, return_aux=False, scale=1.0):
        h = (x @ self.weight) * scale
        out = {"weight": h, "count": 3, "nested": (None, (h.amax(1), None))}
        if return_aux:
            out["aux"] = Aux(h.sum(1))
        return out


class HfOutput(nn.Module):
    """Returns transformers' own ModelOutput (registered with torch's pytree by transformers)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x, output_hidden_states=False):
        states = [x]
        for layer in self.layers:
            states.append(torch.tanh(layer(states[-1])))
        return BaseModelOutputWithPooling(
            last_hidden_state=states[-1], pooler_output=None,
            hidden_states=tuple(states) if output_hidden_states else None)


class NoTensor(nn.Module):
    def forward(self, x):
        return {"shape": tuple(x.shape), "nothing": None}


def test_nested_tuple_with_none_is_named_by_position(tmp_path):
    torch.manual_seed(0)
    module = NestedWithNone().eval()
    result = convert(module, {"x": _x(2, 5, 8)}, AXES, output_dir=tmp_path / "m")
    assert result.output_names == ["output_0", "output_1.1", "output_2.0"]
    assert [o["leaf"] for o in result.manifest["output_structure"]["outputs"]] == \
        result.output_names
    x = _x(3, 7, 8, seed=1)
    with torch.no_grad():
        a, (none, b), [c] = module(x)
    assert none is None
    with qcrun.load(tmp_path / "m", target="ort-cpu") as model:
        got = model(x=x.numpy())
    assert sorted(got) == sorted(result.output_names)
    for name, expected in (("output_0", a), ("output_1.1", b), ("output_2.0", c)):
        _close(got[name], expected)


def test_dict_dataclass_constants_and_a_name_clash(tmp_path):
    torch.manual_seed(0)
    module = DictDataclass().eval()
    result = convert(module, {"x": _x(2, 5, 8), "return_aux": True, "scale": 0.5}, AXES,
                     output_dir=tmp_path / "m")
    # The dataclass is flattened by its fields, None and the int leaf dropped; "weight" keeps
    # its name although the module has a parameter of that name (torch.onnx would give an
    # invalid graph): the parameter's graph value was renamed instead.
    assert result.output_names == ["weight", "nested.1.0", "aux.pooled"]
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["constants"] == {"return_aux": True, "scale": 0.5}
    assert manifest["output_structure"]["renamed_values"] == {"weight": "weight.param"}
    assert any("renamed 'weight.param'" in w for w in result.warnings)
    assert [i["name"] for i in manifest["inputs"]] == ["x"]  # constants are not graph inputs
    assert "no scaled_dot_product_attention" in result.describe_attention()
    x = _x(4, 3, 8, seed=2)
    with torch.no_grad():
        out = module(x, return_aux=True, scale=0.5)
    with qcrun.load(tmp_path / "m", target="ort-cpu") as model:
        got = model(x=x.numpy())
    _close(got["weight"], out["weight"])
    _close(got["nested.1.0"], out["nested"][1][0])
    _close(got["aux.pooled"], out["aux"].pooled)


def test_model_output_subset(tmp_path):
    torch.manual_seed(0)
    module = HfOutput().eval()
    example = {"x": _x(2, 5, 8), "output_hidden_states": True}
    flat = flatten_outputs(module(**example))
    assert [leaf.name for leaf, _ in flat] == [
        "last_hidden_state", "hidden_states.0", "hidden_states.1", "hidden_states.2"]
    result = convert(module, example, AXES, output_names=["hidden_states.1", "last_hidden_state"],
                     output_dir=tmp_path / "m")
    assert result.output_names == ["hidden_states.1", "last_hidden_state"]
    assert result.manifest["output_structure"]["available"] == [leaf.name for leaf, _ in flat]
    x = _x(1, 9, 8, seed=4)
    with torch.no_grad():
        out = module(x, output_hidden_states=True)
    with qcrun.load(tmp_path / "m", target="ort-cpu") as model:
        got = model(x=x.numpy())
    assert sorted(got) == ["hidden_states.1", "last_hidden_state"]
    _close(got["last_hidden_state"], out.last_hidden_state)
    _close(got["hidden_states.1"], out.hidden_states[1])


def test_unknown_output_lists_the_available_ones(tmp_path):
    with pytest.raises(UserError) as info:
        convert(HfOutput().eval(), {"x": _x(2, 5, 8)}, AXES, output_names=["pooler_output"],
                output_dir=tmp_path / "m")
    assert "unknown outputs ['pooler_output']" in str(info.value)
    assert "last_hidden_state" in str(info.value)
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_module_returning_no_tensor_is_a_clean_error(tmp_path):
    with pytest.raises(UserError) as info:
        convert(NoTensor(), {"x": _x(2, 3)}, {"x": {0: "batch"}}, output_dir=tmp_path / "m")
    assert "no tensor" in str(info.value)
    assert info.value.hint
    assert not (tmp_path / "m").exists()


def test_positional_names_still_name_a_tuple():
    flat = flatten_outputs((torch.zeros(1), torch.ones(1)))
    assert plan_outputs(flat, ["a", "b"]).names == ["a", "b"]
    assert plan_outputs(flat, ["output_1"]).leaves == ["output_1"]
    with pytest.raises(UserError, match="output_0, output_1"):
        plan_outputs(flat, ["a"])  # neither a selection nor one name per tensor


# --- the 0/1 trap -----------------------------------------------------------------------------


def test_batch_one_declared_dynamic_runs_at_batch_three(tmp_path, custom_modules):
    torch.manual_seed(0)
    module = custom_modules["sdpa"]().eval()
    result = convert(module, {"x": _x(1, 5, 16)}, AXES, output_dir=tmp_path / "m")
    assert result.manifest["export_sizes"] == {"batch": 2}
    # still verified at the example's batch of 1
    assert {r.shape[0] for r in result.verification if r.case == "export_shape"} == {1}
    batch = next(i for i in result.manifest["inputs"] if i["name"] == "x")["shape"][0]
    assert batch == "batch"
    assert result.describe_attention() == (
        "2 scaled_dot_product_attention calls captured, 2 fused as 'onnx' attention nodes")
    x = _x(3, 7, 16, seed=5)
    with torch.no_grad():
        expected = module(x)
    with qcrun.load(tmp_path / "m", target="ort-cpu") as model:
        _close(model(x=x.numpy())["output"], expected)


def test_without_widening_the_batch_axis_is_fixed(tmp_path, custom_modules, monkeypatch):
    """The guard above matters: exported at its example size of 1, the axis is fixed."""
    monkeypatch.setattr(capture_module, "widen_trivial_axes", lambda t, a: (dict(t), {}))
    with pytest.raises(UserError, match="axis fixed"):
        convert(custom_modules["sdpa"]().eval(), {"x": _x(1, 5, 16)}, AXES,
                output_dir=tmp_path / "m")


def test_widening_repeats_every_input_sharing_the_axis():
    x, mask = _x(1, 4), torch.tensor([[True, False, True]])
    out, widened = widen_trivial_axes({"x": x, "mask": mask, "n": torch.tensor(3)},
                                      {"x": {0: "batch"}, "mask": {0: "batch"}})
    assert widened == {"batch": (1, 2)}
    assert torch.equal(out["x"], torch.cat([x, x]))
    assert torch.equal(out["mask"], torch.cat([mask, mask]))
    assert out["n"].item() == 3
    empty, widened = widen_trivial_axes({"t": torch.zeros(2, 0, dtype=torch.long)},
                                        {"t": {1: "tokens"}})
    assert widened == {"tokens": (0, 2)} and empty["t"].shape == (2, 2)


def test_widening_refuses_an_axis_with_two_sizes():
    with pytest.raises(UserError, match=r"'batch'.*1 in x\[0\]; 3 in y\[0\]"):
        widen_trivial_axes({"x": _x(1, 4), "y": _x(3, 4)},
                           {"x": {0: "batch"}, "y": {0: "batch"}})


# --- the command line -------------------------------------------------------------------------

HF_FACTORY = """
import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling


class HfOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, return_dict=True):
        h = self.proj(x)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=h.mean(1))


def make():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    return HfOutput(), {"x": x, "return_dict": True}, {"x": {0: "batch", 1: "tokens"}}
"""


def test_cli_outputs_keeps_a_subset(factory_module, tmp_path):
    mod = factory_module(HF_FACTORY)
    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["convert", "--module", f"{mod}:make", "--outputs",
                                       "pooler_output", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["outputs"] == ["pooler_output"]
    assert data["constants"] == {"return_dict": True}
    bad = CliRunner().invoke(main, ["convert", "--module", f"{mod}:make", "--outputs",
                                    "pooled", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1
    assert "unknown outputs ['pooled']" in bad.output
    assert "last_hidden_state, pooler_output" in bad.output
    assert "Traceback" not in bad.output


def test_own_matmul_softmax_attention_is_reported_not_refused(tmp_path, custom_modules):
    torch.manual_seed(0)
    result = convert(custom_modules["einsum"]().eval(), {"x": _x(2, 5, 16)}, AXES,
                     output_dir=tmp_path / "m")
    assert (result.sdpa_calls, result.fused_expected, result.fused_found) == (0, 0, 0)
    assert result.describe_attention().startswith("no scaled_dot_product_attention call")
    assert any("exported decomposed" in w for w in result.warnings)
    assert result.passed

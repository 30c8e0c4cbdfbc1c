"""The registry: helpful errors, small tiny presets, and `describe` for every mechanism."""

from __future__ import annotations

import subprocess
import sys

import pytest
from qcrun.errors import UserError

from qcexport import mechanisms


def test_unknown_mechanism_lists_the_valid_names():
    with pytest.raises(UserError) as info:
        mechanisms.create("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in mechanisms.names():
        assert name in message


@pytest.mark.parametrize("name", mechanisms.names())
def test_unknown_preset_lists_the_presets(name):
    with pytest.raises(UserError) as info:
        mechanisms.create(name, preset="huge")
    message = str(info.value)
    assert "'huge'" in message and "tiny" in message and "base" in message
    assert "--preset" in message


@pytest.mark.parametrize("name", mechanisms.names())
def test_unknown_override_names_the_field(name):
    with pytest.raises(UserError) as info:
        mechanisms.create(name, no_such_field=3)
    message = str(info.value)
    assert name in message and "no_such_field" in message
    assert "dim" in message  # the valid fields are listed


@pytest.mark.parametrize("name", mechanisms.names())
def test_tiny_preset_is_tiny_and_in_eval_mode(name):
    module = mechanisms.create(name)
    assert 0 < mechanisms.parameter_count(module) < 1_000_000
    assert not any(m.training for m in module.modules())


@pytest.mark.parametrize("name", mechanisms.names())
def test_create_is_deterministic(name):
    a, b = mechanisms.create(name).state_dict(), mechanisms.create(name).state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("name", mechanisms.names())
def test_describe(name):
    spec = mechanisms.get(name)
    info = mechanisms.describe(name)
    assert info["name"] == name
    assert info["inputs"] == list(spec.input_names)
    assert info["outputs"] == list(spec.output_names)
    assert set(info["dynamic_axes"]) <= set(spec.input_names) | set(spec.output_names)
    assert info["golden_cases"] == [c.name for c in spec.golden_cases]
    presets = info["presets"]
    assert set(presets) == {"tiny", "base"}
    assert presets["tiny"]["parameters"] == mechanisms.parameter_count(mechanisms.create(name))
    assert presets["base"]["parameters"] > 10 * presets["tiny"]["parameters"]


def test_list_is_names():
    assert mechanisms.list() == mechanisms.names()
    assert "qformer" in mechanisms.names()


def test_importing_qcrun_does_not_import_torch():
    code = "import sys, qcrun; assert 'torch' not in sys.modules, 'qcrun imported torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

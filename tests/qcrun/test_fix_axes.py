"""qcrun.load(fix_axes=...): the engine is built for the fixed sizes (read back from the
session / compiled model), unknown axes and sizes every golden case contradicts are refused,
and inputs of other sizes are refused before the engine sees them."""

from __future__ import annotations

import numpy as np
import pytest
import qcrun
from qcrun.errors import UserError
from qcrun.golden import load_golden
from qcrun.ir import contradicting_cases, resolve_fix_axes

pytestmark = pytest.mark.slow

SHAPES = {"image_features": ["batch", "tokens", 48], "text_ids": ["batch", "text"]}


def test_resolve_by_role_and_label():
    assert resolve_fix_axes({"tokens": 257}, SHAPES) == {"tokens": 257}
    assert resolve_fix_axes({"images": 1}, SHAPES, {"images": "batch"}) == {"batch": 1}
    with pytest.raises(UserError, match="not a symbolic axis.*batch, text, tokens"):
        resolve_fix_axes({"width": 4}, SHAPES)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(UserError, match="not a size"):
            resolve_fix_axes({"tokens": bad}, SHAPES)
    with pytest.raises(UserError, match="two sizes"):
        resolve_fix_axes({"images": 1, "batch": 2}, SHAPES, {"images": "batch"})


def test_contradicting_cases_named_with_reason():
    cases = [("a", {"image_features": (1, 49, 48), "text_ids": (1, 6)}),
             ("b", {"image_features": (2, 17, 48), "text_ids": (2, 8)})]
    refused = contradicting_cases(cases, SHAPES, {"batch": 1})
    assert list(refused) == ["b"]
    assert "'image_features' has batch=2" in refused["b"]


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_fix_axes_applied_and_read_back(tiny_models, target):
    directory = tiny_models.dir("qformer")
    ok, why = qcrun.engines.availability(target)
    if not ok:
        pytest.skip(why)
    golden = load_golden("golden/qformer/tiny")
    case = golden.case("b1_t49_text")
    with qcrun.load(directory, target=target, fix_axes={"batch": 1, "tokens": 49}) as model:
        engine = {i.name: i.shape for i in model._adapter.inputs}  # the engine's own view
        assert engine["image_features"] == (1, 49, 48)
        assert engine["text_ids"][0] == 1 and engine["text_ids"][1] != 1  # text stays free
        assert model.fixed_axes == {"batch": 1, "tokens": 49}
        assert {i.name: i.shape for i in model.inputs}["image_features"] == (1, 49, 48)
        out = model(**case.inputs)
        for name, want in case.outputs.items():
            np.testing.assert_allclose(out[name], want, atol=1e-4, rtol=0)
        wrong = dict(case.inputs, image_features=np.zeros((1, 50, 48), np.float32))
        with pytest.raises(UserError, match="axis 1 has size 50, expected 49"):
            model(**wrong)


def test_fix_axes_refusals(tiny_models, tmp_path):
    import shutil

    directory = tiny_models.copy(tmp_path / "qformer", "qformer")
    shutil.copytree("golden/qformer/tiny", directory / "golden")  # its golden set beside it
    with pytest.raises(UserError, match="'width' is not a symbolic axis"):
        qcrun.load(directory, target="ort-cpu", fix_axes={"width": 3})
    # no golden case of the tiny Q-Former has 257 tokens: nothing could check the fixed model
    with pytest.raises(UserError, match="every golden case.*contradicts"):
        qcrun.load(directory, target="ort-cpu", fix_axes={"tokens": 257})
    with qcrun.load(directory, target="ort-cpu", fix_axes={"tokens": 49}) as model:
        assert model.fixed_axes == {"tokens": 49}  # one case has 49 tokens: accepted

"""The context/query split of a user's module: a Hugging Face InstructBLIP Q-Former built tiny
from a config, cut at its image features (the component spec's default, and named)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import qcrun
from qcrun.golden import load_golden

from qcexport.split.model_dir import split_model_dir

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("named", [False, True])
def test_hf_qformer_split_reproduces_eager(converted, tmp_path, named):
    c = converted("instructblip-qformer")
    directory = shutil.copytree(c.model_dir, tmp_path / "model")
    result = split_model_dir(directory, ["image_features"] if named else None)
    assert result.passed and result.cut.context_inputs == ["image_features"]
    golden = load_golden(c.golden_dir)  # PyTorch eager outputs, written before the split
    with qcrun.load(directory, target="ort-cpu") as model:
        for case in golden.cases:
            ctx = model.encode(image_features=case.inputs["image_features"])
            got = model.query(ctx, **{k: v for k, v in case.inputs.items()
                                      if k != "image_features"})
            for name, want in case.outputs.items():
                np.testing.assert_allclose(got[name], want, atol=1e-5, rtol=1e-4)

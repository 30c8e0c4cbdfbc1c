"""Writing golden sets: reproducible bytes, --update guarding, hash-checked reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qcrun.errors import UserError
from qcrun.golden import load_golden

from qcexport import mechanisms
from qcexport.golden import GOLDEN_SEED, golden_dir, write_golden


def test_write_is_reproducible_and_second_write_is_a_no_op(tmp_path):
    first = write_golden("matryoshka", root=tmp_path)
    assert first.written
    files = {p.name: p.read_bytes() for p in first.path.iterdir()}
    again = write_golden("matryoshka", root=tmp_path)
    assert not again.written and again.changes == []
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == files
    # The committed set was written by the same code: byte-identical here.
    committed = golden_dir("matryoshka", "tiny")
    for name, data in files.items():
        if name != "manifest.json":
            assert (committed / name).read_bytes() == data, name


def test_zero_dim_inputs_keep_their_rank(tmp_path):
    write_golden("matryoshka", root=tmp_path)
    gset = load_golden(tmp_path / "matryoshka" / "tiny")
    assert gset.case("b1_t49_m4").inputs["num_queries"].shape == ()
    assert int(gset.case("b1_t49_m4").inputs["num_queries"]) == 4
    assert gset.case("b1_t49_m4").outputs["query_outputs"].shape == (1, 4, 96)


def test_update_reports_what_changed(tmp_path):
    write_golden("perceiver", root=tmp_path)
    spec = mechanisms.get("perceiver")
    # Change the forward pass: every golden output moves.
    original = spec.builder

    class Shifted(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.inner = original(config)

        def forward(self, **kw):
            return self.inner(**kw) + 1e-3

        def load_state_dict(self, state, strict=True):
            return self.inner.load_state_dict(state, strict)

        def state_dict(self, *a, **k):
            return self.inner.state_dict(*a, **k)

    object.__setattr__(spec, "builder", Shifted)  # the spec is frozen; restored below
    try:
        with pytest.raises(UserError, match="would change") as info:
            write_golden("perceiver", root=tmp_path)
        assert "--update" in str(info.value)
        result = write_golden("perceiver", root=tmp_path, update=True)
        assert result.written
        assert {c.what for c in result.changes} == {"changed"}
        assert all(c.max_abs == pytest.approx(1e-3, rel=1e-2) for c in result.changes)
    finally:
        object.__setattr__(spec, "builder", original)


def test_tampered_golden_file_is_rejected(tmp_path):
    write_golden("qformer", root=tmp_path)
    directory = tmp_path / "qformer" / "tiny"
    case = next(p for p in directory.glob("*.npz") if p.name != "weights.npz")
    data = bytearray(case.read_bytes())
    data[len(data) // 2] ^= 0x01
    case.write_bytes(bytes(data))
    with pytest.raises(UserError, match=case.name):
        load_golden(directory)


def test_truncated_weights_are_rejected(tmp_path):
    write_golden("qformer", root=tmp_path)
    weights = tmp_path / "qformer" / "tiny" / "weights.npz"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="weights.npz"):
        load_golden(tmp_path / "qformer" / "tiny")


def test_cases_use_seeds_distinct_from_export_and_verify():
    spec = mechanisms.get("qformer")
    config = spec.config("tiny")
    golden_in = spec.inputs(config, spec.golden_cases[0], seed=GOLDEN_SEED)
    export_in = spec.inputs(config, spec.golden_cases[0], seed=0)
    assert not np.array_equal(golden_in["image_features"], export_in["image_features"])


def test_routing_golden_cases_cover_every_branch():
    spec = mechanisms.get("routing")
    gset = load_golden(golden_dir("routing", "tiny"))
    module = mechanisms.create("routing")
    cases = [(c, c.inputs, c.outputs) for c in gset.cases]
    assert spec.golden_check(module, cases) == []
    # and the check does bite: with one case only, some branch is missing
    assert spec.golden_check(module, cases[:1]) != []


def test_a_new_set_takes_an_empty_directory_but_never_someone_s_files(tmp_path):
    """The staged set replaces only an empty directory (nothing lost); a directory holding
    files but no golden set is refused as it is, and no staging is left behind."""
    (tmp_path / "matryoshka" / "tiny").mkdir(parents=True)
    assert write_golden("matryoshka", root=tmp_path).written
    assert load_golden(tmp_path / "matryoshka" / "tiny").mechanism == "matryoshka"

    busy = tmp_path / "other" / "perceiver" / "tiny"
    busy.mkdir(parents=True)
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt but no golden set"):
        write_golden("perceiver", root=tmp_path / "other")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert [p.name for p in busy.parent.iterdir()] == ["tiny"]  # no staging left

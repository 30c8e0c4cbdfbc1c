"""The whole chain on the command line, as a user runs it: convert --hf, golden --hf, parity,
bundle, and `qcrun verify` on a "device" where torch cannot be imported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from qcrun.golden import load_golden

from qcexport.cli import main as qcexport_main

TARGETS = "ort-cpu,openvino-cpu,onnx-reference"


def cli(*args):
    result = CliRunner().invoke(qcexport_main, [str(a) for a in args])
    return result


@pytest.mark.parametrize("component,outputs", [
    ("qformer", ["last_hidden_state", "pooler_output"]),
    ("idefics2-resampler", ["perceiver_embeddings"]),
])
def test_full_chain(component, outputs, tiny_hf, tmp_path, qcrun_device):
    hf_dir, model, golden = tiny_hf[component], tmp_path / "model", tmp_path / "golden"
    # the acceptance commands
    r = cli("convert", "--hf", hf_dir, "--component", component, "-o", model)
    assert r.exit_code == 0, r.output
    r = cli("golden", "--hf", hf_dir, "--component", component, "-o", golden)
    assert r.exit_code == 0, r.output
    assert "3 cases written" in r.output
    r = cli("parity", model, "--golden", golden, "--targets", TARGETS)
    assert r.exit_code == 0, r.output
    assert "0 failed, 0 skipped" in r.output

    manifest = json.loads((model / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == outputs
    gset = load_golden(golden)
    assert sorted(gset.cases[0].outputs) == sorted(outputs)

    # a second golden run changes nothing, byte for byte
    before = {p.name: p.read_bytes() for p in golden.iterdir()}
    r = cli("golden", "--hf", hf_dir, "--component", component, "-o", golden)
    assert r.exit_code == 0 and "unchanged" in r.output, r.output
    assert {p.name: p.read_bytes() for p in golden.iterdir()} == before
    # and a set written elsewhere is the same bytes (reproducible, not merely "unchanged")
    again = tmp_path / "golden-again"
    assert cli("golden", "--hf", hf_dir, "--component", component, "-o", again).exit_code == 0
    assert {p.name: p.read_bytes() for p in again.iterdir()} == before

    bundle = tmp_path / "model.bundle"
    r = cli("bundle", model, "--target", "ort-cpu", "--golden", golden, "-o", bundle)
    assert r.exit_code == 0, r.output
    device = qcrun_device("verify", bundle, "--json", tmp_path / "verify.json")
    assert device.returncode == 0, device.stdout + device.stderr
    report = json.loads((tmp_path / "verify.json").read_text())
    verdicts = [r["verdict"] for r in report["records"]]
    assert verdicts and set(verdicts) == {"pass"}
    assert {r["output"] for r in report["records"]} == set(outputs)

    import qcrun

    loaded = qcrun.load(bundle)
    case = gset.cases[0]
    got = loaded(**case.inputs)
    assert sorted(got) == sorted(outputs)
    for name in outputs:
        np.testing.assert_allclose(got[name], case.outputs[name], atol=1e-4)


def test_golden_of_another_model_is_refused(converted, maker, tmp_path):
    """Same architecture, other weights (another seed): parity and bundle refuse the pairing
    instead of comparing outputs that were never this model's."""
    other = maker.make("blip2", tmp_path / "blip2-seed1", seed=1)
    golden = tmp_path / "golden-other"
    assert cli("golden", "--hf", other, "--component", "qformer", "-o", golden).exit_code == 0
    c = converted("qformer")
    r = cli("parity", c.model_dir, "--golden", golden, "--targets", "ort-cpu")
    assert r.exit_code == 1
    refusal = r.output.splitlines()[-2]  # `error: golden: ... weights ...`, then `fix: ...`
    assert refusal.startswith("error: golden:") and "weights" in refusal, r.output
    r = cli("bundle", c.model_dir, "--target", "ort-cpu", "--golden", golden,
            "-o", tmp_path / "x.bundle")
    assert r.exit_code == 1 and not (tmp_path / "x.bundle").exists(), r.output
    # refused for the weights before anything ran, not for the failing comparison
    assert refusal in r.output and "fails parity" not in r.output, r.output
    # writing the other model's set over this one needs --update; until then nothing changes
    before = {p.name: p.read_bytes() for p in c.golden_dir.iterdir()}
    r = cli("golden", "--hf", other, "--component", "qformer", "-o", c.golden_dir)
    assert r.exit_code == 1 and "--update" in r.output and "weights.npz" in r.output, r.output
    assert {p.name: p.read_bytes() for p in c.golden_dir.iterdir()} == before
    # the matching golden set passes, so the refusal above is about the weights
    r = cli("parity", c.model_dir, "--golden", c.golden_dir, "--targets", "ort-cpu")
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_factory_golden_with_cases_and_constants(tmp_path, monkeypatch):
    """A user's factory with a golden case generator and a non-tensor argument: golden,
    convert and parity agree; a case that changes the constant is refused by name."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    r = cli("convert", "--module", "userpkg.models:make", "-o", "out/model")
    assert r.exit_code == 0, r.output
    r = cli("golden", "--module", "userpkg.models:make", "-o", "out/golden")
    assert r.exit_code == 0, r.output
    gset = load_golden(tmp_path / "out/golden")
    assert [c.name for c in gset.cases] == ["small", "large"]
    assert gset.manifest.constants == {"scale_output": True}
    assert sorted(gset.cases[0].outputs) == ["output_0", "output_1.0"]
    r = cli("parity", "out/model", "--golden", "out/golden", "--targets", "ort-cpu")
    assert r.exit_code == 0, r.output

    # same weights, golden outputs computed with the other value of the constant: refused
    r = cli("golden", "--module", "userpkg.models:make_unscaled", "-o", "out/golden-unscaled")
    assert r.exit_code == 0, r.output
    r = cli("parity", "out/model", "--golden", "out/golden-unscaled", "--targets", "ort-cpu")
    assert r.exit_code == 1 and "error: golden:" in r.output, r.output
    assert "non-tensor arguments" in r.output and "scale_output" in r.output, r.output

    r = cli("golden", "--module", "userpkg.models:make_bad_cases", "-o", "out/golden-bad")
    assert r.exit_code == 1
    assert "error: golden:" in r.output and "'scale_output'" in r.output
    assert "fix:" in r.output
    assert not (tmp_path / "out/golden-bad").exists()


FACTORY_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)

    def forward(self, x, mask, scale_output=False):
        h = self.proj(x) * mask[..., None]
        if scale_output:
            h = h * 2.0
        return h, (h.sum(dim=1), None)


def _feed(batch, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.int64)
    mask[1:, -2:] = 0
    return {"x": torch.randn(batch, tokens, 8, generator=g), "mask": mask,
            "scale_output": True}


def _cases():
    yield "small", _feed(2, 5, 1)
    yield "large", _feed(3, 11, 2)


def make():
    return (Net().eval(), _feed(2, 6, 0),
            {"x": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}}, _cases)


def make_unscaled():
    return (Net().eval(), dict(_feed(2, 6, 0), scale_output=False),
            {"x": {0: "batch", 1: "tokens"}, "mask": {0: "batch", 1: "tokens"}})


def make_bad_cases():
    bad = dict(_feed(2, 5, 3), scale_output=False)
    return (Net().eval(), _feed(2, 6, 0), {"x": {0: "batch"}, "mask": {0: "batch"}},
            [("fine", _feed(2, 6, 4)), ("flipped", bad)])
'''


@pytest.mark.slow
def test_factory_without_cases_gets_seeded_variations(tmp_path, monkeypatch):
    """No case generator: the example shape, each dynamic axis at another size, and padded
    masks; the converted model passes on all of them."""
    pkg = tmp_path / "userpkg2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(FACTORY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (pkg / "plain.py").write_text(
        "from userpkg2.models import make\n\ndef plain():\n    return make()[:3]\n")
    assert cli("convert", "--module", "userpkg2.plain:plain", "-o", "m").exit_code == 0
    r = cli("golden", "--module", "userpkg2.plain:plain", "-o", "g")
    assert r.exit_code == 0, r.output
    gset = load_golden(tmp_path / "g")
    names = [c.name for c in gset.cases]
    assert names[0] == "example" and names[-1] == "padding"
    assert len(names) == 4  # example, batch, tokens, padding
    example = gset.cases[0].inputs["x"].shape
    batch = gset.case(names[1]).inputs["x"].shape
    tokens = gset.case(names[2]).inputs["x"].shape
    assert batch[0] != example[0] and batch[1] == example[1]
    assert tokens[1] != example[1] and tokens[0] == example[0]
    mask = gset.case("padding").inputs["mask"]
    assert mask[0].all() and not mask[1:].all()
    r = cli("parity", "m", "--golden", "g", "--targets", "ort-cpu,onnx-reference")
    assert r.exit_code == 0, r.output


def test_hf_models_record_axis_roles_for_profile_sweeps(converted):
    """`qcexport profile --tokens` finds the visual token axis by its role, which the
    component spec declares; a user's module without roles has none."""
    manifest = json.loads((converted("qformer").model_dir / "manifest.json").read_text())
    assert manifest["roles"] == {"batch": "batch", "tokens": "tokens"}

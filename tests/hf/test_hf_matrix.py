"""A device-farm matrix over a module we did not write: a tiny Hugging Face BLIP-2 Q-Former,
its golden set written with module outputs, planned, built, run on the CPU targets, merged."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from qcrun.golden import load_golden

from qcexport import hf
from qcexport.cli import main as cli

pytestmark = pytest.mark.slow


def test_matrix_of_a_transformers_component(tiny_hf, tmp_path, monkeypatch):
    comp = hf.load_component(tiny_hf["qformer"], "qformer")
    hf.convert(None, comp, output_dir=tmp_path / "blip2")
    hf.write_golden(None, comp, tmp_path / "golden", with_intermediates=True)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    # its own model has no built-in golden set: the plan asks for it, and writes nothing
    refused = runner.invoke(cli, ["matrix", "plan", "--models", "blip2", "-o", "plan.json"])
    assert refused.exit_code == 1 and "--golden blip2=" in refused.output
    assert not (tmp_path / "plan.json").exists()

    planned = runner.invoke(cli, ["matrix", "plan", "--models", "blip2", "--golden",
                                  "blip2=golden", "--checks", "verify", "-o", "plan.json"])
    assert planned.exit_code == 0, planned.output
    assert json.loads((tmp_path / "plan.json").read_text())["models"][0]["golden"] == "golden"
    ran = runner.invoke(cli, ["matrix", "run", "plan.json", "--jobs", "2"])
    assert ran.exit_code == 0, ran.output
    # the bundle's golden subset carries the stored module outputs of its cases
    bundled = load_golden(next((tmp_path / "bundles").glob("*/golden")))
    assert bundled.manifest.intermediates
    assert {e.case for e in bundled.manifest.intermediates} == {c.name for c in bundled.cases}
    merged = runner.invoke(cli, ["matrix", "merge", "results", "--plan", "plan.json",
                                 "-o", "report"])
    assert merged.exit_code == 0, merged.output
    assert "3 of 3 required cells passed" in merged.output

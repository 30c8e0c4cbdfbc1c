"""Bad input to --hf and to a user's golden set: clean `error: <stage>: ... / fix: ...`
messages, exit 1, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qcexport.cli import main as qcexport_main
from qcexport.hf import components


def cli(*args):
    return CliRunner().invoke(qcexport_main, [str(a) for a in args])


def assert_clean_error(result, stage: str, *needles: str):
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {stage}: "), result.output
    assert "\n  fix: " in result.output, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


@pytest.mark.parametrize("command", ["convert", "golden"])
def test_unresolvable_hub_id_offline(command, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    r = cli(command, "--hf", "someorg/not-a-cached-model", "--component", "qformer", "-o", out)
    assert_clean_error(r, "load", "'someorg/not-a-cached-model'", "HF_HUB_OFFLINE",
                       "save_pretrained")
    assert not out.exists()


def test_unknown_component_lists_the_supported_ones(tiny_hf, tmp_path):
    r = cli("convert", "--hf", tiny_hf["qformer"], "--component", "q-former", "-o", tmp_path / "o")
    assert r.exit_code == 1
    assert "unknown Hugging Face component 'q-former'" in r.output
    for name in components.names():
        assert name in r.output
    assert not (tmp_path / "o").exists()


def test_hf_without_component(tiny_hf, tmp_path):
    r = cli("golden", "--hf", tiny_hf["qformer"], "-o", tmp_path / "o")
    assert_clean_error(r, "load", "--component", "idefics2-resampler")


def test_component_of_another_model(tiny_hf, tmp_path):
    r = cli("convert", "--hf", tiny_hf["kosmos2-projection"], "--component", "qformer",
            "-o", tmp_path / "o")
    assert_clean_error(r, "load", "kosmos-2", "kosmos2-projection")
    assert not (tmp_path / "o").exists()


def test_directory_that_is_not_save_pretrained(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("convert", "--hf", tmp_path / "empty", "--component", "qformer", "-o", tmp_path / "o")
    assert_clean_error(r, "load", "config.json")


def test_golden_into_a_foreign_directory_is_refused(tiny_hf, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = cli("golden", "--hf", tiny_hf["qformer"], "--component", "qformer", "-o", busy)
    assert_clean_error(r, "golden", "not a golden set")
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]


NO_TENSOR = '''
import torch
from torch import nn


class Talker(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return {"label": "cat", "score": None}


def make():
    return Talker(), {"x": torch.randn(2, 4)}, {"x": {0: "batch"}}
'''


@pytest.mark.parametrize("command", ["convert", "golden"])
def test_module_that_returns_no_tensor(command, tmp_path, monkeypatch):
    (tmp_path / "talker.py").write_text(NO_TENSOR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = cli(command, "--module", "talker:make", "-o", tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert "no tensor" in r.output and "fix:" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_without_transformers_the_error_gives_the_install_command(tiny_hf, tmp_path):
    script = (
        "import sys; sys.modules['transformers'] = None\n"
        "from qcexport.cli import main\n"
        "sys.argv = ['qcexport', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = ["convert", "--hf", str(tiny_hf["qformer"]), "--component", "qformer",
            "-o", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: load:" in proc.stderr and "pip install 'qcexport[hf]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    # listing the components needs no transformers
    proc = subprocess.run([sys.executable, "-c", script, "list", "--hf"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "Blip2QFormerModel" in proc.stdout and "Idefics2PerceiverResampler" in proc.stdout

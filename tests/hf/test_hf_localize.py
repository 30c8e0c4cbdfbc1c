"""Localising on a device, without torch, in a module we did not write: a Hugging Face BLIP-2
Q-Former built tiny from a config, its golden set stored with every submodule's output."""

from __future__ import annotations

import subprocess
import sys

import pytest
from qcrun.golden import load_golden

from qcexport import hf
from qcexport.localize.perturb import perturb_weight

pytestmark = pytest.mark.slow

CROSS = "qformer.encoder.layer.0.crossattention"
# qcrun where torch cannot be imported (localisation reads the graph with onnx, qcrun[reference])
NO_TORCH = "import sys; sys.modules['torch'] = None; from qcrun.cli import main; main()"


def _qcrun_without_torch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_verify_localize_names_the_perturbed_cross_attention(tiny_hf, tmp_path):
    comp = hf.load_component(tiny_hf["qformer"], "qformer")
    hf.convert(None, comp, output_dir=tmp_path / "model")
    hf.write_golden(None, comp, tmp_path / "golden", with_intermediates=True)
    stored = load_golden(tmp_path / "golden").manifest.intermediates
    assert stored and any(m.startswith(CROSS) for m in stored[0].modules)

    perturb_weight(tmp_path / "model", CROSS, tmp_path / "bad")
    proc = _qcrun_without_torch("verify", tmp_path / "bad", "--golden", tmp_path / "golden",
                        "--target", "ort-cpu", "--localize")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first = [line for line in proc.stdout.splitlines() if "first divergence at" in line]
    assert first and first[0].split("first divergence at ")[1].startswith(CROSS), proc.stdout

    # the unperturbed model: parity passes, so nothing diverges
    clean = _qcrun_without_torch("verify", tmp_path / "model", "--golden", tmp_path / "golden",
                         "--target", "ort-cpu", "--localize")
    assert clean.returncode == 0, clean.stdout + clean.stderr

"""The README's "Your own model" section runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def own_model_snippet() -> str:
    text = README.read_text()
    section = text.split("\n## Your own model\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section has one Python block"
    return blocks[0]


@pytest.mark.slow
def test_own_model_snippet_runs(tmp_path):
    code = own_model_snippet()
    assert "qcexport.convert(" in code and "qcrun.load(" in code
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # what the snippet's comments promise is what it printed
    assert lines[0] == "['latents', 'pooled']"
    assert lines[1] == ("1 scaled_dot_product_attention call captured, 1 fused as 'onnx' "
                        "attention node")
    assert lines[-1] == "{'latents': (3, 8, 32), 'pooled': (3, 32)}"
    assert (tmp_path / "out" / "resampler.bundle" / "bundle.json").is_file()

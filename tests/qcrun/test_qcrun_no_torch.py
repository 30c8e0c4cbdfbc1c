"""qcrun runs on devices without torch: nothing in it may import torch, even indirectly."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import qcrun

PACKAGE = Path(qcrun.__file__).parent

# Runs in a fresh interpreter where every import of torch (or a submodule) fails, then imports
# every qcrun module and runs a full parity check on three engines.
BLOCKED_SCRIPT = r"""
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"{name} is blocked: qcrun must run without torch")
        return None

sys.meta_path.insert(0, NoTorch())
sys.modules["torch"] = None  # `import torch` now raises ImportError

import qcrun.targets, qcrun.golden, qcrun.engines, qcrun.parity, qcrun.cli
from qcrun.golden import load_golden
from qcrun.parity import run_parity

report = run_parity(sys.argv[1], load_golden(sys.argv[2]),
                    ["ort-cpu", "openvino-cpu", "onnx-reference"])
print(json.dumps({"passed": report.passed, "counts": report.counts()}))
"""

# Runs unblocked: torch is installed here, and must still not end up imported.
UNBLOCKED_SCRIPT = r"""
import json, sys
from qcrun.golden import load_golden
from qcrun.parity import run_parity
import qcrun.cli

report = run_parity(sys.argv[1], load_golden(sys.argv[2]), ["ort-cpu", "onnx-reference"])
print(json.dumps({"passed": report.passed,
                  "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""


def _run(script: str, *args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_module_imports_torch():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []
    assert len(list(PACKAGE.glob("*.py"))) >= 7  # the scan really saw the package


def test_parity_runs_with_torch_blocked(linear):
    result = _run(BLOCKED_SCRIPT, linear.model, linear.golden)
    assert result == {"passed": True, "counts": {"pass": 12, "fail": 0, "skip": 0}}


def test_parity_leaves_torch_unimported(attention):
    result = _run(UNBLOCKED_SCRIPT, attention.model, attention.golden)
    assert result == {"passed": True, "torch": []}

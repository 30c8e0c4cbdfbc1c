"""Fixtures for the Hugging Face tests: tiny random-weight models saved with transformers'
own ``save_pretrained`` (scripts/make_tiny_hf.py), each component converted and given a golden
set once per session. Nothing is downloaded: the hub is switched off for the whole session.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the network, even by mistake


def _maker():
    spec = importlib.util.spec_from_file_location("make_tiny_hf", ROOT / "scripts" /
                                                  "make_tiny_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = _maker()

# A device: torch, onnx and transformers cannot be imported; then `qcrun ARGS...` runs.
DEVICE_CLI = r"""
import importlib.abc, sys

class Device(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "transformers"):
            raise ModuleNotFoundError(f"{name} is blocked: not installed on the device")
        return None

sys.meta_path.insert(0, Device())
for blocked in ("torch", "onnx", "transformers"):
    sys.modules[blocked] = None
from qcrun.cli import main
sys.argv = ["qcrun", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="session")
def maker():
    """scripts/make_tiny_hf.py as a module (tests must not import conftest by name: with
    several test folders, `conftest` is whichever one was imported first)."""
    return MAKER


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """{component name: the save_pretrained directory that holds it}."""
    root = tmp_path_factory.mktemp("tiny-hf")
    dirs = {name: MAKER.make(name, root / name) for name in sorted(set(MAKER.DIRS.values()))}
    return {component: dirs[model] for component, model in MAKER.DIRS.items()}


@dataclass
class Converted:
    component: str
    hf_dir: Path
    model_dir: Path
    golden_dir: Path


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_hf):
    """converted(component) -> Converted: convert and golden through the Python API, once."""
    from qcexport import hf

    done: dict[str, Converted] = {}

    def get(component: str) -> Converted:
        if component not in done:
            out = tmp_path_factory.mktemp(component)
            comp = hf.load_component(tiny_hf[component], component)
            hf.convert(None, comp, output_dir=out / "model")
            hf.write_golden(None, comp, out / "golden")
            done[component] = Converted(component, tiny_hf[component], out / "model",
                                        out / "golden")
        return done[component]

    return get


@pytest.fixture(scope="session")
def qcrun_device():
    """qcrun_device(*args) -> CompletedProcess of `qcrun ARGS` where torch cannot be imported."""

    def run(*args, cwd=None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        return subprocess.run([sys.executable, "-c", DEVICE_CLI, *map(str, args)],
                              capture_output=True, text=True, timeout=300, env=env, cwd=cwd)

    return run

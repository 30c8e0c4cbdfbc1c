"""Fixtures for the bundle tests: a tiny Q-Former converted once, and bundles made from it.

Converting and re-exporting are the slow parts (seconds each), so the model (exported once
for every folder: ``tiny_models``) and the two bundles (openvino-cpu: copied as exported;
jetson-orin: exported again, decomposed at opset 17), a key pair and a bundle signed with it
are built once per session; tests that damage a bundle work on a copy. ``qcrun_no_torch``
runs the qcrun command line in a fresh interpreter where importing torch or onnx fails, as on
a device. Nothing mocks an engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from qcrun.signing import generate_keypair

from qcexport.bundle import make_bundle
from qcexport.cli import main as qcexport_main

# A device: torch and onnx cannot be imported; then `qcrun ARGS...` or a script runs.
BLOCKER = r"""
import importlib.abc, sys

class Device(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx"):
            raise ModuleNotFoundError(f"{name} is blocked: not installed on the device")
        return None

sys.meta_path.insert(0, Device())
sys.modules["torch"] = None
sys.modules["onnx"] = None
"""

CLI = BLOCKER + r"""
from qcrun.cli import main
sys.argv = ["qcrun", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="session")
def qformer_dir(tiny_models) -> Path:
    """The tiny Q-Former shared by the whole session (testsupport.models): never write it."""
    return tiny_models.dir("qformer")


@pytest.fixture(scope="session")
def ov_bundle(tmp_path_factory, qformer_dir):
    """BundleResult of the Q-Former for openvino-cpu (the model is copied as exported)."""
    out = tmp_path_factory.mktemp("bundles") / "qformer.bundle"
    return make_bundle(qformer_dir, "openvino-cpu", output=out)


@pytest.fixture(scope="session")
def jetson_bundle(tmp_path_factory, qformer_dir):
    """BundleResult for jetson-orin: exported again, decomposed at opset 17; tokens widened."""
    out = tmp_path_factory.mktemp("bundles") / "qformer-orin.bundle"
    return make_bundle(qformer_dir, "jetson-orin", output=out,
                       profile_shapes={"tokens": (1, 257, 1025)})


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """(private key, public key) of the host, and the public key of somebody else."""
    directory = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(directory, "host")
    _, stranger = generate_keypair(directory, "stranger")
    return private, public, stranger


@pytest.fixture(scope="session")
def signed_bundle(tmp_path_factory, qformer_dir, keys):
    """A bundle signed through the real command line: `qcexport bundle --sign KEY`."""
    out = tmp_path_factory.mktemp("signed") / "signed.bundle"
    result = CliRunner().invoke(qcexport_main, [
        "bundle", str(qformer_dir), "--target", "openvino-cpu", "-o", str(out),
        "--host-targets", "openvino-cpu", "--sign", str(keys[0])])
    assert result.exit_code == 0, result.output
    assert "signed    by key" in result.output
    assert f"qcrun verify {out} --trust {keys[1]}" in result.output
    return out


@pytest.fixture
def bundle_copy(tmp_path, ov_bundle) -> Path:
    """A copy of the openvino-cpu bundle somewhere else, for tests that move or damage it."""
    return Path(shutil.copytree(ov_bundle.path, tmp_path / "copied" / "qformer.bundle"))


@pytest.fixture(scope="session")
def qcrun_no_torch():
    """qcrun_no_torch(*args, script=None) -> CompletedProcess of `qcrun ARGS` (or ``script``
    with ARGS in sys.argv) in a fresh interpreter that cannot import torch or onnx."""

    def run(*args, script: str | None = None, cwd=None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        return subprocess.run(
            [sys.executable, "-c", BLOCKER + script if script else CLI, *map(str, args)],
            capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
        )

    return run


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def corrupt():
    """corrupt(path, offset=None): flip one bit of one byte of a file (default: the middle)."""
    return flip_byte

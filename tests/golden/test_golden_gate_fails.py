"""The golden gate can fail, shown failing: eager drift from a perturbed weight, and a golden
output edited with its hashes recomputed (so only the comparison, not a hash, can catch it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from qcrun.golden import array_sha256, file_sha256, load_golden

from qcexport.cli import main
from qcexport.golden import eager_drift, golden_dir, npz_bytes

NAME = "perceiver"  # the fastest tiny mechanism to export


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(golden_dir(NAME, "tiny"), tmp_path / "golden"))


def _rewrite_npz(path: Path, change) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k.removesuffix(".npy"): data[k].copy() for k in data.files}
    change(arrays)
    path.write_bytes(npz_bytes(arrays))
    return arrays


def _perturb_weight(copy: Path) -> str:
    """Scale the largest floating weight by 1.05 and record the new hash, as a forger would."""
    manifest = json.loads((copy / "manifest.json").read_text())
    weights = copy / manifest["weights"]["file"]
    chosen = []

    def scale(arrays):
        name = max((k for k, v in arrays.items() if v.dtype.kind == "f"),
                   key=lambda k: arrays[k].size)
        arrays[name] = (arrays[name] * 1.05).astype(arrays[name].dtype)
        chosen.append(name)

    _rewrite_npz(weights, scale)
    manifest["weights"]["sha256"] = file_sha256(weights)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return chosen[0]


def _edit_output(copy: Path) -> str:
    """Add 0.01 to one stored output and recompute the array and file hashes."""
    manifest = json.loads((copy / "manifest.json").read_text())
    case = manifest["cases"][0]
    output = next(iter(case["outputs"]))

    def nudge(arrays):
        arrays[f"out.{output}"] = (arrays[f"out.{output}"] + 0.01).astype(
            arrays[f"out.{output}"].dtype)
        case["outputs"][output]["sha256"] = array_sha256(arrays[f"out.{output}"])

    _rewrite_npz(copy / case["file"], nudge)
    case["sha256"] = file_sha256(copy / case["file"])
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return f"{case['name']}/{output}"


def test_the_copies_still_pass_every_hash_check(tmp_path):
    weights, output = _copy(tmp_path / "w"), _copy(tmp_path / "o")
    _perturb_weight(weights)
    _edit_output(output)
    load_golden(weights, mechanism=NAME, preset="tiny")  # the forgery is self-consistent
    load_golden(output, mechanism=NAME, preset="tiny")


def test_eager_drift_catches_a_perturbed_weight(tmp_path):
    copy = _copy(tmp_path)
    assert eager_drift(load_golden(copy)) == []  # the unmodified copy reproduces
    _perturb_weight(copy)
    drift = eager_drift(load_golden(copy))
    cases = {c["name"] for c in json.loads((copy / "manifest.json").read_text())["cases"]}
    assert drift and {line.split("/")[0] for line in drift} == cases
    assert all("max abs" in line for line in drift)


def test_eager_drift_catches_an_edited_output(tmp_path):
    copy = _copy(tmp_path)
    where = _edit_output(copy)
    drift = eager_drift(load_golden(copy))
    assert len(drift) == 1 and drift[0].startswith(f"{where}: max abs ")
    assert float(drift[0].split("max abs ")[1].split(" ")[0]) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("forge", [_perturb_weight, _edit_output])
def test_parity_name_fails_on_a_forged_golden_set(tmp_path, forge):
    copy = _copy(tmp_path)
    forge(copy)
    result = CliRunner().invoke(main, ["parity", NAME, "--golden", str(copy), "--targets",
                                       "ort-cpu", "--work-dir", str(tmp_path / "work"),
                                       "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: parity: parity failed: ")
    assert "PyTorch eager no longer reproduces the golden outputs" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False
    # ONNX matches eager, so every forged output fails on the runtime as well
    failed = {(r["case"], r["output"]) for r in report["records"] if r["verdict"] == "fail"}
    assert failed

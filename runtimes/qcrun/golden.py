"""Reading golden sets: PyTorch eager outputs that every runtime is compared against.

qcexport writes a golden set (and reuses ``array_sha256`` / ``file_sha256`` to do it); qcrun
reads it on the host and on the device. Layout of ``golden/<mechanism>/<preset>/``::

    manifest.json   {"format": 1, "mechanism", "preset", "config", "seed", "versions",
                     "weights": {"file", "sha256"},
                     "cases": [{"name", "description", "file", "sha256",
                                "inputs": {name: {"shape", "dtype", "sha256"}},
                                "outputs": {...}}]}
    weights.npz     the module's weights (verified, not loaded: the ONNX model carries them)
    <case>.npz      arrays "in.<name>" and "out.<name>"

Golden data is the ground truth of every parity verdict, so nothing is trusted: each file's
sha256, each array's sha256 (of its C-order bytes), shape and dtype are checked against the
manifest, and npz files are read with ``allow_pickle=False`` so that a golden file can never
execute code.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcrun.errors import UserError, unknown_choice

FORMAT = 1
MANIFEST = "manifest.json"
INPUT_PREFIX = "in."
OUTPUT_PREFIX = "out."


def array_sha256(array: np.ndarray) -> str:
    """sha256 of the array's bytes in C order (independent of its memory layout)."""
    return hashlib.sha256(np.asarray(array).tobytes(order="C")).hexdigest()


def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks so large weight files do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class GoldenCase:
    """One golden case: the inputs fed to PyTorch eager and the outputs it produced."""

    name: str
    description: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    file: Path | None = None


@dataclass(frozen=True)
class GoldenSet:
    """A verified golden set: its manifest (as read) and its cases, in manifest order."""

    path: Path
    manifest: dict[str, Any]
    cases: list[GoldenCase] = field(default_factory=list)

    @property
    def mechanism(self) -> str:
        return self.manifest["mechanism"]

    @property
    def preset(self) -> str:
        return self.manifest["preset"]

    def case(self, name: str) -> GoldenCase:
        for case in self.cases:
            if case.name == name:
                return case
        raise unknown_choice("golden case", name, [c.name for c in self.cases])


def _regenerate_hint(mechanism: str) -> str:
    return f"regenerate with `qcexport golden {mechanism} --update` or restore it from git"


def load_golden(
    directory: str | Path, *, mechanism: str | None = None, preset: str | None = None
) -> GoldenSet:
    """Read and verify the golden set in ``directory``.

    ``mechanism`` / ``preset``, when given, must match the manifest: a model checked against
    another model's golden data would fail for the wrong reason, or pass by accident.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"no golden set at {directory} ({MANIFEST} not found)",
            stage="golden",
            hint="pass --golden DIR, or create it with `qcexport golden NAME`",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"golden manifest {manifest_path} is not valid JSON: {e}",
            stage="golden",
            hint="restore it from git",
        ) from None
    _check_manifest(manifest, manifest_path, mechanism=mechanism, preset=preset)
    hint = _regenerate_hint(manifest["mechanism"])

    weights = manifest.get("weights")
    if weights:
        _check_file(directory / weights["file"], weights["sha256"], hint)

    cases, seen = [], set()
    for entry in manifest["cases"]:
        if entry["name"] in seen:
            raise UserError(
                f"golden manifest {manifest_path} lists case {entry['name']!r} twice",
                stage="golden",
                hint=hint,
            )
        seen.add(entry["name"])
        cases.append(_load_case(directory, entry, hint))
    return GoldenSet(directory, manifest, cases)


def _check_manifest(manifest, path: Path, *, mechanism, preset) -> None:
    def bad(problem: str) -> UserError:
        return UserError(f"golden manifest {path}: {problem}", stage="golden")

    if not isinstance(manifest, dict):
        raise bad("expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"golden manifest {path} has format {manifest.get('format')!r}; this qcrun reads "
            f"format {FORMAT}",
            stage="golden",
            hint="install the qcrun version that matches the qcexport that wrote it",
        )
    for key in ("mechanism", "preset", "cases"):
        if key not in manifest:
            raise bad(f"missing key {key!r}")
    if not isinstance(manifest["cases"], list) or not manifest["cases"]:
        raise bad("has no cases")
    for index, case in enumerate(manifest["cases"]):
        for key in ("name", "file", "sha256", "inputs", "outputs"):
            if not isinstance(case, dict) or key not in case:
                raise bad(f"case #{index} is missing key {key!r}")
    for key, wanted in (("mechanism", mechanism), ("preset", preset)):
        if wanted is not None and manifest[key] != wanted:
            raise UserError(
                f"golden set {path.parent} is for {key} {manifest[key]!r}, but the model is "
                f"{key} {wanted!r}",
                stage="golden",
                hint="pass --golden with the golden set of this model's mechanism and preset",
            )


def _check_file(path: Path, expected_sha: str, hint: str) -> None:
    if not path.is_file():
        raise UserError(f"golden file {path} is missing", stage="golden", hint=hint)
    actual = file_sha256(path)
    if actual != expected_sha:
        raise UserError(
            f"golden file {path} has sha256 {actual} but manifest records {expected_sha}",
            stage="golden",
            hint=hint,
        )


def _load_case(directory: Path, entry: dict, hint: str) -> GoldenCase:
    path = directory / entry["file"]
    _check_file(path, entry["sha256"], hint)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # The hash matched, so the manifest itself records a broken or pickled file.
        raise UserError(
            f"golden file {path} cannot be read as an npz without pickle: {e}",
            stage="golden",
            hint=hint,
        ) from None

    def take(prefix: str, specs: dict) -> dict[str, np.ndarray]:
        taken = {}
        for name, spec in specs.items():
            key = prefix + name
            if key not in arrays:
                raise UserError(
                    f"golden file {path} has no array {key!r} (has: {', '.join(sorted(arrays))})",
                    stage="golden",
                    hint=hint,
                )
            taken[name] = _checked_array(path, key, arrays.pop(key), spec, hint)
        return taken

    inputs = take(INPUT_PREFIX, entry["inputs"])
    outputs = take(OUTPUT_PREFIX, entry["outputs"])
    if arrays:
        raise UserError(
            f"golden file {path} has arrays the manifest does not list: "
            f"{', '.join(sorted(arrays))}",
            stage="golden",
            hint=hint,
        )
    return GoldenCase(entry["name"], entry.get("description", ""), inputs, outputs, path)


def _checked_array(path: Path, key: str, array: np.ndarray, spec: dict, hint: str) -> np.ndarray:
    keys = spec if isinstance(spec, dict) else {}
    missing = [k for k in ("shape", "dtype", "sha256") if k not in keys]
    if missing:
        raise UserError(
            f"golden manifest entry for {key!r} in {path.name} lacks {', '.join(missing)}",
            stage="golden",
            hint=hint,
        )
    problems = []
    if list(array.shape) != list(spec["shape"]):
        problems.append(f"shape {list(array.shape)} but manifest records {spec['shape']}")
    if str(array.dtype) != spec["dtype"]:
        problems.append(f"dtype {array.dtype} but manifest records {spec['dtype']}")
    if array_sha256(array) != spec["sha256"]:
        problems.append(f"sha256 {array_sha256(array)} but manifest records {spec['sha256']}")
    if problems:
        raise UserError(
            f"golden file {path} array {key!r} has {'; '.join(problems)}", stage="golden", hint=hint
        )
    return array

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qcrun.errors import UserError, unknown_choice
from qcrun.schema import check_relpath, dump, inside, parse, read_json

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


def weights_sha256(path: str | Path) -> str:
    """The state-dict hash qcexport records as ``weights_sha256``, from a weights npz: sha256
    over the arrays in name order, each as ``name:torch.<dtype>:<shape>`` then its bytes."""
    digest = hashlib.sha256()
    with np.load(path, allow_pickle=False) as npz:
        for name in sorted(npz.files):
            array = npz[name]
            digest.update(f"{name}:torch.{array.dtype}:{tuple(array.shape)}".encode())
            digest.update(array.tobytes(order="C"))
    return digest.hexdigest()


@dataclass(frozen=True)
class ArraySpec:
    """What one stored array must be: checked against the array read from the npz."""

    shape: list[int]
    dtype: str
    sha256: str


@dataclass(frozen=True)
class CaseEntry:
    """One case as the golden manifest lists it."""

    name: str
    file: str
    sha256: str
    inputs: dict[str, ArraySpec]
    outputs: dict[str, ArraySpec]
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class IntermediatesEntry:
    """One case's PyTorch module outputs (``qcexport golden --with-intermediates``): what a
    device localises a parity failure against without torch. ``modules`` is the execution
    order; ``arrays`` has one entry per module (the npz key is the module's path)."""

    case: str
    file: str
    sha256: str
    modules: list[str]
    arrays: dict[str, ArraySpec]


@dataclass(frozen=True)
class WeightsEntry:
    file: str
    sha256: str


@dataclass(frozen=True)
class SubsetOf:
    """A bundle's golden subset: the cases of the full set it was cut from."""

    cases: list[str]
    weights_file_sha256: str | None = None


@dataclass(frozen=True)
class GoldenManifest:
    """``manifest.json`` of a golden set (format 1), as ``qcexport golden`` writes it."""

    VERSIONS: ClassVar[tuple[int, ...]] = (FORMAT,)
    VERSION_KEY: ClassVar[str] = "format"

    format: int
    mechanism: str
    preset: str
    cases: list[CaseEntry]
    config: dict[str, Any] | None = None
    seed: int | None = None
    writer: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    weights: WeightsEntry | None = None
    subset_of: SubsetOf | None = None
    # A user's module (mechanism "custom"): where it came from (factory, Hugging Face
    # component) and the non-tensor arguments its outputs were computed with.
    source: dict[str, Any] | None = None
    constants: dict[str, Any] | None = None
    # Module outputs of the cases, when written with --with-intermediates (absent otherwise,
    # so sets written without them keep their bytes).
    intermediates: list[IntermediatesEntry] | None = None


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
    """A verified golden set: its manifest (typed) and its cases, in manifest order."""

    path: Path
    manifest: GoldenManifest
    cases: list[GoldenCase] = field(default_factory=list)

    @property
    def mechanism(self) -> str:
        return self.manifest.mechanism

    @property
    def preset(self) -> str:
        return self.manifest.preset

    @property
    def weights_path(self) -> Path | None:
        """The verified weights file (None for a bundle's subset, which has none)."""
        if self.manifest.weights is None:
            return None
        return inside(self.path, self.manifest.weights.file,
                      where=f"golden manifest {self.path / MANIFEST}", field="weights.file",
                      stage="golden")

    def case(self, name: str) -> GoldenCase:
        for case in self.cases:
            if case.name == name:
                return case
        raise unknown_choice("golden case", name, [c.name for c in self.cases])


def _regenerate_hint(mechanism: str) -> str:
    return f"regenerate with `qcexport golden {mechanism} --update` or restore it from git"


def read_golden_manifest(directory: str | Path) -> GoldenManifest:
    """The typed manifest of the golden set in ``directory`` (types, keys, version and paths
    checked; the files themselves are checked by :func:`load_golden`)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(
            f"no golden set at {directory} ({MANIFEST} not found)",
            stage="golden",
            hint="pass --golden DIR, or create it with `qcexport golden NAME`",
        )
    where = f"golden manifest {path}"
    manifest = parse(GoldenManifest, read_json(path, what="golden manifest", stage="golden"),
                     where=where, stage="golden")
    if not manifest.cases:
        raise UserError(f"{where}: has no cases", stage="golden",
                        hint=_regenerate_hint(manifest.mechanism))
    for index, entry in enumerate(manifest.cases):
        check_relpath(entry.file, where=where, field=f"cases[{index}].file", stage="golden")
    if manifest.weights is not None:
        check_relpath(manifest.weights.file, where=where, field="weights.file", stage="golden")
    return manifest


def golden_manifest_json(manifest: GoldenManifest | dict) -> str:
    """The one serialisation of a golden manifest (a dict is validated first)."""
    if isinstance(manifest, dict):
        manifest = parse(GoldenManifest, manifest, where="the golden manifest being written",
                         stage="golden")
    return json.dumps(dump(manifest), indent=2) + "\n"


def load_golden(
    directory: str | Path, *, mechanism: str | None = None, preset: str | None = None
) -> GoldenSet:
    """Read and verify the golden set in ``directory``.

    ``mechanism`` / ``preset``, when given, must match the manifest: a model checked against
    another model's golden data would fail for the wrong reason, or pass by accident.
    """
    directory = Path(directory)
    manifest = read_golden_manifest(directory)
    manifest_path = directory / MANIFEST
    for key, wanted in (("mechanism", mechanism), ("preset", preset)):
        if wanted is not None and getattr(manifest, key) != wanted:
            raise UserError(
                f"golden set {directory} is for {key} {getattr(manifest, key)!r}, but the "
                f"model is {key} {wanted!r}",
                stage="golden",
                hint="pass --golden with the golden set of this model's mechanism and preset",
            )
    hint = _regenerate_hint(manifest.mechanism)
    where = f"golden manifest {manifest_path}"

    if manifest.weights is not None:
        _check_file(inside(directory, manifest.weights.file, where=where, field="weights.file",
                           stage="golden"), manifest.weights.sha256, hint)

    cases, seen = [], set()
    for index, entry in enumerate(manifest.cases):
        if entry.name in seen:
            raise UserError(
                f"golden manifest {manifest_path} lists case {entry.name!r} twice",
                stage="golden",
                hint=hint,
            )
        seen.add(entry.name)
        path = inside(directory, entry.file, where=where, field=f"cases[{index}].file",
                      stage="golden")
        cases.append(_load_case(path, entry, hint))
    for index, stored in enumerate(manifest.intermediates or []):
        # hashed now; the arrays are read (and checked) module by module when compared
        _check_file(inside(directory, stored.file, where=where,
                           field=f"intermediates[{index}].file", stage="golden"),
                    stored.sha256, hint)
    return GoldenSet(directory, manifest, cases)


def intermediates_entry(golden: GoldenSet, case: str) -> IntermediatesEntry | None:
    """The stored module outputs of ``case`` (None when the set has none for it)."""
    return next((e for e in golden.manifest.intermediates or [] if e.case == case), None)


def read_intermediates(golden: GoldenSet, case: str, modules: Sequence[str]
                       ) -> dict[str, np.ndarray]:
    """The stored outputs of ``modules`` in ``case``, each checked against its recorded shape,
    dtype and sha256; only the arrays asked for are read."""
    entry = intermediates_entry(golden, case)
    hint = _regenerate_hint(golden.mechanism)
    if entry is None:
        raise UserError(f"golden set {golden.path} stores no module outputs for case {case!r}",
                        stage="golden", hint=f"write them with `qcexport golden "
                        f"{golden.mechanism} --preset {golden.preset} --with-intermediates`")
    path = inside(golden.path, entry.file, where=f"golden manifest {golden.path / MANIFEST}",
                  field="intermediates.file", stage="golden")
    with np.load(path, allow_pickle=False) as npz:
        return {m: _checked_array(path, m, npz[m], entry.arrays[m], hint) for m in modules}


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


def _load_case(path: Path, entry: CaseEntry, hint: str) -> GoldenCase:
    _check_file(path, entry.sha256, hint)
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

    def take(prefix: str, specs: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
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

    inputs = take(INPUT_PREFIX, entry.inputs)
    outputs = take(OUTPUT_PREFIX, entry.outputs)
    if arrays:
        raise UserError(
            f"golden file {path} has arrays the manifest does not list: "
            f"{', '.join(sorted(arrays))}",
            stage="golden",
            hint=hint,
        )
    return GoldenCase(entry.name, entry.description, inputs, outputs, path)


def _checked_array(path: Path, key: str, array: np.ndarray, spec: ArraySpec,
                   hint: str) -> np.ndarray:
    problems = []
    if list(array.shape) != list(spec.shape):
        problems.append(f"shape {list(array.shape)} but manifest records {spec.shape}")
    if str(array.dtype) != spec.dtype:
        problems.append(f"dtype {array.dtype} but manifest records {spec.dtype}")
    if array_sha256(array) != spec.sha256:
        problems.append(f"sha256 {array_sha256(array)} but manifest records {spec.sha256}")
    if problems:
        raise UserError(
            f"golden file {path} array {key!r} has {'; '.join(problems)}", stage="golden", hint=hint
        )
    return array

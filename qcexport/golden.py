"""Golden sets: PyTorch eager outputs for a mechanism's cases, stored with their weights.

Layout (read back by ``qcrun.golden``, which verifies every hash):

    golden/<mechanism>/<preset>/manifest.json     cases, shapes, dtypes, sha256s, seed, versions
    golden/<mechanism>/<preset>/weights.npz       the module's state dict
    golden/<mechanism>/<preset>/<case>.npz        in.<input> and out.<output> arrays

Files are written byte-for-byte reproducibly (fixed zip timestamps), so regenerating an
unchanged set changes nothing in git. Golden data is only ever written by PyTorch eager, and a
regeneration that would change stored outputs needs ``update=True``; the result says what
changed either way.
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from qcrun.errors import UserError
from qcrun.golden import (
    FORMAT,
    INPUT_PREFIX,
    MANIFEST,
    OUTPUT_PREFIX,
    GoldenSet,
    array_sha256,
    load_golden,
)

from qcexport import mechanisms
from qcexport.export.pipeline import eager_outputs
from qcexport.export.save import write_bytes_atomic, write_json_atomic

WEIGHTS_FILE = "weights.npz"
GOLDEN_SEED = 1000  # case i uses GOLDEN_SEED + i: distinct from export/verify/calibration seeds
# Below this, a changed output is rounding from another CPU or library build, not drift.
REGENERATION_ATOL = 1e-6
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def golden_root() -> Path:
    """The golden/ directory: $QCEXPORT_GOLDEN, else the one beside the qcexport package."""
    env = os.environ.get("QCEXPORT_GOLDEN")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "golden"


def golden_dir(name: str, preset: str, root: str | Path | None = None) -> Path:
    return Path(root or golden_root()) / name / preset


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive with fixed timestamps: the same arrays always give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w") as f:
                # write_array keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)
                np.lib.format.write_array(f, np.asarray(arrays[key]), allow_pickle=False)
    return buf.getvalue()


def state_dict_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def load_weights(module: torch.nn.Module, golden: GoldenSet) -> torch.nn.Module:
    """Load the golden set's weights (already hash-verified by load_golden) into ``module``."""
    path = golden.path / golden.manifest["weights"]["file"]
    with np.load(path, allow_pickle=False) as data:
        state = {k.removesuffix(".npy"): torch.from_numpy(data[k].copy()) for k in data.files}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"golden weights at {path} do not fit the module (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})",
            stage="golden",
            hint=f"the reference module changed; regenerate with `qcexport golden "
            f"{golden.mechanism} --preset {golden.preset} --update`",
        )
    return module


def module_from_golden(golden: GoldenSet) -> torch.nn.Module:
    """The reference module with the golden set's config and weights."""
    spec = mechanisms.get(golden.mechanism)
    config = spec.config_cls(**golden.manifest["config"])
    torch.manual_seed(0)
    return load_weights(spec.builder(config).eval(), golden)


@dataclass
class Change:
    case: str
    array: str
    what: str  # "new", "removed", "changed", "rounding"
    max_abs: float | None = None

    def describe(self) -> str:
        detail = f" (max abs {self.max_abs:.3g})" if self.max_abs is not None else ""
        return f"{self.case}/{self.array}: {self.what}{detail}"


@dataclass
class GoldenResult:
    path: Path
    cases: list[str]
    written: bool
    changes: list[Change] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def make_cases(name: str, preset: str, module: torch.nn.Module):
    """Run every golden case of the spec in eager mode: [(case, inputs, outputs)]."""
    spec = mechanisms.get(name)
    config = spec.config(preset)
    made = []
    for i, case in enumerate(spec.golden_cases):
        inputs = spec.inputs(config, case, seed=GOLDEN_SEED + i)
        outputs = eager_outputs(module, inputs)
        made.append((case, {k: v.numpy() for k, v in inputs.items()},
                     {n: o.numpy() for n, o in zip(spec.output_names, outputs, strict=True)}))
    return made


def write_golden(
    name: str, preset: str = "tiny", *, root: str | Path | None = None, update: bool = False
) -> GoldenResult:
    """Create or refresh ``golden/<name>/<preset>``.

    An existing set is compared output by output: values within REGENERATION_ATOL are kept
    as stored (rounding), anything else is a change that needs ``update``.
    """
    spec = mechanisms.get(name)
    config = spec.config(preset)
    directory = golden_dir(name, preset, root)
    existing = _existing(directory, name, preset)
    module = mechanisms.create(name, preset)
    if existing is not None and not update:
        # Compare with the stored weights so that a changed initialiser is not mistaken for
        # drift of the forward pass; drift of the weights themselves shows up below.
        module = module_from_golden(existing)
    cases = make_cases(name, preset, module)
    problems = spec.golden_check(module, cases) if spec.golden_check else []
    if problems:
        raise UserError(
            f"golden cases of {name} do not cover what they must: {'; '.join(problems)}",
            stage="golden",
            hint="add cases to the mechanism's spec (golden_cases)",
        )
    changes = _diff(existing, cases) if existing is not None else []
    real = [c for c in changes if c.what != "rounding"]
    result = GoldenResult(directory, [c.name for c, _, _ in cases], False, changes)
    if existing is not None and not real:
        return result  # nothing to write: the stored set still holds
    if existing is not None and not update:
        raise UserError(
            f"regenerating {directory} would change {len(real)} stored arrays: "
            + "; ".join(c.describe() for c in real[:8]),
            stage="golden",
            hint=f"if the change is intended, rerun with `qcexport golden {name} --preset "
            f"{preset} --update` and commit the new golden data",
        )
    _write(directory, spec, preset, config, module, cases)
    result.written = True
    return result


def _existing(directory: Path, name: str, preset: str) -> GoldenSet | None:
    if not (directory / MANIFEST).exists():
        return None
    return load_golden(directory, mechanism=name, preset=preset)  # verifies every hash


def _diff(existing: GoldenSet, cases) -> list[Change]:
    old = {c.name: c for c in existing.cases}
    changes = []
    for case, inputs, outputs in cases:
        stored = old.pop(case.name, None)
        if stored is None:
            changes.append(Change(case.name, "*", "new"))
            continue
        for kind, new, before in (("in", inputs, stored.inputs), ("out", outputs, stored.outputs)):
            for key in sorted(set(new) | set(before)):
                label = f"{kind}.{key}"
                if key not in before or key not in new:
                    changes.append(Change(case.name, label, "new" if key in new else "removed"))
                elif new[key].shape != before[key].shape or new[key].dtype != before[key].dtype:
                    changes.append(Change(case.name, label, "changed"))
                elif array_sha256(new[key]) != array_sha256(before[key]):
                    diff = float(np.abs(new[key].astype(np.float64) - before[key]).max())
                    what = "rounding" if kind == "out" and diff <= REGENERATION_ATOL else "changed"
                    changes.append(Change(case.name, label, what, diff))
    changes += [Change(name, "*", "removed") for name in old]
    return changes


def _write(directory: Path, spec, preset: str, config, module, cases) -> None:
    from qcrun.golden import file_sha256

    directory.mkdir(parents=True, exist_ok=True)
    weights = npz_bytes(state_dict_arrays(module))
    write_bytes_atomic(directory / WEIGHTS_FILE, weights)
    entries = []
    for case, inputs, outputs in cases:
        arrays = {**{INPUT_PREFIX + k: v for k, v in inputs.items()},
                  **{OUTPUT_PREFIX + k: v for k, v in outputs.items()}}
        file = f"{case.name}.npz"
        write_bytes_atomic(directory / file, npz_bytes(arrays))
        entries.append({
            "name": case.name,
            "description": case.description,
            "params": dict(case.params),
            "file": file,
            "sha256": file_sha256(directory / file),
            "inputs": _describe(inputs),
            "outputs": _describe(outputs),
        })
    stale = {p.name for p in directory.glob("*.npz")} - {e["file"] for e in entries} - {WEIGHTS_FILE}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "mechanism": spec.name,
        "preset": preset,
        "config": dataclasses.asdict(config),
        "seed": GOLDEN_SEED,
        "writer": "pytorch-eager",
        "versions": {"torch": torch.__version__.split("+")[0], "numpy": np.__version__,
                     "onnx": onnx.__version__},
        "weights": {"file": WEIGHTS_FILE, "sha256": file_sha256(directory / WEIGHTS_FILE)},
        "cases": entries,
    }
    write_json_atomic(directory / MANIFEST, manifest)
    for name in stale:
        (directory / name).unlink()


def _describe(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": array_sha256(v)}
            for k, v in arrays.items()}


def eager_drift(golden: GoldenSet, atol: float = 1e-5) -> list[str]:
    """Re-run PyTorch eager on the golden inputs with the golden weights: what no longer matches.

    Catches drift in the reference modules (a changed forward pass) and in PyTorch itself.
    """
    module = module_from_golden(golden)
    names = mechanisms.get(golden.mechanism).output_names
    problems = []
    for case in golden.cases:
        inputs = {k: torch.from_numpy(v.copy()) for k, v in case.inputs.items()}
        outputs = eager_outputs(module, inputs)
        for name, now in zip(names, outputs, strict=True):
            stored, now = case.outputs[name], now.numpy()
            if now.shape != stored.shape:
                problems.append(f"{case.name}/{name}: shape {list(now.shape)} != {list(stored.shape)}")
                continue
            diff = float(np.abs(now.astype(np.float64) - stored).max()) if now.size else 0.0
            if not np.isfinite(diff) or diff > atol:
                problems.append(f"{case.name}/{name}: max abs {diff:.3g} > {atol:g}")
    return problems

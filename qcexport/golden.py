"""Golden sets: PyTorch eager outputs for a mechanism's cases, stored with their weights.

Layout (read back by ``qcrun.golden``, which verifies every hash):

    golden/<mechanism>/<preset>/manifest.json     cases, shapes, dtypes, sha256s, seed, versions
    golden/<mechanism>/<preset>/weights.npz       the module's state dict
    golden/<mechanism>/<preset>/<case>.npz        in.<input> and out.<output> arrays

A user's module (``--module pkg.mod:factory`` or a Hugging Face component) gets the same
kind of set from :func:`write_module_golden`, with mechanism ``custom``, the module's source
and constants in the manifest, and its state dict as the weights: qcrun ties a model to a
golden set through the state-dict hash (``weights_sha256``), so a golden set of another model
is refused.

Files are written byte-for-byte reproducibly (fixed zip timestamps), so regenerating an
unchanged set changes nothing in git. Golden data is only ever written by PyTorch eager, and a
regeneration that would change stored outputs needs ``update=True``; the result says what
changed either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from qcrun.errors import UserError
from qcrun.files import _umask
from qcrun.golden import (
    FORMAT,
    INPUT_PREFIX,
    MANIFEST,
    OUTPUT_PREFIX,
    GoldenSet,
    array_sha256,
    golden_manifest_json,
    load_golden,
)

from qcexport import mechanisms
from qcexport.export.mechanism import module_from_golden
from qcexport.export.pipeline import eager_outputs
from qcexport.export.save import write_bytes_atomic
from qcexport.mechanisms.registry import Case
from qcexport.replace import replace_dir

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


def golden_path(name: str | None, preset: str | None, golden: str | Path | None = None,
                *, root: str | Path | None = None) -> Path | None:
    """Where the golden set to compare a model of mechanism ``name`` at ``preset`` with is:
    ``golden`` when given, else the built-in set (:func:`golden_dir`); None for a custom
    module, which has no built-in set (the caller says so in its own words)."""
    if golden is not None:
        return Path(golden)
    if name not in mechanisms.names() or not preset:
        return None
    return golden_dir(name, preset, root)


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
    name: str, preset: str = "tiny", *, root: str | Path | None = None, update: bool = False,
    with_intermediates: bool = False,
) -> GoldenResult:
    """Create or refresh ``golden/<name>/<preset>``.

    An existing set is compared output by output: values within REGENERATION_ATOL are kept
    as stored (rounding), anything else is a change that needs ``update``. With
    ``with_intermediates`` every module's output of every case is stored too (the reference
    of ``qcrun verify --localize``); a set that has them keeps them when refreshed.
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
    write, with_intermediates = _must_write(
        directory, existing, real, with_intermediates, update,
        hint=f"if the change is intended, rerun with `qcexport golden {name} --preset "
        f"{preset} --update` and commit the new golden data")
    if not write:
        return result  # nothing to write: the stored set still holds
    _write(directory, {"mechanism": spec.name, "preset": preset,
                       "config": dataclasses.asdict(config), "seed": GOLDEN_SEED},
           module, cases, existing, with_intermediates=with_intermediates)
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


def _must_write(directory: Path, existing: GoldenSet | None, real: list[Change],
                with_intermediates: bool, update: bool, *, hint: str) -> tuple[bool, bool]:
    """(whether the set must be written, whether with module outputs): an existing set keeps
    its stored intermediates; one that still holds is left alone unless intermediates are
    being added; changing stored arrays needs ``update``."""
    kept = bool(existing is not None and existing.manifest.intermediates)
    with_intermediates = with_intermediates or kept
    adding = with_intermediates and existing is not None and not kept
    if existing is not None and not real and not adding:
        return False, with_intermediates
    if existing is not None and not update:
        raise UserError(
            f"regenerating {directory} would change {len(real)} stored arrays: "
            + "; ".join(c.describe() for c in real[:8]), stage="golden", hint=hint)
    return True, with_intermediates


def _write(directory: Path, header: dict[str, Any], module, cases,
           existing: GoldenSet | None, *, with_intermediates: bool = False,
           constants: Mapping[str, Any] | None = None) -> None:
    """Write a golden set: ``header`` (mechanism, preset, config or source, seed...) plus the
    weights, one npz per case and the hashes. Every file is serialised before the first one is
    written; a new set is built in a hidden sibling directory and renamed into place, and in an
    existing set the manifest is replaced last, so a failure leaves the old set or none."""
    weights = npz_bytes(state_dict_arrays(module))
    files = {WEIGHTS_FILE: weights}
    entries = []
    for case, inputs, outputs in cases:
        arrays = {**{INPUT_PREFIX + k: v for k, v in inputs.items()},
                  **{OUTPUT_PREFIX + k: v for k, v in outputs.items()}}
        file = f"{case.name}.npz"
        files[file] = npz_bytes(arrays)
        entries.append({
            "name": case.name,
            "description": case.description,
            "params": dict(case.params),
            "file": file,
            "sha256": hashlib.sha256(files[file]).hexdigest(),
            "inputs": _describe(inputs),
            "outputs": _describe(outputs),
        })
    manifest: dict[str, Any] = {
        "format": FORMAT,
        **header,
        "writer": "pytorch-eager",
        "versions": {"torch": torch.__version__.split("+")[0], "numpy": np.__version__,
                     "onnx": onnx.__version__},
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights).hexdigest()},
        "cases": entries,
    }
    if with_intermediates:
        manifest["intermediates"] = _intermediates(module, cases, files, constants)
    # Only files the previous manifest listed are removed: never a file the tool did not write.
    stale = ({e.file for e in existing.manifest.cases} - set(files)) if existing else set()
    target = directory if existing is not None else Path(tempfile.mkdtemp(
        dir=_parent(directory), prefix=f".{directory.name}."))
    try:
        for name, data in files.items():
            write_bytes_atomic(target / name, data)
        write_bytes_atomic(target / MANIFEST, golden_manifest_json(manifest).encode())
        if existing is None:
            _claim(target, directory)
    except BaseException:
        if existing is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    for name in stale:
        (directory / name).unlink(missing_ok=True)


def _intermediates(module, cases, files: dict[str, bytes],
                   constants: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every module's output of each case (forward hooks, execution order), one npz per case
    added to ``files``; their manifest entries. Cases are done one at a time."""
    from qcexport.hooks import EagerReference

    entries = []
    for case, inputs, _ in cases:
        reference = EagerReference(module, {case.name: inputs}, constants)
        order = reference.order(case.name)
        arrays = reference.values(case.name, order)
        file = f"{case.name}.modules.npz"
        files[file] = npz_bytes(arrays)
        entries.append({"case": case.name, "file": file,
                        "sha256": hashlib.sha256(files[file]).hexdigest(),
                        "modules": order, "arrays": _describe(arrays)})
    return entries


def _parent(directory: Path) -> Path:
    directory.parent.mkdir(parents=True, exist_ok=True)
    return directory.parent


def _claim(staged: Path, directory: Path) -> None:
    """Move the staged set to ``directory``: it may replace an empty directory (one made for
    it), never someone's files."""
    os.chmod(staged, 0o777 & ~_umask())
    replace_dir(staged, directory, _require_empty)


def _require_empty(directory: Path) -> None:
    """Refuse to replace anything but an empty directory (nothing there is lost)."""
    if not directory.is_dir():
        raise UserError(f"{directory} is a file, not a golden set directory", stage="golden",
                        hint="write the set elsewhere; nothing was written")
    held = sorted(item.name for item in directory.iterdir())
    if held:
        raise UserError(f"{directory} holds {', '.join(held)} but no golden set ({MANIFEST})",
                        stage="golden", hint="remove those files or write the set elsewhere; "
                        "nothing was written")


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


# --- a user's module -------------------------------------------------------------------------

#: How a user's golden set names itself in the manifest (there is no registry entry).
CUSTOM = "custom"

CaseSource = (Mapping[str, Mapping[str, Any]] | Iterable[tuple[str, Mapping[str, Any]]]
              | Callable[[], Any])


def write_module_golden(
    module: torch.nn.Module,
    example_inputs: Mapping[str, Any],
    out_dir: str | Path,
    *,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    cases: CaseSource | None = None,
    constants: Mapping[str, Any] | None = None,
    output_names: list[str] | None = None,
    source: Mapping[str, Any] | None = None,
    seed: int = 0,
    update: bool = False,
    with_intermediates: bool = False,
) -> GoldenResult:
    """Write the golden set of a user's module into ``out_dir``, from PyTorch eager.

    ``cases`` are the golden cases: ``{name: inputs}``, ``[(name, inputs)]`` or a callable
    returning either (a factory's case generator); each ``inputs`` is a full call, tensors and
    non-tensor arguments. Without ``cases``, seeded variations of ``example_inputs`` are made
    (:func:`module_cases`). Non-tensor arguments (``example_inputs``' and ``constants``) are
    fixed, as convert fixes them in the graph: a case that sets one to another value is an
    error naming it. ``output_names`` keeps a subset of the outputs, or names the tensors of a
    module that returns bare tensors, exactly as convert's ``output_names`` does, so the set
    has the model's output names. ``source`` (e.g. the factory or the Hugging Face component)
    is recorded in the manifest.

    An existing set in ``out_dir`` is compared as :func:`write_golden` does; a change (other
    weights included) needs ``update=True``. A directory that holds files but no golden set is
    refused, never overwritten. ``with_intermediates`` stores every submodule's output of each
    case too, as :func:`write_golden` does.
    """
    from qcexport.export.outputs import bind_inputs, split_inputs

    directory = Path(out_dir)
    module = module.eval()
    tensors, fixed = split_inputs(bind_inputs(module, example_inputs), constants)
    axes = {k: dict(v) for k, v in (dynamic_axes or {}).items() if k in tensors}
    made = (module_cases(tensors, axes, seed=seed) if cases is None
            else _user_cases(cases, tensors, fixed))
    existing = _existing_user_set(directory)
    computed = []
    for case, feed in made:
        try:
            outputs = planned_outputs(module, {**feed, **fixed}, output_names)
        except UserError:
            raise
        except Exception as exc:  # the user's forward failing on a case: say which
            raise UserError(f"the module fails on golden case {case.name!r}: "
                            f"{type(exc).__name__}: {exc}", stage="golden",
                            hint="fix the case generator or the module") from exc
        computed.append((case, {k: v.numpy() for k, v in feed.items()},
                         {k: v.numpy() for k, v in outputs.items()}))
    changes = _diff(existing, computed) if existing is not None else []
    if existing is not None and _weights_differ(existing, module):
        changes.append(Change("*", WEIGHTS_FILE, "changed"))
    real = [c for c in changes if c.what != "rounding"]
    result = GoldenResult(directory, [c.name for c, _, _ in computed], False, changes)
    write, with_intermediates = _must_write(
        directory, existing, real, with_intermediates, update,
        hint="if the change is intended (other weights or cases), rerun with --update; "
        "else write the new set to another directory")
    if not write:
        return result
    header = {"mechanism": CUSTOM, "preset": CUSTOM, "seed": seed,
              "source": dict(source or {}), "constants": dict(fixed)}
    _write(directory, header, module, computed, existing, with_intermediates=with_intermediates,
           constants=fixed)
    result.written = True
    return result


def planned_outputs(module: torch.nn.Module, inputs: Mapping[str, Any],
                    output_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``module(**inputs)`` in eager mode, as the graph's named outputs: the leaves convert
    exports for ``output_names`` (a subset, or names for bare tensors), under its names."""
    from qcexport.export.outputs import plan_outputs, require_tensors

    with torch.no_grad():
        flat = require_tensors(module(**inputs))
    plan = plan_outputs(flat, output_names)
    leaves = {leaf.name: t for leaf, t in flat}
    return {name: leaves[leaf] for name, leaf in zip(plan.names, plan.leaves, strict=True)}


def module_cases(tensors: Mapping[str, torch.Tensor], dynamic_axes: Mapping[str, Mapping[int, str]],
                 *, seed: int = 0) -> list[tuple[Case, dict[str, torch.Tensor]]]:
    """Seeded golden cases for a module without its own: fresh values at the example shape,
    then each dynamic axis on its own at another size, then (when an input looks like a mask:
    integers or booleans that are all 0/1) the example shape with padding in every row but
    the first. Case i uses ``GOLDEN_SEED + seed + i``."""
    from qcexport.export.pipeline import resample

    base = GOLDEN_SEED + seed
    made = [(Case("example", {}, "the example shape, fresh values"),
             resample(tensors, {}, seed=base))]
    labels = list(dict.fromkeys(label for axes in dynamic_axes.values()
                                for label in axes.values()))
    for i, label in enumerate(labels, start=1):
        only = {name: {a: n for a, n in axes.items() if n == label}
                for name, axes in dynamic_axes.items()}
        feed = resample(tensors, {k: v for k, v in only.items() if v}, seed=base + i)
        sizes = sorted({feed[name].shape[a] for name, axes in only.items() for a in axes})
        made.append((Case(f"{label}_{'_'.join(map(str, sizes))}", {label: sizes[0]},
                          f"dynamic axis {label!r} at another size"), feed))
    masks = [name for name, t in tensors.items() if _is_mask(t) and t.dim() >= 2]
    if masks:
        feed = resample(tensors, {}, seed=base + len(made))
        for name in masks:
            feed[name] = _padded(tensors[name])
        made.append((Case("padding", {"masks": masks},
                          f"{', '.join(masks)} with padding in every row but the first"), feed))
    return made


def _is_mask(t: torch.Tensor) -> bool:
    if t.dtype == torch.bool:
        return True
    return not t.dtype.is_floating_point and t.numel() > 0 and bool(((t == 0) | (t == 1)).all())


def _padded(mask: torch.Tensor) -> torch.Tensor:
    """The mask with the last quarter (at least one) of its last axis off in every row but
    the first; row 0 stays as it was, so a padded row and an unpadded one meet in a batch."""
    out = torch.ones_like(mask)
    cut = max(1, mask.shape[-1] // 4)
    if out.shape[0] > 1 and mask.shape[-1] > 1:
        out[1:, ..., -cut:] = 0
    return out


def _user_cases(cases: CaseSource, tensors: Mapping[str, torch.Tensor],
                fixed: Mapping[str, Any]) -> list[tuple[Case, dict[str, torch.Tensor]]]:
    """The user's cases, checked: every tensor input given, and every non-tensor argument
    the value the model fixes (a case cannot change what the graph holds as a constant)."""
    if callable(cases):
        cases = cases()
    pairs = list(cases.items()) if isinstance(cases, Mapping) else list(cases)
    if not pairs:
        raise UserError("the case generator gave no golden case", stage="golden",
                        hint="yield (name, inputs) pairs, or give no generator for seeded cases")
    made, seen = [], set()
    for item in pairs:
        if isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], Case):
            case, feed = item[0], item[1]
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Mapping):
            case, feed = (item[0] if isinstance(item[0], Case) else Case(str(item[0]), {})), item[1]
        else:
            raise UserError(f"a golden case must be (name, {{input: value}}), not "
                            f"{type(item).__name__}", stage="golden",
                            hint="yield (name, inputs) pairs from the case generator")
        if case.name in seen or not case.name.replace("-", "_").isidentifier():
            raise UserError(f"golden case name {case.name!r} is "
                            + ("used twice" if case.name in seen else "not a plain name"),
                            stage="golden", hint="name each case once, with letters, digits, _")
        seen.add(case.name)
        feed_tensors = {k: v for k, v in feed.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in feed.items() if not isinstance(v, torch.Tensor)}
        for name, value in others.items():
            if name in tensors:
                raise UserError(f"golden case {case.name!r}: input {name!r} is a "
                                f"{type(value).__name__}, the example's is a tensor",
                                stage="golden", hint="pass it as a tensor")
            if name not in fixed or fixed[name] != value:
                model = (f"the model fixes it to {fixed[name]!r}" if name in fixed
                         else "the example inputs do not have it")
                raise UserError(
                    f"golden case {case.name!r} sets the non-tensor argument {name!r} to "
                    f"{value!r}, but {model}",
                    stage="golden",
                    hint=f"non-tensor arguments are constants of the exported graph: keep "
                    f"{name!r} the same in every case (export once per value)")
        if set(feed_tensors) != set(tensors):
            raise UserError(f"golden case {case.name!r} has tensor inputs "
                            f"{sorted(feed_tensors)}, the model {sorted(tensors)}",
                            stage="golden", hint="give every tensor input in every case")
        made.append((case, {k: feed_tensors[k] for k in tensors}))
    return made


def _existing_user_set(directory: Path) -> GoldenSet | None:
    if (directory / MANIFEST).is_file():
        return load_golden(directory)  # verifies every hash
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{directory} exists and is not a golden set (no {MANIFEST})",
                        stage="golden",
                        hint="pass -o with a new or empty directory; nothing was written")
    return None


def _weights_differ(existing: GoldenSet, module: torch.nn.Module) -> bool:
    from qcrun.golden import weights_sha256 as npz_weights_sha256

    from qcexport.export.pipeline import weights_sha256

    path = existing.weights_path
    return path is None or npz_weights_sha256(path) != weights_sha256(module)

"""The optimize stage: an fp32 model directory -> a reduced-precision model directory.

    quantize_model_dir(fp32_dir, "int8-static", out_dir, calibration_cases=16)

The fp32 model is never modified; its external data, if any, is read in place. The new
directory holds ``model.onnx`` (with its own external data file when it is large) and a
manifest that records the precision, the quantizer settings, where the calibration data came
from (source, count, hash) and the accuracy loss of every output against the fp32 model. A
model whose loss exceeds the precision's policy is not written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from qcrun.errors import UserError, unknown_choice
from qcrun.files import read_model_dir
from qcrun.golden import file_sha256
from qcrun.inputs import make_inputs
from qcrun.parity import TolerancePolicy, policy_for
from qcrun.schema import dump
from qcrun.targets import get_target

from qcexport import mechanisms
from qcexport.export.pipeline import MANIFEST_FILE, MODEL_FILE, ConvertResult
from qcexport.export.save import prepare_output_dir, save_model_and_manifest
from qcexport.optimize.auto_exclude import DEFAULT_BUDGET
from qcexport.optimize.auto_exclude import auto_exclude as auto_exclude_search
from qcexport.optimize.auto_exclude import check_options as check_auto_exclude
from qcexport.optimize.precision import (
    CALIBRATION_METHODS,
    PRECISIONS,
    Calibration,
    LossRecord,
    accuracy_loss,
    calibration_from_npz,
    feeds_sha256,
    measure_target,
    quantize_file,
)
from qcexport.split.model_dir import resplit, split_of
from qcexport.stages import StageCallback, StageRunner

__all__ = ["CALIBRATION_METHODS", "PRECISIONS", "QuantizeResult", "at_precision",
           "quantize_model_dir"]

CALIBRATION_SEED = 20_000  # distinct from golden (1000+), export (0) and verify (1, 2) seeds
EVALUATION_SEED = 30_000


@dataclasses.dataclass
class QuantizeResult:
    path: Path
    manifest: dict[str, Any]
    loss: list[LossRecord]
    seconds: float
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def _spec_feeds(manifest, count: int, seed: int) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Inputs from the mechanism's example-input factory (``manifest``: a
    ``qcrun.files.ModelManifest``), cycling through its golden cases' shapes and flags
    (padding, branches, m...) with seeds of their own."""
    spec = mechanisms.get(manifest.mechanism)
    config = spec.config_cls(**(manifest.config or {}))
    feeds = []
    for i in range(count):
        case = spec.golden_cases[i % len(spec.golden_cases)]
        inputs = spec.inputs(config, case, seed=seed + i)
        feeds.append((f"{case.name}#{i}", {k: v.numpy() for k, v in inputs.items()}))
    return feeds


def check_target_precision(target: str, precision: str) -> None:
    """``precision`` is one this toolkit makes (a UserError listing them otherwise) and
    ``target`` runs models of it."""
    if precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS, flag="--precision")
    profile = get_target(target)
    if precision not in profile.precisions:
        # the target's own reason where it gives one (bf16, IR), after "it runs ...: "
        said = (profile.incompatibility(precision=precision) or "").partition("): ")[2]
        why = {
            "int8-dynamic": "it has no MatMulInteger/DynamicQuantizeLinear kernels (dynamic "
                            "quantization is a CPU technique)",
        }.get(precision) or said or "its engine has no kernels for it"
        raise UserError(
            f"target {target} does not run {precision} models: {why}",
            stage="quantize",
            hint=f"use one of {', '.join(profile.precisions)} for {target}",
        )


def at_precision(convert_fp32: Callable[[Path], ConvertResult], precision: str,
                 output_dir: str | Path, *, target: str = "ort-cpu",
                 **options) -> ConvertResult:
    """Compose convert and quantize: ``convert_fp32(directory)`` writes the fp32 model, into
    ``output_dir`` itself for fp32, else into ``output_dir/fp32`` (kept as the reference),
    and the ``precision`` model made from it goes into ``output_dir`` (``result.reduced``).
    ``options`` are :func:`quantize_model_dir`'s. The precision and the target are checked
    before any work."""
    check_target_precision(target, precision)
    out = Path(output_dir)
    if precision == "fp32":
        return convert_fp32(out)
    result = convert_fp32(out / "fp32")
    result.reduced = quantize_model_dir(result.path.parent, precision, out, **options)
    return result


def quantize_model_dir(model_dir: str | Path, precision: str, output_dir: str | Path,
                       **options) -> QuantizeResult:
    """Quantize ``model_dir`` into ``output_dir`` (see ``_quantize_model_dir``). An output
    directory created for a quantization that fails is removed again if it is still empty."""
    if options.get("auto_exclude"):  # before any work: int8-nncf has its own search
        check_auto_exclude(precision, options.get("exclusion_budget", DEFAULT_BUDGET))
    out = Path(output_dir)
    created = not out.exists()
    quantize = _quantize_model_dir
    if precision == "int8-nncf":  # NNCF's own path: OpenVINO IR, optional accuracy control
        from qcexport.optimize.nncf import import_nncf, quantize_nncf_dir

        import_nncf()  # before reading anything: the install command comes first

        def quantize(model_dir, _precision, output_dir, **options):
            return quantize_nncf_dir(model_dir, output_dir, **options)
    elif options.pop("accuracy_control", False):
        raise UserError(f"--accuracy-control applies to --precision int8-nncf, not {precision}",
                        stage="quantize", hint="pass --precision int8-nncf --accuracy-control")
    try:
        cut = split_of(model_dir, precision)  # a split model is quantized whole, then re-split
        result = quantize(model_dir, precision, output_dir, **options)
        return resplit(result, cut) if cut is not None else result
    except BaseException:
        if created and out.is_dir():
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: never remove what someone else put there
        raise


def _source_and_exclusions(model_dir: Path, out_dir: Path, precision: str, target,
                           exclude_modules: Sequence[str]):
    """``_source``'s (source, target), and the modules kept in float: the mechanism's own
    (its spec's ``quantize_exclude``), then the user's."""
    source, target = _source(model_dir, out_dir, precision, target)
    if source.manifest.builtin:
        exclude_modules = [*mechanisms.get(source.manifest.mechanism).quantize_exclude,
                           *exclude_modules]
    return source, target, list(exclude_modules)


def _source(model_dir: Path, out_dir: Path, precision: str, target: str | None):
    """The checked fp32 model directory and the target to quantize for. Types, paths, hashes
    and the graph's precision are checked: a truncated or edited model is refused before any
    work."""
    source = read_model_dir(model_dir, stage="quantize")
    manifest = source.manifest
    if manifest.precision != "fp32":
        raise UserError(f"{model_dir} is already {manifest.precision}", stage="quantize",
                        hint="quantize the fp32 model directory instead")
    if out_dir.resolve() == model_dir.resolve():
        raise UserError("the output directory is the fp32 model's directory", stage="quantize",
                        hint="pass another -o; the fp32 model is kept as the reference")
    if target is None:
        target = manifest.target or "ort-cpu"
        if get_target(target).incompatibility(precision=precision):
            # the export's target cannot compute it (bf16, IR): where it is measured
            target = measure_target(precision)
    check_target_precision(target, precision)
    return source, target


def _feeds(manifest, precision: str, calibration_file, calibration_cases: int,
           evaluation_cases: int) -> tuple[Calibration | None, list]:
    """The calibration set (int8-static) and the evaluation feeds: from a file, or from the
    mechanism's input factory; a custom module without a file is measured on the
    calibration samples, or on one synthetic feed."""
    calibration = None
    if precision == "int8-static":
        if calibration_file:
            calibration = calibration_from_npz(calibration_file, manifest.input_specs())
        elif manifest.builtin:
            feeds = [f for _, f in _spec_feeds(manifest, calibration_cases, CALIBRATION_SEED)]
            calibration = Calibration("factory", feeds, feeds_sha256(feeds))
        else:
            raise UserError("a custom module needs a calibration file for int8-static",
                            stage="calibrate", hint="pass --calibration FILE.npz")
    if manifest.builtin:
        evaluation = _spec_feeds(manifest, evaluation_cases, EVALUATION_SEED)
    elif calibration is not None:
        evaluation = [(f"calibration#{i}", f)
                      for i, f in enumerate(calibration.feeds[:evaluation_cases])]
    else:
        evaluation = [("example", make_inputs(manifest.input_specs(), seed=EVALUATION_SEED))]
    return calibration, evaluation


def _measure(src: Path, staged: Path, precision: str, evaluation,
             policy: TolerancePolicy | None = None) -> list[LossRecord]:
    """The reduced model against the fp32 one; over the policy is a UserError."""
    loss = accuracy_loss(src, staged, precision, evaluation, policy)
    failed = [r for r in loss if not r.passed]
    if failed:
        worst = sorted(failed, key=lambda r: r.cosine)[:5]
        lines = "; ".join(f"{r.case}/{r.output}: max abs {r.max_abs:.3g}, cosine "
                          f"{r.cosine:.5f} ({r.tolerance})" for r in worst)
        raise UserError(
            f"{precision} loses more accuracy than the policy allows on {len(failed)} "
            f"outputs; worst: {lines}",
            stage="quantize",
            hint="keep sensitive parts in float with --exclude-modules NAME (the PyTorch "
            "module, e.g. a controller or the last projection) or --exclude-nodes NODE; "
            "or try another --method / more --calibration-cases",
        )
    return loss


def _save(staged: Path, out_dir: Path, manifest, precision: str, settings, calibration,
          loss: list[LossRecord], src: Path) -> dict[str, Any]:
    """Write the reduced model and its manifest as one unit: an fp16 model never sits under
    an int8 manifest, whatever fails; a large model goes with its external data file, hashed
    in the manifest."""
    out_manifest = {
        **dump(manifest),
        "precision": precision,
        "quantization": settings.to_dict(),
        "calibration": calibration.describe() if calibration else None,
        "accuracy_loss": [dataclasses.asdict(r) for r in loss],
        "source_model": {"path": str(src), "sha256": file_sha256(src)},
    }
    out_manifest.pop("files", None)
    out_manifest.pop("files_sha256", None)
    out_manifest.pop("split", None)  # the fp32 graphs' cut: the reduced model is re-split
    out_manifest.pop("ir", None)  # the fp32 model's IR, not this one's (`qcexport ir` makes it)
    out_manifest["model"] = MODEL_FILE
    reduced = onnx.load(staged)
    save_model_and_manifest(reduced, out_dir / MODEL_FILE, out_dir / MANIFEST_FILE,
                            out_manifest)
    return out_manifest


def _quantize_model_dir(
    model_dir: str | Path,
    precision: str,
    output_dir: str | Path,
    *,
    calibration_file: str | Path | None = None,
    calibration_cases: int = 16,
    method: str = "minmax",
    exclude_nodes: Sequence[str] = (),
    exclude_modules: Sequence[str] = (),
    target: str | None = None,
    evaluation_cases: int = 6,
    on_stage: StageCallback | None = None,
    auto_exclude: bool = False,
    exclusion_budget: int = DEFAULT_BUDGET,
    policy_file: str | Path | None = None,
) -> QuantizeResult:
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(output_dir)
    source, target, exclude_modules = _source_and_exclusions(model_dir, out_dir, precision,
                                                             target, exclude_modules)
    manifest, src = source.manifest, source.model
    stages = StageRunner(on_stage)
    calibration, evaluation = stages("calibrate", _feeds, manifest, precision,
                                     calibration_file, calibration_cases, evaluation_cases)
    prepare_output_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="qcexport-quantize-") as tmp:
        staged = Path(tmp) / MODEL_FILE
        policy = policy_for(precision, policy_file=policy_file)
        if auto_exclude:  # quantize, and keep the worst modules in float until it passes

            def attempt(dst: Path, nodes: Sequence[str]):
                return quantize_file(src, dst, precision, calibration=calibration,
                                     method=method, exclude_nodes=[*exclude_nodes, *nodes],
                                     exclude_modules=exclude_modules)

            settings = stages("auto-exclude", auto_exclude_search, src, staged, precision,
                              attempt, evaluation, policy=policy, target=target,
                              budget=exclusion_budget)
        else:
            settings = stages("quantize", quantize_file, src, staged, precision,
                              calibration=calibration, method=method,
                              exclude_nodes=exclude_nodes, exclude_modules=exclude_modules)
        loss = stages("measure", _measure, src, staged, precision, evaluation, policy)
        out_manifest = stages("save", _save, staged, out_dir, manifest, precision, settings,
                              calibration, loss, src)
    return QuantizeResult(out_dir / MODEL_FILE, out_manifest, loss, time.perf_counter() - start,
                          stages.timings)

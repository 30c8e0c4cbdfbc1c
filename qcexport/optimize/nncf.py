"""int8-nncf: NNCF post-training quantization, OpenVINO's own int8, saved as OpenVINO IR.

    quantize_nncf_dir(fp32_dir, out_dir, calibration_cases=16, accuracy_control=True)

``nncf.quantize`` (transformer model type: SmoothQuant, per-channel weights, activations of
MatMul inputs quantized, softmax and layer norms left in float) reads the fp32 ONNX model
through OpenVINO, calibrates on the mechanism's input factory (or the user's calibration
file) and writes ``model.xml`` + ``model.bin`` into the model directory, with a manifest that
records the precision, the settings, the calibration and the accuracy loss against the fp32
model on OpenVINO CPU (both pinned to fp32 float arithmetic).

With accuracy control, ``nncf.quantize_with_accuracy_control`` judges each candidate with
qcrun's tolerance policy for int8-nncf on evaluation cases (other seeds than calibration):
an evaluation case scores 1 when every output is within the policy against the fp32 model,
less (by its cosine) when not, and NNCF returns quantized operations to float, most harmful
first, until every case is within the policy. Those operations are listed in the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qcrun.errors import UserError
from qcrun.files import fsync_write, manifest_json
from qcrun.golden import file_sha256
from qcrun.parity import TolerancePolicy, compare, policy_for
from qcrun.schema import dump

from qcexport.export.save import prepare_output_dir, replace_pair
from qcexport.optimize.precision import (
    Calibration,
    LossRecord,
    QuantizeSettings,
    load_checked,
    resolve_exclusions,
)
from qcexport.stages import StageCallback, StageRunner

PRECISION = "int8-nncf"
IR_MODEL, IR_WEIGHTS = "model.xml", "model.bin"
INSTALL = "pip install 'qcexport[nncf]'"
#: Where the validation function and the accuracy loss run: NNCF itself compiles there.
POLICY_TARGET = "openvino-cpu"


def import_nncf():
    """The nncf module, or a UserError with the install command."""
    try:
        import nncf
    except ImportError as exc:
        raise UserError(f"--precision {PRECISION} needs NNCF, which is not installed here "
                        f"({exc})", stage="quantize", hint=f"install it with {INSTALL}") from exc
    return nncf


@contextlib.contextmanager
def _quiet():
    """NNCF logs advice and draws progress bars; the CLI reports what matters itself."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


# --- the policy as NNCF's validation function ------------------------------------------------


def case_score(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
               policy: TolerancePolicy) -> float:
    """1.0 when every output of one evaluation case is within the int8-nncf policy against
    the fp32 model; else half the worst cosine, so that a case that fails scores below every
    case that passes and NNCF still ranks candidates by how far they are off."""
    worst, passed = 1.0, True
    for name, expected in reference.items():
        result = compare(outputs[name], expected, policy.resolve(PRECISION, POLICY_TARGET, name))
        passed = passed and result.passed
        cosine = result.metrics.cosine
        worst = min(worst, -1.0 if cosine is None or not np.isfinite(cosine) else cosine)
    return 1.0 if passed else 0.5 * worst


def _by_name(compiled, results) -> dict[str, np.ndarray]:
    """A compiled model's results keyed by every name of each output port."""
    named = {}
    for port in compiled.outputs:
        for name in port.get_names():
            named[name] = np.asarray(results[port])
    return named


def validation_fn(references: Mapping[str, Mapping[str, np.ndarray]], policy: TolerancePolicy):
    """NNCF's ``validation_fn(compiled_model, items)``: items are (case name, feed); returns
    the mean case score and the score of each case."""

    def validate(compiled, items) -> tuple[float, list[float]]:
        scores = []
        for name, feed in items:
            outputs = _by_name(compiled, compiled(feed))
            scores.append(case_score(outputs, references[name], policy))
        return float(np.mean(scores)), scores

    return validate


def _references(model, evaluation, outputs: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """The fp32 model's outputs on the evaluation cases, computed in f32 on OpenVINO CPU."""
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    refs = {}
    for name, feed in evaluation:
        named = _by_name(compiled, compiled(feed))
        refs[name] = {o: named[o] for o in outputs}
    return refs


# --- quantizing ------------------------------------------------------------------------------


def _ignored_ops(model, nodes: Sequence[str]) -> list[str]:
    """OpenVINO op names of the ONNX nodes kept in float (``nodes``: their names and output
    names): the ONNX frontend names an op after its node or its output, ``<name>/<part>`` when
    a node becomes several ops (a Gemm's MatMul + Add)."""
    wanted = set(nodes)
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_friendly_name().split("/")[0] in wanted]


def _float_ops(before, after) -> list[str]:
    """The matrix products NNCF left unquantized (no FakeQuantize on their inputs)."""
    def quantized(op) -> bool:
        return any(v.get_node().get_type_name() == "FakeQuantize"
                   or any(i.get_source_output().get_node().get_type_name() == "FakeQuantize"
                          for i in v.get_node().inputs())
                   for v in (inp.get_source_output() for inp in op.inputs()))
    return sorted(op.get_friendly_name() for op in after.get_ordered_ops()
                  if op.get_type_name() == "MatMul" and not quantized(op))


def quantize_ir(src: Path, calibration: Calibration, evaluation, outputs: Sequence[str], *,
                exclude: Sequence[str] = (), accuracy_control: bool = False,
                policy: TolerancePolicy | None = None, max_iterations: int = 8):
    """The int8-nncf ``openvino.Model`` of the fp32 ONNX model ``src``, and its settings."""
    nncf = import_nncf()
    import openvino as ov

    model = ov.Core().read_model(str(src))
    ignored = _ignored_ops(model, exclude)
    common = {
        "model_type": nncf.ModelType.TRANSFORMER,
        "subset_size": calibration.count,
        "ignored_scope": nncf.IgnoredScope(names=ignored, validate=False),
    }
    dataset = nncf.Dataset(calibration.feeds)
    settings = QuantizeSettings(
        PRECISION, ["MatMul"], "int8 per-channel", "int8 per-tensor (NNCF)", None, True,
        "nncf.quantize (model_type=TRANSFORMER, SmoothQuant)", excluded_nodes=list(exclude),
        reason="OpenVINO IR with FakeQuantize; float operations computed in fp32")
    try:
        with _quiet():
            if accuracy_control:
                from nncf.quantization.advanced_parameters import (
                    AdvancedAccuracyRestorerParameters,
                    AdvancedQuantizationParameters,
                    AdvancedSmoothQuantParameters,
                )

                refs = _references(model, evaluation, outputs)
                # NNCF 3.4 reverts an operation to float with its original weights but keeps
                # SmoothQuant's activation scale in front of it, so the reverted operation is
                # wrong by that scale: SmoothQuant off (alpha -1) under accuracy control.
                no_smoothing = AdvancedQuantizationParameters(
                    smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
                quantized = nncf.quantize_with_accuracy_control(
                    model, dataset, nncf.Dataset(list(evaluation)),
                    validation_fn(refs, policy or TolerancePolicy()), max_drop=0.0, **common,
                    advanced_quantization_parameters=no_smoothing,
                    advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                        max_num_iterations=max_iterations))
                settings.method = ("nncf.quantize_with_accuracy_control (model_type=TRANSFORMER, "
                                   "no SmoothQuant); validation: qcrun's int8-nncf policy on "
                                   f"{len(evaluation)} evaluation cases")
            else:
                quantized = nncf.quantize(model, dataset, **common)
    except UserError:
        raise
    except Exception as exc:  # NNCF's own failure (an unsupported graph): its words
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"NNCF could not quantize {src.name}: {type(exc).__name__}: {first}",
                        stage="quantize", hint="quantize the fp32 model with --precision "
                        "int8-static instead, or keep the failing part in float with "
                        "--exclude-modules") from exc
    floats = _float_ops(model, quantized)
    total = sum(1 for op in quantized.get_ordered_ops() if op.get_type_name() == "MatMul")
    settings.counts = {"quantized": {"top": total - len(floats), "branches": 0},
                       "float": {"top": len(floats), "branches": 0}, "float_ops": floats}
    return quantized, settings


# --- the model directory ---------------------------------------------------------------------


def write_ir_dir(model, out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``model.xml`` + ``model.bin`` and the manifest as one unit (``replace_pair``):
    the IR is saved into the hidden staging directory, hashed, then swapped in."""
    import openvino as ov

    def write(new: Path) -> list[str]:
        # openvino.save_model writes in place: into the staging directory, never the output
        ov.save_model(model, str(new / IR_MODEL), compress_to_fp16=False)
        for name in (IR_MODEL, IR_WEIGHTS):  # flushed and shared like every atomic write
            data = (new / name).read_bytes()
            (new / name).unlink()
            fsync_write(new / name, data)
        xml_sha, bin_sha = file_sha256(new / IR_MODEL), file_sha256(new / IR_WEIGHTS)
        # IR only: the manifest's ``model`` is the .xml and ``ir`` hashes both files
        manifest.update(model=IR_MODEL, model_sha256=xml_sha, files=[], files_sha256={},
                        ir={"xml": IR_MODEL, "xml_sha256": xml_sha, "bin": IR_WEIGHTS,
                            "bin_sha256": bin_sha, "source_sha256": None,
                            "openvino": ov.__version__.split("-")[0]})
        text = manifest_json(manifest)
        fsync_write(new / "manifest.json", text.encode())
        return [IR_MODEL, IR_WEIGHTS, "manifest.json"]

    replace_pair(out_dir, write, model=IR_MODEL)
    return manifest


def quantize_nncf_dir(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    calibration_file: str | Path | None = None,
    calibration_cases: int = 16,
    evaluation_cases: int = 6,
    exclude_nodes: Sequence[str] = (),
    exclude_modules: Sequence[str] = (),
    accuracy_control: bool = False,
    policy_file: str | Path | None = None,
    target: str | None = None,
    on_stage: StageCallback | None = None,
    **_ignored: Any,
):
    """``model_dir`` (fp32, ONNX) quantized by NNCF into ``output_dir`` as IR; see the module
    docstring. Returns a ``qcexport.optimize.QuantizeResult``."""
    from qcexport.optimize import QuantizeResult, _feeds, _source_and_exclusions

    import_nncf()  # before any work: the install command, not a half-made directory
    start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(output_dir)
    source, target, exclude_modules = _source_and_exclusions(model_dir, out_dir, PRECISION,
                                                             target, exclude_modules)
    manifest, src = source.manifest, source.model
    onnx_model = load_checked(src, stage="quantize")
    exclude = resolve_exclusions(onnx_model, exclude_nodes, exclude_modules)
    # OpenVINO names an op after its ONNX node or after the node's output: keep both
    excluded = set(exclude)
    exclude = [*exclude, *(o for n in onnx_model.graph.node if n.name in excluded
                           for o in n.output)]
    del onnx_model
    stages = StageRunner(on_stage)
    # int8-static's calibration set: the same factory cases or file, the same checks
    calibration, evaluation = stages("calibrate", _feeds, manifest, "int8-static",
                                     calibration_file, calibration_cases, evaluation_cases)
    prepare_output_dir(out_dir)
    outputs = [o.name for o in manifest.outputs]
    quantized, settings = stages("quantize", quantize_ir, src, calibration, evaluation, outputs,
                                 exclude=exclude, accuracy_control=accuracy_control,
                                 policy=policy_for(PRECISION, policy_file=policy_file))
    with tempfile.TemporaryDirectory(prefix="qcexport-nncf-") as tmp:
        import openvino as ov

        staged = Path(tmp) / IR_MODEL
        ov.save_model(quantized, str(staged), compress_to_fp16=False)
        from qcexport.optimize import _measure

        loss = stages("measure", _measure, src, staged, PRECISION, evaluation)
    out_manifest = {
        **dump(manifest), "precision": PRECISION, "target": target,
        "quantization": settings.to_dict(),
        "calibration": calibration.describe(),
        "accuracy_loss": [dataclasses.asdict(r) for r in loss],
        "source_model": {"path": str(src), "sha256": file_sha256(src)},
    }
    out_manifest = stages("save", write_ir_dir, quantized, out_dir, out_manifest)
    return QuantizeResult(out_dir / IR_MODEL, out_manifest, loss, time.perf_counter() - start,
                          stages.timings)


__all__ = ["INSTALL", "IR_MODEL", "IR_WEIGHTS", "LossRecord", "PRECISION", "case_score",
           "import_nncf", "quantize_ir", "quantize_nncf_dir", "validation_fn", "write_ir_dir"]

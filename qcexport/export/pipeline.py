"""convert: PyTorch module -> verified ONNX model, as passes over one model.

    capture -> simplify -> lower -> check -> verify        (then the caller saves)

Each pass takes a ``ModelProto`` and returns one (verify returns records); the model between
passes is *staged*: its weights live in files of a staging directory (``base_dir``), never
twice in memory (``qcexport.export.save``). :func:`run_passes` is the driver: it runs the
passes through the shared stage runner (timing, progress ``on_stage``, the failing stage in
the error) and returns the verified model with its manifest; :func:`convert` gives it a
staging directory inside the output directory and writes the model there. Nothing here
prints. A failing pass raises ``UserError`` naming itself and what to try.

Verification runs the model in onnxruntime CPU (through qcrun, the code a device runs) on
fresh inputs at two shapes, one of them other than the export shape, and compares it with
PyTorch eager under the fp32 policy (``qcrun.parity.compare_outputs``). Only a model that
passed verification is saved, so a failed convert leaves nothing behind and never replaces a
good model. Reduced precision is the optimize stage's (``qcexport.convert(...,
precision=...)`` composes both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from qcrun.engines import open_adapter
from qcrun.errors import UserError, unknown_choice
from qcrun.files import ExportCheck
from qcrun.graphs import all_graphs
from qcrun.parity import Record, TolerancePolicy, compare_outputs
from qcrun.targets import get_target
from torch import nn

from qcexport.export import save
from qcexport.export.capture import (  # noqa: F401  (re-exported: their old address)
    WIDENED_SIZE,
    Captured,
    Owned,
    capture,
    eager_outputs,
    resample,
    weights_sha256,
    widen_trivial_axes,
)
from qcexport.export.lowering import (
    FORMS,
    check_model,
    downgrade_to_opset17,
    fused_attention_count,
    to_ort_attention,
)
from qcexport.export.save import prepare_output_dir, save_model_and_manifest
from qcexport.export.torch_export import AxisMap, check_dynamic_axes
from qcexport.stages import StageCallback, StageRunner

if TYPE_CHECKING:
    from qcexport.optimize import QuantizeResult

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
DEFAULT_OPSET = {"onnx": 23, "ort": 23, "decomposed": 17}
VERIFY_TARGET = "ort-cpu"

#: One output of one verification case, as the manifest records it (a view of a parity
#: ``Record``).
VerifyRecord = ExportCheck

__all__ = ["MANIFEST_FILE", "MODEL_FILE", "ConvertResult", "Converted", "Owned",
           "StageCallback", "VerifyRecord", "capture", "check", "convert", "lower",
           "run_passes", "simplify", "verify"]


@dataclass
class ConvertResult:
    path: Path
    manifest: dict[str, Any]
    attention: str
    opset: int
    fused_expected: int
    fused_found: int
    verification: list[VerifyRecord]
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    #: The reduced-precision model made from this one (``convert(..., precision=...)``).
    reduced: QuantizeResult | None = None

    @property
    def output_names(self) -> list[str]:
        """The model's outputs, by the names ``qcrun.load(...)`` returns them under."""
        return [o["name"] for o in self.manifest["outputs"]]

    @property
    def constants(self) -> dict[str, Any]:
        """Non-tensor arguments fixed at export."""
        return dict(self.manifest.get("constants", {}))

    @property
    def sdpa_calls(self) -> int:
        """scaled_dot_product_attention calls captured from the module."""
        return int(self.manifest["fused_attention"].get("sdpa_calls", self.fused_expected))

    def describe_attention(self) -> str:
        """How the module's attention was exported, in one line."""
        calls = (f"{self.sdpa_calls} scaled_dot_product_attention "
                 f"call{'s' if self.sdpa_calls > 1 else ''} captured")
        if self.attention == "decomposed":
            return ("attention decomposed to MatMul/Softmax (the decomposed form)"
                    + (f"; {calls}" if self.sdpa_calls else ""))
        if self.sdpa_calls == 0:
            return ("no scaled_dot_product_attention call captured: the module's attention (if "
                    "any) is its own MatMul/Softmax math, exported decomposed")
        return (f"{calls}, {self.fused_found} fused as {self.attention!r} attention "
                f"node{'s' if self.fused_found != 1 else ''}")

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.verification)


def resolve_attention(target: str, attention: str) -> str:
    profile = get_target(target)
    if attention == "auto":
        return profile.attention_forms[0]
    if attention not in FORMS:
        raise unknown_choice("attention form", attention, (*FORMS, "auto"), flag="--attention")
    if attention not in profile.attention_forms:
        raise UserError(
            f"target {target} does not accept the {attention!r} attention form "
            f"(it accepts {', '.join(profile.attention_forms)})",
            stage="lower",
            hint=f"use --attention auto or one of {', '.join(profile.attention_forms)}",
        )
    return attention


def resolve_opset(attention: str, opset: int | None, target: str) -> int:
    opset = opset or DEFAULT_OPSET[attention]
    max_opset = get_target(target).max_opset
    if attention in ("onnx", "ort") and opset < 23:
        raise UserError(
            f"the {attention!r} attention form needs opset 23 (SDPA becomes Attention only "
            f"from opset 23), not {opset}",
            stage="export",
            hint="drop --opset, or use --attention decomposed for an older opset",
        )
    if not 17 <= opset <= 23:
        raise UserError(f"opset {opset} is not supported", stage="export",
                        hint="use an opset from 17 to 23")
    if opset > max_opset:
        raise UserError(f"target {target} reads opsets up to {max_opset}, not {opset}",
                        stage="export", hint=f"pass --opset {max_opset} or less")
    return opset


# --- the graph passes ------------------------------------------------------------------------


def simplify(model: onnx.ModelProto, base_dir: Path) -> tuple[onnx.ModelProto, list[str]]:
    """onnxsim on the staged model, from disk: its C++ core reads the weights itself (it
    needs them to fold constants and fuse MatMul+Add into Gemm) and Python holds them only
    while its result is staged again. Returns the model (the input one when onnxsim cannot
    help) and what the user should know about it."""
    if save.is_large(model):
        return model, ["the model is over the 2 GB protobuf limit, which onnxsim cannot read: "
                       "kept the exporter's (already optimised) graph"]
    source, target = base_dir / "to-simplify.onnx", base_dir / "simplified.onnx"
    save.write_staged(model, source)
    try:
        import onnxsim  # its native library loads only when a conversion needs it

        simplified, ok = onnxsim.simplify(str(source), output_path=str(target))
    except Exception as exc:  # onnxsim fails in many ways on unusual graphs; keep the original
        return model, [f"onnxsim failed ({type(exc).__name__}: {str(exc)[:200]}); "
                       "kept the unsimplified graph"]
    finally:
        source.unlink(missing_ok=True)
    if not ok:
        return model, ["onnxsim could not validate its result; kept the unsimplified graph"]
    restore_node_metadata(model, simplified)
    staged = save.externalize(simplified, base_dir, "simplified.onnx.data")
    del simplified
    target.unlink(missing_ok=True)
    return staged, []


def restore_node_metadata(original: onnx.ModelProto, simplified: onnx.ModelProto) -> None:
    """Give the simplified graph's nodes back the PyTorch module names onnxsim drops.

    The exporter records, per node, the module that produced it (``metadata_props``); the
    per-op profile and module exclusion in quantization need it. A node keeps the metadata of
    the original node that produced the same output; a node onnxsim made up (a Gemm fused from
    MatMul+Add, its Reshapes) takes it from its neighbours in the chain.
    """
    by_output = {o: list(n.metadata_props) for g in all_graphs(original.graph)
                 for n in g.node for o in n.output if n.metadata_props}
    pending = []
    for graph in all_graphs(simplified.graph):
        for node in graph.node:
            props = next((by_output[o] for o in node.output if o in by_output), None)
            if props is not None:
                del node.metadata_props[:]
                node.metadata_props.extend(props)
                for o in node.output:
                    by_output.setdefault(o, props)
            else:
                pending.append(node)
    for _ in range(4):  # fused chains are short: Reshape -> Gemm -> Reshape
        consumers = {}
        for graph in all_graphs(simplified.graph):
            for node in graph.node:
                for i in node.input:
                    consumers.setdefault(i, node)
        still = []
        for node in pending:
            donor = next((n for o in node.output if (n := consumers.get(o)) and n.metadata_props),
                         None)
            donor_props = list(donor.metadata_props) if donor else next(
                (by_output[i] for i in node.input if i in by_output), None)
            if donor_props:
                node.metadata_props.extend(donor_props)
                for o in node.output:
                    by_output.setdefault(o, donor_props)
            else:
                still.append(node)
        pending = still
        if not pending:
            break


def lowers(form: str, opset: int) -> bool:
    """Whether :func:`lower` changes a model of attention ``form`` at ``opset``."""
    return form == "ort" or (form == "decomposed" and opset == 17)


def lower(model: onnx.ModelProto, form: str, opset: int, base_dir: Path) -> onnx.ModelProto:
    """The exporter's graph in the attention form and opset the target reads: opset-23
    ``Attention`` to ``com.microsoft.MultiHeadAttention`` (form ``ort``), the decomposed
    opset-18 graph down to opset 17; any other model is returned as it is."""
    if form == "ort":
        return to_ort_attention(model)
    if form == "decomposed" and opset == 17:
        return downgrade_to_opset17(model, base_dir)
    return model


def count_fused(model: onnx.ModelProto, form: str, expected: int) -> int:
    """The fused attention nodes of ``form`` in the lowered graph, which must be one per
    scaled_dot_product_attention call captured (``expected``; 0 checks nothing)."""
    found = fused_attention_count(model, form)
    if expected and found != expected:
        raise UserError(
            f"expected {expected} fused {form!r} attention nodes (one per "
            f"scaled_dot_product_attention call) but the graph has {found}",
            stage="lower",
            hint="the exporter decomposed some attention (3-D or 5-D q/k/v, dropout in "
            "training mode, opset < 23); use 4-D q/k/v or --attention decomposed",
        )
    return found


def check(model: onnx.ModelProto, input_axes: AxisMap, meta: Mapping[str, str],
          base_dir: Path) -> onnx.ModelProto:
    """The checker and strict shape inference pass, every declared axis is still symbolic
    (the simplifier must not have fixed one either); the model gets its metadata."""
    check_dynamic_axes(model, input_axes)
    check_model(model, base_dir)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "qcexport"
    return model


def attach_defaults(model: onnx.ModelProto, defaults: Mapping[str, Any]) -> onnx.ModelProto:
    """Give each input named in ``defaults`` an initializer of its name holding its default:
    in ONNX (IR >= 4) such an input is optional, and a run that does not feed it reads the
    initializer. Attached after simplifying (which would fold the default into the graph) and
    verifying (which feeds them)."""
    inputs = {i.name for i in model.graph.input}
    unknown = sorted(set(defaults) - inputs)
    if unknown:
        raise UserError(f"optional inputs {unknown} are not inputs of the exported graph",
                        stage="export", hint="the module must take them as forward arguments")
    for name, value in defaults.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    return model


def verify(model: onnx.ModelProto, base_dir: Path, references: Mapping[str, list[torch.Tensor]],
           cases, output_names: Sequence[str]) -> list[Record]:
    """Run the staged model in onnxruntime (through qcrun) on every case and compare it with
    its eager reference under the fp32 policy: one parity record per case and output."""
    policy = TolerancePolicy()
    records: list[Record] = []
    path = save.write_staged(model, base_dir / MODEL_FILE)
    with open_adapter(path, VERIFY_TARGET) as session:
        for case, inputs in cases:
            actual = session.run({k: v.numpy() for k, v in inputs.items()})
            expected = {name: ref.numpy()
                        for name, ref in zip(output_names, references[case], strict=True)}
            records += compare_outputs(VERIFY_TARGET, case, actual, expected,
                                       lambda name: policy.resolve("fp32", VERIFY_TARGET, name))
    path.unlink()
    return records


def export_check(record: Record) -> VerifyRecord:
    """The manifest's view of one verification record."""
    m = record.metrics
    return VerifyRecord(
        case=record.case, output=record.output or "",
        shape=list(m.actual_shape) if m else [],
        max_abs=_num(m.max_abs if m else None), cosine=_num(m.cosine if m else None),
        tolerance=record.tolerance.describe() if record.tolerance else "",
        passed=record.verdict == "pass", message=record.message or "",
    )


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


# --- the manifest ----------------------------------------------------------------------------


def _io_spec(values, ranges: Mapping[str, tuple[int, int]] | None = None
             ) -> list[dict[str, Any]]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim]
        specs.append({"name": v.name,
                      "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      "shape": shape})
        if ranges and v.name in ranges:
            low, high = ranges[v.name]
            specs[-1]["range"] = {"min": int(low), "max": int(high)}
    return specs


def _input_ranges(model: onnx.ModelProto, declared: Mapping[str, tuple[int, int]] | None
                  ) -> dict[str, tuple[int, int]]:
    """The valid values of each integer input: those the spec declares (``input_ranges``),
    else what the graph shows generically: an input used as the indices of a Gather on an
    initializer (an embedding table) must lie in [0, rows - 1]. Nothing for other inputs."""
    integer = {v.name for v in model.graph.input
               if onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).kind in "iu"}
    tables = {t.name: list(t.dims) for g in all_graphs(model.graph) for t in g.initializer}
    ranges: dict[str, tuple[int, int]] = {}
    for graph in all_graphs(model.graph):
        for node in graph.node:
            if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in integer:
                continue
            dims = tables.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if not dims or not -len(dims) <= axis < len(dims):
                continue
            rows = dims[axis]
            _, high = ranges.get(node.input[1], (0, rows - 1))
            ranges[node.input[1]] = (0, min(high, rows - 1))
    unknown = sorted(set(declared or {}) - {v.name for v in model.graph.input})
    if unknown:
        raise UserError(f"input_ranges names {unknown}, which are not inputs of the model",
                        stage="export", hint="name the model's inputs in input_ranges")
    return {**ranges, **(declared or {})}


def _manifest(captured: Captured, model: onnx.ModelProto, *, target: str, form: str,
              opset: int, dynamic_axes, metadata, input_ranges, fused: dict[str, Any],
              checks: list[VerifyRecord], timings, warnings) -> dict[str, Any]:
    """The model's manifest as convert writes it (saving adds the files and their hashes)."""
    return {
        "format": 1,
        **(dict(metadata) if metadata else {}),
        "precision": "fp32",
        "target": target,
        "attention": form,
        "opset": opset,
        "model": MODEL_FILE,
        "weights_sha256": captured.weights_sha256,
        # an input with an initializer of its name is optional: not one a caller must feed
        "inputs": _io_spec([i for i in model.graph.input
                            if i.name not in {t.name for t in model.graph.initializer}],
                           _input_ranges(model, input_ranges)),
        "outputs": _io_spec(model.graph.output),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
        "output_structure": {**captured.plan.structure(),
                             "renamed_values": captured.exported.renamed},
        "constants": captured.constants,
        "export_sizes": {label: new for label, (_, new) in captured.widened.items()},
        "fused_attention": fused,
        "verification": [dataclasses.asdict(r) for r in checks],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "warnings": warnings,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }


def _metadata(form: str, opset: int, weights: str, metadata) -> dict[str, str]:
    """What the model itself records (``metadata_props``), for qcrun to check its manifest
    against."""
    return {
        "qcexport.attention": form,
        "qcexport.opset": str(opset),
        "qcexport.torch": torch.__version__,
        "qcexport.onnx": onnx.__version__,
        "qcexport.weights_sha256": weights,
        **{f"qcexport.{k}": v if isinstance(v, str) else json.dumps(v)
           for k, v in (metadata or {}).items()},
    }


def _refuse_failures(checks: list[VerifyRecord]) -> None:
    failed = [r for r in checks if not r.passed]
    if failed:
        lines = "; ".join(f"{r.case}/{r.output}: max abs {r.max_abs:.3g}, cosine "
                          f"{r.cosine:.6f} ({r.message or r.tolerance})" for r in failed)
        raise UserError(
            f"the exported model does not match PyTorch eager: {lines}",
            stage="verify",
            hint="try --attention decomposed to tell a fused-kernel issue from an export issue; "
            "nothing was written",
        )


@dataclass
class Converted:
    """What :func:`run_passes` hands its caller to save: the verified model (staged in the
    driver's ``base_dir``) and its manifest."""

    model: onnx.ModelProto
    manifest: dict[str, Any]
    form: str
    opset: int
    fused_expected: int
    fused_found: int
    records: list[Record]
    checks: list[VerifyRecord]
    warnings: list[str]


def run_passes(module: nn.Module | Owned, example_inputs, dynamic_axes=None, *,
               base_dir: Path, form: str, opset: int, target: str = VERIFY_TARGET,
               stages: StageRunner | None = None, metadata: Mapping[str, Any] | None = None,
               input_ranges: Mapping[str, tuple[int, int]] | None = None,
               input_defaults: Mapping[str, Any] | None = None,
               **capture_options) -> Converted:
    """The driver: capture -> simplify -> lower -> check -> verify, the model staged in
    ``base_dir``. ``capture_options`` are :func:`capture`'s (output_names, constants,
    verify_inputs). ``input_defaults`` makes those inputs optional (:func:`attach_defaults`).
    A model that fails verification is a UserError."""
    stages = stages or StageRunner()
    dynamic_axes = dict(dynamic_axes or {})
    captured = capture(module, example_inputs, dynamic_axes, form=form, base_dir=base_dir,
                       stages=stages, **capture_options)
    del module
    gc.collect()  # an owned module's weights go before the graph passes (peak memory)
    model, calls = captured.exported.model, captured.exported.sdpa_calls
    captured.exported.model = None  # the passes below hold the only reference
    warnings = captured.warnings
    model, notes = stages("simplify", simplify, model, base_dir)
    warnings += notes
    if lowers(form, opset):
        model = stages("lower", lower, model, form, opset, base_dir)
    expected = 0 if form == "decomposed" else calls
    found = count_fused(model, form, expected)
    if form != "decomposed" and calls == 0:
        warnings.append("no fused attention found: the module computes attention with its own "
                        "math (einsum/matmul/softmax), so it is exported decomposed")
    meta = _metadata(form, opset, captured.weights_sha256, metadata)
    model = stages("check", check, model, captured.input_axes, meta, base_dir)
    records = stages("verify", verify, model, base_dir, captured.references, captured.cases,
                     captured.output_names)
    checks = [export_check(r) for r in records]
    _refuse_failures(checks)
    # verified with the optional inputs fed (qcrun feeds a model's required inputs only);
    # the default path is what the golden cases check
    model = attach_defaults(model, input_defaults or {})
    fused = {"form": form, "expected": expected, "found": found, "sdpa_calls": calls}
    manifest = _manifest(captured, model, target=target, form=form, opset=opset,
                         dynamic_axes={k: v for k, v in dynamic_axes.items()
                                       if k not in (input_defaults or {})}, metadata=metadata,
                         input_ranges=input_ranges, fused=fused, checks=checks,
                         timings=stages.timings, warnings=warnings)
    return Converted(model, manifest, form, opset, expected, found, records, checks, warnings)


def _save(converted: Converted, out_dir: Path, base_dir: Path) -> Path:
    path = out_dir / MODEL_FILE
    try:
        save_model_and_manifest(converted.model, path, out_dir / MANIFEST_FILE,
                                converted.manifest, base_dir=base_dir)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror or exc}", stage="save",
                        hint="free space or choose another -o; the previous model, if any, is "
                        "untouched") from exc
    return path


def convert(
    module: nn.Module | Owned,
    example_inputs: Mapping[str, Any],
    dynamic_axes: AxisMap | None = None,
    *,
    output_dir: str | Path = "out/model",
    target: str = VERIFY_TARGET,
    attention: str = "auto",
    opset: int | None = None,
    on_stage: StageCallback | None = None,
    output_names: Sequence[str] | None = None,
    verify_inputs: Sequence[tuple[str, Mapping[str, torch.Tensor]]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    constants: Mapping[str, Any] | None = None,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
    input_defaults: Mapping[str, Any] | None = None,
) -> ConvertResult:
    """Export ``module(**example_inputs)`` to ``output_dir/model.onnx`` and verify it.

    ``dynamic_axes`` is ``{input or output name: {axis: symbolic name}}``. Non-tensor
    values in ``example_inputs`` (and ``constants``) are fixed at export and recorded in the
    manifest's ``constants``. The module may return any pytree of tensors (``ModelOutput``,
    dicts, dataclasses, nested tuples); its outputs are named by their paths
    (``qcexport.export.outputs``) and ``output_names`` keeps a subset of them.
    ``verify_inputs`` are (case name, inputs) pairs to compare on; by default two fresh
    random sets are made from the example inputs, one at the export shape and one with every
    dynamic axis resized. ``input_defaults`` ({input name: array}) makes those inputs
    optional (:func:`attach_defaults`). A directory created for a conversion that fails is
    removed again: a failed convert leaves nothing behind.
    """
    out = Path(output_dir)
    created = not out.exists()
    try:
        form = resolve_attention(target, attention)
        opset = resolve_opset(form, opset, target)
        out_dir = prepare_output_dir(out)
        stages = StageRunner(on_stage)
        # the model between passes: its weights in files here, never twice in memory
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".qcexport-stage-") as tmp:
            converted = run_passes(
                module, example_inputs, dynamic_axes, base_dir=Path(tmp), form=form,
                opset=opset, target=target, stages=stages, metadata=metadata,
                input_ranges=input_ranges, input_defaults=input_defaults,
                output_names=output_names, constants=constants, verify_inputs=verify_inputs)
            path = stages("save", _save, converted, out_dir, Path(tmp), detail=str)
    except BaseException:
        if created and out.is_dir():
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: never remove what someone else put there
        raise
    return ConvertResult(path, converted.manifest, form, opset, converted.fused_expected,
                         converted.fused_found, converted.checks, stages.timings,
                         converted.warnings)

"""convert: PyTorch module -> verified ONNX model on disk, stage by stage.

    export -> lower -> simplify -> check -> verify -> save

Each stage is timed and reported through ``on_stage``; nothing here prints. A failing stage
raises ``UserError`` naming itself and what to try. Verification runs the model in
onnxruntime CPU (through qcrun, the code a device runs) on fresh inputs at two shapes, one of
them other than the export shape, and compares with PyTorch eager under the fp32 policy.
Only a model that passed verification is saved, so a failed convert leaves nothing behind and
never replaces a good model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from qcrun.errors import UserError, unknown_choice
from qcrun.parity import TolerancePolicy, compare
from qcrun.targets import get_target
from torch import nn

from qcexport.export.lowering import (
    FORMS,
    downgrade_to_opset17,
    fused_attention_count,
    to_ort_attention,
)
from qcexport.export.save import prepare_output_dir, save_model_and_manifest, save_model_atomic
from qcexport.export.torch_export import AxisMap, check_dynamic_axes, export_module
from qcexport.mechanisms.attention import set_fused

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
DEFAULT_OPSET = {"onnx": 23, "ort": 23, "decomposed": 17}
VERIFY_TARGET = "ort-cpu"

StageCallback = Callable[[str, float, str], None]


@dataclass
class VerifyRecord:
    """One output of one verification run against PyTorch eager."""

    case: str
    output: str
    shape: list[int]
    max_abs: float
    cosine: float
    tolerance: str
    passed: bool
    message: str = ""


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


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtype, shape, bytes): identifies the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def eager_outputs(module: nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(**inputs)
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return list(out)
    raise UserError(
        f"the module returned {type(out).__name__}; qcexport exports modules that return a "
        "tensor or a tuple of tensors",
        stage="export",
        hint="wrap the module so forward returns a tensor or a tuple of tensors",
    )


def convert(module: nn.Module, example_inputs, dynamic_axes=None, **kwargs) -> ConvertResult:
    """Export ``module(**example_inputs)`` to ``output_dir/model.onnx`` and verify it.

    See :func:`_convert` for the arguments. A directory created for a conversion that fails is
    removed again: a failed convert leaves nothing behind.
    """
    out = Path(kwargs.get("output_dir", "out/model"))
    created = not out.exists()
    try:
        return _convert(module, example_inputs, dynamic_axes, **kwargs)
    except BaseException:
        if created and out.is_dir():
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: never remove what someone else put there
        raise


def _convert(
    module: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    dynamic_axes: AxisMap | None = None,
    *,
    output_names: Sequence[str] | None = None,
    target: str = VERIFY_TARGET,
    attention: str = "auto",
    opset: int | None = None,
    output_dir: str | Path = "out/model",
    verify_inputs: Sequence[tuple[str, Mapping[str, torch.Tensor]]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    on_stage: StageCallback | None = None,
) -> ConvertResult:
    """Export ``module(**example_inputs)`` to ``output_dir/model.onnx`` and verify it.

    ``dynamic_axes`` is ``{input or output name: {axis: symbolic name}}``.
    ``verify_inputs`` are (case name, inputs) pairs to compare on; by default two fresh
    random sets are made from the example inputs, one at the export shape and one with every
    dynamic axis resized.
    """
    dynamic_axes = dict(dynamic_axes or {})
    form = resolve_attention(target, attention)
    opset = resolve_opset(form, opset, target)
    out_dir = prepare_output_dir(output_dir)
    module = module.eval()
    timings: dict[str, float] = {}
    warnings: list[str] = []

    def stage(name: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        except UserError as exc:
            exc.stage = exc.stage or name
            raise
        finally:
            timings[name] = time.perf_counter() - start
            if on_stage:
                on_stage(name, timings[name], "")

    try:
        reference = stage("eager", eager_outputs, module, example_inputs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"the module's forward fails on the example inputs: {type(exc).__name__}: {exc}",
            stage="eager",
            hint="fix the module or the example inputs; module(**example_inputs) must run",
        ) from exc
    output_names = list(output_names or _default_output_names(len(reference)))
    if len(output_names) != len(reference):
        raise UserError(f"{len(output_names)} output names for {len(reference)} outputs",
                        stage="export", hint="give one name per output")
    input_axes = {k: v for k, v in dynamic_axes.items() if k in example_inputs}
    unknown = sorted(set(dynamic_axes) - set(example_inputs) - set(output_names))
    if unknown:
        raise UserError(f"dynamic_axes names {unknown}, which are neither inputs "
                        f"{list(example_inputs)} nor outputs {output_names}",
                        stage="export", hint="use the module's input names")

    export_opset = 23 if form in ("onnx", "ort") else 18
    set_fused(module, form != "decomposed")
    try:
        model, expected, _log = stage("export", export_module, module, example_inputs,
                                      output_names, input_axes, export_opset)
    finally:
        set_fused(module, True)
    if form == "decomposed":
        expected_fused = 0
    else:
        expected_fused = expected

    model = stage("simplify", _simplify, model, warnings)
    if form == "ort":
        model = stage("lower", to_ort_attention, model)
    elif form == "decomposed" and opset == 17:
        model = stage("lower", downgrade_to_opset17, model)
    found = fused_attention_count(model, form)
    if expected_fused and found != expected_fused:
        raise UserError(
            f"expected {expected_fused} fused {form!r} attention nodes (one per "
            f"scaled_dot_product_attention call) but the graph has {found}",
            stage="lower",
            hint="the exporter decomposed some attention (3-D or 5-D q/k/v, dropout in "
            "training mode, opset < 23); use 4-D q/k/v or --attention decomposed",
        )
    if form != "decomposed" and expected == 0:
        warnings.append("no fused attention found: the module computes attention with its own "
                        "math (einsum/matmul/softmax), so it is exported decomposed")

    wsha = weights_sha256(module)
    meta = {
        "qcexport.attention": form,
        "qcexport.opset": str(opset),
        "qcexport.torch": torch.__version__,
        "qcexport.onnx": onnx.__version__,
        "qcexport.weights_sha256": wsha,
        **{f"qcexport.{k}": v if isinstance(v, str) else json.dumps(v)
           for k, v in (metadata or {}).items()},
    }
    model = stage("check", _check, model, input_axes, meta)

    if verify_inputs is None:
        verify_inputs = [("export_shape", resample(example_inputs, {}, seed=1)),
                         ("other_shape", resample(example_inputs, input_axes, seed=2))]
    records = stage("verify", _verify, model, module, verify_inputs, output_names)
    failed = [r for r in records if not r.passed]
    if failed:
        lines = "; ".join(f"{r.case}/{r.output}: max abs {r.max_abs:.3g}, cosine "
                          f"{r.cosine:.6f} ({r.message or r.tolerance})" for r in failed)
        raise UserError(
            f"the exported model does not match PyTorch eager: {lines}",
            stage="verify",
            hint="try --attention decomposed to tell a fused-kernel issue from an export issue; "
            "nothing was written",
        )

    path = out_dir / MODEL_FILE
    manifest = {
        "format": 1,
        **(dict(metadata) if metadata else {}),
        "precision": "fp32",
        "target": target,
        "attention": form,
        "opset": opset,
        "model": MODEL_FILE,
        "weights_sha256": wsha,
        "inputs": _io_spec(model.graph.input),
        "outputs": _io_spec(model.graph.output),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
        "fused_attention": {"form": form, "expected": expected_fused, "found": found},
        "verification": [dataclasses.asdict(r) for r in records],
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "warnings": warnings,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    start = time.perf_counter()
    try:
        save_model_and_manifest(model, path, out_dir / MANIFEST_FILE, manifest)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror or exc}", stage="save",
                        hint="free space or choose another -o; the previous model, if any, is "
                        "untouched") from exc
    timings["save"] = time.perf_counter() - start
    if on_stage:
        on_stage("save", timings["save"], str(path))
    return ConvertResult(path, manifest, form, opset, expected_fused, found, records, timings,
                         warnings)


def _default_output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _simplify(model: onnx.ModelProto, warnings: list[str]) -> onnx.ModelProto:
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
    except Exception as exc:  # onnxsim fails in many ways on unusual graphs; keep the original
        warnings.append(f"onnxsim failed ({type(exc).__name__}: {str(exc)[:200]}); "
                        "kept the unsimplified graph")
        return model
    if not ok:
        warnings.append("onnxsim could not validate its result; kept the unsimplified graph")
        return model
    restore_node_metadata(model, simplified)
    return simplified


def restore_node_metadata(original: onnx.ModelProto, simplified: onnx.ModelProto) -> None:
    """Give the simplified graph's nodes back the PyTorch module names onnxsim drops.

    The exporter records, per node, the module that produced it (``metadata_props``); the
    per-op profile and module exclusion in quantization need it. A node keeps the metadata of
    the original node that produced the same output; a node onnxsim made up (a Gemm fused from
    MatMul+Add, its Reshapes) takes it from its neighbours in the chain.
    """
    from qcexport.export.lowering import iter_graphs

    by_output = {o: list(n.metadata_props) for g in iter_graphs(original.graph)
                 for n in g.node for o in n.output if n.metadata_props}
    pending = []
    for graph in iter_graphs(simplified.graph):
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
        for graph in iter_graphs(simplified.graph):
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


def _check(model: onnx.ModelProto, input_axes: AxisMap, meta: Mapping[str, str]) -> onnx.ModelProto:
    check_dynamic_axes(model, input_axes)  # the simplifier must not have fixed one either
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, check_type=True)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "qcexport"
    return model


def _io_spec(values) -> list[dict[str, Any]]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim]
        specs.append({"name": v.name,
                      "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      "shape": shape})
    return specs


def resample(
    example: Mapping[str, torch.Tensor], resize_axes: AxisMap, seed: int
) -> dict[str, torch.Tensor]:
    """Fresh inputs like ``example``; every axis named in ``resize_axes`` grows.

    Floats are standard normal; integers are drawn from the example's own range (token ids
    stay valid ids) and 0-d integers (counts such as m) are kept; booleans are all True, since
    a random mask could hide every key.
    """
    g = torch.Generator().manual_seed(seed)
    new_size: dict[str, int] = {}
    for name, axes in resize_axes.items():
        for axis, label in axes.items():
            old = example[name].shape[axis]
            new_size.setdefault(label, old + (1 if label == "batch" else max(3, old // 2)))
    out = {}
    for name, t in example.items():
        shape = list(t.shape)
        for axis, label in resize_axes.get(name, {}).items():
            shape[axis] = new_size[label]
        if t.dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=g).to(t.dtype)
        elif t.dtype == torch.bool:
            out[name] = torch.ones(shape, dtype=torch.bool)
        elif t.dim() == 0:
            out[name] = t.clone()
        else:
            low, high = int(t.min()), int(t.max()) + 1
            out[name] = torch.randint(low, max(high, low + 1), shape, generator=g).to(t.dtype)
    return out


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _verify(model, module, verify_inputs, output_names) -> list[VerifyRecord]:
    from qcrun.adapters import open_adapter

    policy = TolerancePolicy()
    records = []
    with tempfile.TemporaryDirectory(prefix="qcexport-verify-") as tmp:
        path = Path(tmp) / MODEL_FILE
        save_model_atomic(model, path)
        with open_adapter(path, VERIFY_TARGET) as session:
            for case, inputs in verify_inputs:
                expected = eager_outputs(module, inputs)
                actual = session.run({k: v.numpy() for k, v in inputs.items()})
                for name, ref in zip(output_names, expected, strict=True):
                    tol = policy.resolve("fp32", VERIFY_TARGET, name)
                    got = actual[name]
                    cmp = compare(got, ref.numpy(), tol)
                    m = cmp.metrics
                    records.append(VerifyRecord(
                        case=case, output=name, shape=list(np.shape(got)),
                        max_abs=_num(m.max_abs), cosine=_num(m.cosine),
                        tolerance=tol.describe(), passed=cmp.passed, message=cmp.reason or "",
                    ))
    return records

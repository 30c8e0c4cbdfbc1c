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
import gc
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

from qcexport.export import save
from qcexport.export.lowering import (
    FORMS,
    check_model,
    downgrade_to_opset17,
    fused_attention_count,
    to_ort_attention,
)
from qcexport.export.outputs import (
    flat_module,
    named_outputs,
    plan_outputs,
    require_tensors,
    split_inputs,
)
from qcexport.export.save import prepare_output_dir, save_model_and_manifest
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


def weights_sha256(module: nn.Module) -> str:
    """sha256 over the state dict (sorted names, dtype, shape, bytes): identifies the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def eager_outputs(module: nn.Module, inputs: Mapping[str, Any]) -> list[torch.Tensor]:
    """Every tensor leaf of ``module(**inputs)`` in eager mode, in output order (see
    ``qcexport.export.outputs``: pytree order, None dropped)."""
    return list(named_outputs(module, inputs).values())


def _eager(module: nn.Module, inputs: Mapping[str, Any]):
    """(what the module returned, its named tensor leaves); no tensor at all is a UserError."""
    with torch.no_grad():
        returned = module(**inputs)
    return returned, require_tensors(returned)


def _flat(module: nn.Module, returned, tensors, constants, plan) -> nn.Module:
    """The module the exporter and the verifier call: the module itself when it already takes
    only tensors and returns the planned tensors in order, else :func:`flat_module`."""
    plain = isinstance(returned, torch.Tensor) or (
        isinstance(returned, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in returned)
        and type(returned) in (tuple, list))
    if plain and not constants and plan.leaves == plan.available:
        return module
    return flat_module(module, list(tensors), constants, plan.leaves)


def _verify_feed(case: str, inputs: Mapping[str, Any], tensors, constants) -> dict:
    """The tensor inputs of a verification case; its other arguments must be the constants."""
    differs = [k for k, v in inputs.items() if not isinstance(v, torch.Tensor)
               and (k not in constants or constants[k] != v)]
    if differs:
        raise UserError(
            f"verification case {case!r} sets non-tensor arguments {differs} to other values "
            f"than the export ({ {k: constants.get(k) for k in differs} }); they are fixed in the "
            "graph",
            stage="verify",
            hint="export once per value of such an argument",
        )
    feed = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if set(feed) != set(tensors):
        raise UserError(f"verification case {case!r} has inputs {sorted(feed)}, the model "
                        f"{sorted(tensors)}", stage="verify", hint="give every tensor input")
    return feed


#: The example size an axis of size 0 or 1 is exported at.
WIDENED_SIZE = 2


def widen_trivial_axes(
    tensors: Mapping[str, torch.Tensor], input_axes: AxisMap
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Example inputs with every dynamic axis of size 0 or 1 grown to ``WIDENED_SIZE``.

    torch.export specialises an axis whose example size is 0 or 1 even when it is declared
    dynamic. Size 1 is repeated (token ids, masks and values stay what they were); size 0 gets
    fresh values (random floats, true masks, zero ints). Every input that shares the axis name
    is grown alike. Returns (inputs, {axis name: (example size, export size)}).
    """
    sizes: dict[str, dict[int, list[str]]] = {}
    for name, axes in input_axes.items():
        for axis, label in axes.items():
            size = tensors[name].shape[axis]
            sizes.setdefault(label, {}).setdefault(size, []).append(f"{name}[{axis}]")
    trivial = {label: next(iter(by_size)) for label, by_size in sizes.items()
               if set(by_size) & {0, 1}}
    mixed = {label: by_size for label, by_size in sizes.items()
             if label in trivial and len(by_size) > 1}
    if mixed:
        label, by_size = next(iter(mixed.items()))
        seen = "; ".join(f"{size} in {', '.join(where)}" for size, where in by_size.items())
        raise UserError(
            f"cannot export the dynamic axis {label!r} at a larger example size: the example "
            f"inputs give it different sizes ({seen})",
            stage="export",
            hint=f"make the example inputs agree on {label!r}, at a size of 2 or more "
            "(torch.export fixes an axis whose example size is 0 or 1)",
        )
    if not trivial:
        return dict(tensors), {}
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in tensors.items():
        for axis, label in input_axes.get(name, {}).items():
            if label not in trivial:
                continue
            if t.shape[axis] == 1:
                t = t.repeat_interleave(WIDENED_SIZE, dim=axis)
            else:
                shape = list(t.shape)
                shape[axis] = WIDENED_SIZE
                t = (torch.randn(shape, generator=g).to(t.dtype) if t.dtype.is_floating_point
                     else torch.ones(shape, dtype=t.dtype) if t.dtype == torch.bool
                     else torch.zeros(shape, dtype=t.dtype))
        out[name] = t
    return out, {label: (size, WIDENED_SIZE) for label, size in trivial.items()}


@dataclass
class Owned:
    """A module handed to :func:`convert` for good (``convert(Owned(module), ...)``, the
    caller keeping no other reference): convert drops it once it is exported and its eager
    references are taken, so its weights are not held through the graph stages. With a
    module the caller keeps, convert's peak memory is that module's size higher."""

    module: nn.Module | None


def convert(module: nn.Module | Owned, example_inputs, dynamic_axes=None,
            **kwargs) -> ConvertResult:
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
    module: nn.Module | Owned,
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
    constants: Mapping[str, Any] | None = None,
    input_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> ConvertResult:
    """Export ``module(**example_inputs)`` to ``output_dir/model.onnx`` and verify it.

    ``dynamic_axes`` is ``{input or output name: {axis: symbolic name}}``. Non-tensor
    values in ``example_inputs`` (and ``constants``) are fixed at export and recorded in the
    manifest's ``constants``. The module may return any pytree of tensors (``ModelOutput``,
    dicts, dataclasses, nested tuples); its outputs are named by their paths
    (``qcexport.export.outputs``) and ``output_names`` keeps a subset of them.
    ``verify_inputs`` are (case name, inputs) pairs to compare on; by default two fresh
    random sets are made from the example inputs, one at the export shape and one with every
    dynamic axis resized.
    """
    dynamic_axes = dict(dynamic_axes or {})
    form = resolve_attention(target, attention)
    opset = resolve_opset(form, opset, target)
    out_dir = prepare_output_dir(output_dir)
    # the model between stages: its weights in files here, never twice in memory
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".qcexport-stage-") as tmp:
        staging = Path(tmp)
        owned = module if isinstance(module, Owned) else None
        if owned:
            module, owned.module = owned.module, None
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
            finally:  # a stage that runs twice (eager) reports its total
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
                if on_stage:
                    on_stage(name, timings[name], "")

        tensors, constants = split_inputs(example_inputs, constants)
        try:
            returned, flat_leaves = stage("eager", _eager, module, {**tensors, **constants})
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"the module's forward fails on the example inputs: {type(exc).__name__}: {exc}",
                stage="eager",
                hint="fix the module or the example inputs; module(**example_inputs) must run",
            ) from exc
        plan = plan_outputs(flat_leaves, output_names)
        output_names = plan.names
        if set(dynamic_axes) & set(constants):
            raise UserError(f"dynamic_axes names constant arguments "
                            f"{sorted(set(dynamic_axes) & set(constants))}", stage="export",
                            hint="only tensor inputs and outputs have axes")
        input_axes = {k: v for k, v in dynamic_axes.items() if k in tensors}
        unknown = sorted(set(dynamic_axes) - set(tensors) - set(output_names))
        if unknown:
            raise UserError(f"dynamic_axes names {unknown}, which are neither inputs "
                            f"{list(tensors)} nor outputs {output_names}",
                            stage="export", hint="use the module's input names")
        export_example, widened = widen_trivial_axes(tensors, input_axes)
        if widened:
            warnings.append(
                "exported at " + ", ".join(f"{label}={new} (example {old})"
                                           for label, (old, new) in widened.items())
                + ": torch.export fixes a dynamic axis whose example size is 0 or 1; the model is "
                "still verified at the example size")

        # Everything PyTorch has to give is taken before export: the weights' hash and the
        # eager reference of every verification case. Then an owned module can go, and the
        # graph stages never hold the weights twice.
        if verify_inputs is None:
            verify_inputs = [("export_shape", resample(tensors, {}, seed=1)),
                             ("other_shape", resample(tensors, input_axes, seed=2))]
        verify_inputs = [(case, _verify_feed(case, inputs, tensors, constants))
                         for case, inputs in verify_inputs]
        flat = _flat(module, returned, tensors, constants, plan)
        references = stage("eager", _references, flat, verify_inputs)
        wsha = weights_sha256(module)

        export_opset = 23 if form in ("onnx", "ort") else 18
        set_fused(module, form != "decomposed")
        try:
            exported = stage("export", export_module, flat, export_example, output_names,
                             input_axes, export_opset, staging)
        except UserError as exc:
            if widened:
                exc.args = (f"{exc.args[0]} (the example was exported at "
                            + ", ".join(f"{label}={new}" for label, (_, new) in widened.items())
                            + " because torch.export fixes an axis of example size 0 or 1; a module "
                            "that only works at that size cannot have the axis dynamic)",
                            *exc.args[1:])
            raise
        finally:
            set_fused(module, True)
        del flat, returned
        if owned:  # the caller kept no reference: free the weights before the graph stages
            del module
            gc.collect()
        model, expected = exported.model, exported.sdpa_calls
        for old, new in exported.renamed.items():
            warnings.append(f"the graph value {old!r} (a parameter or an internal value) was "
                            f"renamed {new!r} so that the output can keep the name {old!r}")
        if form == "decomposed":
            expected_fused = 0
        else:
            expected_fused = expected

        model = stage("simplify", _simplify, model, warnings, staging)
        if form == "ort":
            model = stage("lower", to_ort_attention, model)
        elif form == "decomposed" and opset == 17:
            model = stage("lower", downgrade_to_opset17, model, staging)
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

        meta = {
            "qcexport.attention": form,
            "qcexport.opset": str(opset),
            "qcexport.torch": torch.__version__,
            "qcexport.onnx": onnx.__version__,
            "qcexport.weights_sha256": wsha,
            **{f"qcexport.{k}": v if isinstance(v, str) else json.dumps(v)
               for k, v in (metadata or {}).items()},
        }
        model = stage("check", _check, model, input_axes, meta, staging)
        records = stage("verify", _verify, model, staging, references, verify_inputs,
                        output_names)
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
            "inputs": _io_spec(model.graph.input, _input_ranges(model, input_ranges)),
            "outputs": _io_spec(model.graph.output),
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in dynamic_axes.items()},
            "output_structure": {**plan.structure(), "renamed_values": exported.renamed},
            "constants": constants,
            "export_sizes": {label: new for label, (_, new) in widened.items()},
            "fused_attention": {"form": form, "expected": expected_fused, "found": found,
                                "sdpa_calls": expected},
            "verification": [dataclasses.asdict(r) for r in records],
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "warnings": warnings,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
        }
        start = time.perf_counter()
        try:
            save_model_and_manifest(model, path, out_dir / MANIFEST_FILE, manifest,
                                    base_dir=staging)
        except OSError as exc:
            raise UserError(f"could not write {path}: {exc.strerror or exc}", stage="save",
                            hint="free space or choose another -o; the previous model, if any, is "
                            "untouched") from exc
        timings["save"] = time.perf_counter() - start
        if on_stage:
            on_stage("save", timings["save"], str(path))
        return ConvertResult(path, manifest, form, opset, expected_fused, found, records, timings,
                             warnings)


def _simplify(model: onnx.ModelProto, warnings: list[str], staging: Path) -> onnx.ModelProto:
    """onnxsim on the staged model, from disk: its C++ core reads the weights itself (it
    needs them to fold constants and fuse MatMul+Add into Gemm) and Python holds them only
    while its result is staged again."""
    if save.is_large(model):
        warnings.append("the model is over the 2 GB protobuf limit, which onnxsim cannot read: "
                        "kept the exporter's (already optimised) graph")
        return model
    source, target = staging / "to-simplify.onnx", staging / "simplified.onnx"
    save.write_staged(model, source)
    try:
        import onnxsim

        simplified, ok = onnxsim.simplify(str(source), output_path=str(target))
    except Exception as exc:  # onnxsim fails in many ways on unusual graphs; keep the original
        warnings.append(f"onnxsim failed ({type(exc).__name__}: {str(exc)[:200]}); "
                        "kept the unsimplified graph")
        return model
    finally:
        source.unlink(missing_ok=True)
    if not ok:
        warnings.append("onnxsim could not validate its result; kept the unsimplified graph")
        return model
    restore_node_metadata(model, simplified)
    staged = save.externalize(simplified, staging, "simplified.onnx.data")
    del simplified
    target.unlink(missing_ok=True)
    return staged


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


def _check(model: onnx.ModelProto, input_axes: AxisMap, meta: Mapping[str, str],
           staging: Path) -> onnx.ModelProto:
    check_dynamic_axes(model, input_axes)  # the simplifier must not have fixed one either
    check_model(model, staging)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "qcexport"
    return model


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
    from qcexport.export.lowering import iter_graphs

    integer = {v.name for v in model.graph.input
               if onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).kind in "iu"}
    tables = {t.name: list(t.dims) for g in iter_graphs(model.graph) for t in g.initializer}
    ranges: dict[str, tuple[int, int]] = {}
    for graph in iter_graphs(model.graph):
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


def _references(module: nn.Module, verify_inputs) -> dict[str, list[torch.Tensor]]:
    """PyTorch eager outputs of every verification case, in output order."""
    return {case: eager_outputs(module, inputs) for case, inputs in verify_inputs}


def _verify(model, staging: Path, references, verify_inputs, output_names) -> list[VerifyRecord]:
    """Run the staged model in onnxruntime (through qcrun) on every case and compare with its
    eager reference under the fp32 policy."""
    from qcrun.adapters import open_adapter

    policy = TolerancePolicy()
    records = []
    path = save.write_staged(model, staging / MODEL_FILE)
    with open_adapter(path, VERIFY_TARGET) as session:
        for case, inputs in verify_inputs:
            actual = session.run({k: v.numpy() for k, v in inputs.items()})
            for name, ref in zip(output_names, references[case], strict=True):
                tol = policy.resolve("fp32", VERIFY_TARGET, name)
                got = actual[name]
                cmp = compare(got, ref.numpy(), tol)
                m = cmp.metrics
                records.append(VerifyRecord(
                    case=case, output=name, shape=list(np.shape(got)),
                    max_abs=_num(m.max_abs), cosine=_num(m.cosine),
                    tolerance=tol.describe(), passed=cmp.passed, message=cmp.reason or "",
                ))
    path.unlink()
    return records

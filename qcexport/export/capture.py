"""The capture pass: a PyTorch module -> a staged ONNX graph, and everything PyTorch has to
give the later passes (eager references, the weights' hash), taken before the module goes.

    captured = capture(Owned(module), example_inputs, dynamic_axes, form=..., base_dir=...)

The module runs in eager mode once on the example inputs (its outputs name the graph
outputs) and once per verification case (the references ``verify`` compares with); then it
is exported (``torch_export``) with its weights staged in ``base_dir``. A module handed over
as :class:`Owned` is not referenced after this pass, so its weights are freed before the
graph passes run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from qcrun.errors import UserError
from torch import nn

from qcexport.export.outputs import (
    OutputPlan,
    bind_inputs,
    flat_module,
    named_outputs,
    plan_outputs,
    require_tensors,
    split_inputs,
)
from qcexport.export.torch_export import AxisMap, ExportedGraph, export_module
from qcexport.mechanisms.attention import set_fused
from qcexport.mechanisms.registry import AxisRoles
from qcexport.stages import StageRunner

Cases = list[tuple[str, dict[str, torch.Tensor]]]


@dataclass
class Owned:
    """A module handed to :func:`convert` for good (``convert(Owned(module), ...)``, the
    caller keeping no other reference): convert drops it once it is exported and its eager
    references are taken, so its weights are not held through the graph stages. With a
    module the caller keeps, convert's peak memory is that module's size higher."""

    module: nn.Module | None


@dataclass
class Captured:
    """The exported graph (staged) and what the module said before it went."""

    exported: ExportedGraph
    plan: OutputPlan
    tensors: dict[str, torch.Tensor]  # the example's tensor inputs
    constants: dict[str, Any]  # its other arguments, fixed in the graph
    input_axes: dict[str, Mapping[int, str]]
    widened: dict[str, tuple[int, int]]  # axis name -> (example size, export size)
    cases: Cases  # the verification cases' tensor inputs
    references: dict[str, list[torch.Tensor]]  # eager outputs per case, in output order
    weights_sha256: str
    warnings: list[str] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return self.plan.names


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


def resample(
    example: Mapping[str, torch.Tensor], resize_axes: AxisMap, seed: int,
    roles: AxisRoles | None = None,
) -> dict[str, torch.Tensor]:
    """Fresh inputs like ``example``; every axis named in ``resize_axes`` grows: the batch
    axis (``roles.batch``; default: the registry's default roles) by one, any other by half
    (at least 3).

    Floats are standard normal; integers are drawn from the example's own range (token ids
    stay valid ids) and 0-d integers (counts such as m) are kept; booleans are all True, since
    a random mask could hide every key.
    """
    g = torch.Generator().manual_seed(seed)
    batch = (roles or AxisRoles()).batch
    new_size: dict[str, int] = {}
    for name, axes in resize_axes.items():
        for axis, label in axes.items():
            old = example[name].shape[axis]
            new_size.setdefault(label, old + (1 if label == batch else max(3, old // 2)))
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


def _references(module: nn.Module, verify_inputs, example: Mapping[str, torch.Tensor],
                input_axes: Mapping[str, Mapping[int, str]]) -> dict[str, list[torch.Tensor]]:
    """PyTorch eager outputs of every verification case, in output order. A module that
    fails at sizes other than the example's fixes those axes itself: a UserError says which."""
    references = {}
    for case, inputs in verify_inputs:
        try:
            references[case] = eager_outputs(module, inputs)
        except UserError:
            raise
        except Exception as exc:
            raise _fails_at_other_sizes(module, case, inputs, example, input_axes, exc) from exc
    return references


def _fails_at_other_sizes(module, case: str, inputs, example, input_axes,
                          exc: Exception) -> UserError:
    """The error for a verification case the module itself cannot run. Each axis that case
    resized is tried alone, so the message names the axes the module fixes."""
    sizes = {label: (inputs[name].shape[axis], tensor.shape[axis])
             for name, tensor in example.items()
             for axis, label in input_axes.get(name, {}).items()
             if name in inputs and inputs[name].shape[axis] != tensor.shape[axis]}
    culprits = []
    for label in sizes:
        alone = {n: {a: lb for a, lb in axes.items() if lb == label}
                 for n, axes in input_axes.items()}
        try:
            eager_outputs(module, resample(example, alone, seed=3))
        except Exception:
            culprits.append(label)
    changed = [f"{label}={sizes[label][0]} (example {sizes[label][1]})"
               for label in (culprits or sizes)]
    if not changed:
        return UserError(
            f"the module's forward fails on verification case {case!r}: "
            f"{type(exc).__name__}: {exc}", stage="eager",
            hint="fix the module or the verification inputs")
    return UserError(
        f"axis fixed by the module: its forward fails at {', '.join(changed)}, sizes declared "
        f"dynamic: {type(exc).__name__}: {exc}", stage="eager",
        hint="the module only accepts the example's size on that axis (e.g. a learned "
             "position table): remove the axis from dynamic_axes, or make the module accept "
             "other sizes (e.g. interpolate the positions)")


def _input_axes(dynamic_axes: Mapping[str, Mapping[int, str]], tensors, constants,
                output_names: list[str]) -> dict[str, Mapping[int, str]]:
    """The dynamic axes of the tensor inputs; a name that is neither an input nor an output
    (or is a constant argument) is a UserError."""
    if set(dynamic_axes) & set(constants):
        raise UserError(f"dynamic_axes names constant arguments "
                        f"{sorted(set(dynamic_axes) & set(constants))}", stage="export",
                        hint="only tensor inputs and outputs have axes")
    unknown = sorted(set(dynamic_axes) - set(tensors) - set(output_names))
    if unknown:
        raise UserError(f"dynamic_axes names {unknown}, which are neither inputs "
                        f"{list(tensors)} nor outputs {output_names}",
                        stage="export", hint="use the module's input names")
    return {k: v for k, v in dynamic_axes.items() if k in tensors}


def _run_eager(module: nn.Module, inputs: Mapping[str, Any]):
    """``_eager`` with any failure of the module's forward as a UserError."""
    try:
        return _eager(module, inputs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"the module's forward fails on the example inputs: {type(exc).__name__}: {exc}",
            stage="eager",
            hint="fix the module or the example inputs; module(**example_inputs) must run",
        ) from exc


def _widened_note(widened: Mapping[str, tuple[int, int]]) -> str:
    return ("exported at " + ", ".join(f"{label}={new} (example {old})"
                                       for label, (old, new) in widened.items())
            + ": torch.export fixes a dynamic axis whose example size is 0 or 1; the model is "
            "still verified at the example size")


def _export(flat: nn.Module, module: nn.Module, example, output_names, input_axes, form: str,
            widened, base_dir: Path) -> ExportedGraph:
    """``export_module`` at the opset of ``form``, the module's attention fused unless the
    form is decomposed."""
    opset = 23 if form in ("onnx", "ort") else 18
    set_fused(module, form != "decomposed")
    try:
        return export_module(flat, example, output_names, input_axes, opset, base_dir)
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


def capture(
    module: nn.Module | Owned,
    example_inputs: Mapping[str, Any],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    *,
    form: str,
    base_dir: Path,
    output_names: Sequence[str] | None = None,
    constants: Mapping[str, Any] | None = None,
    verify_inputs: Sequence[tuple[str, Mapping[str, Any]]] | None = None,
    stages: StageRunner | None = None,
) -> Captured:
    """Run ``module`` eagerly (example and verification cases), then export it in attention
    ``form`` with its weights staged in ``base_dir``. An :class:`Owned` module is released
    here: nothing returned refers to it. By default the verification cases are two fresh
    random sets made from the example inputs, one at the export shape and one with every
    dynamic axis resized."""
    stages = stages or StageRunner()
    if isinstance(module, Owned):
        owned, module = module, module.module
        owned.module = None
        del owned
    module = module.eval()
    dynamic_axes = dict(dynamic_axes or {})
    tensors, constants = split_inputs(bind_inputs(module, example_inputs), constants)
    returned, leaves = stages("eager", _run_eager, module, {**tensors, **constants})
    plan = plan_outputs(leaves, output_names)
    input_axes = _input_axes(dynamic_axes, tensors, constants, plan.names)
    example, widened = widen_trivial_axes(tensors, input_axes)
    warnings = [_widened_note(widened)] if widened else []
    # Everything PyTorch has to give is taken before export: the weights' hash and the eager
    # reference of every verification case. Then an owned module can go, and the graph
    # passes never hold the weights twice.
    if verify_inputs is None:
        verify_inputs = [("export_shape", resample(tensors, {}, seed=1)),
                         ("other_shape", resample(tensors, input_axes, seed=2))]
    cases = [(case, _verify_feed(case, inputs, tensors, constants))
             for case, inputs in verify_inputs]
    flat = _flat(module, returned, tensors, constants, plan)
    del returned
    references = stages("eager", _references, flat, cases, tensors, input_axes)
    wsha = weights_sha256(module)
    exported = stages("export", _export, flat, module, example, plan.names, input_axes, form,
                      widened, base_dir)
    for old, new in exported.renamed.items():
        warnings.append(f"the graph value {old!r} (a parameter or an internal value) was "
                        f"renamed {new!r} so that the output can keep the name {old!r}")
    return Captured(exported, plan, tensors, constants, input_axes, widened, cases,
                    references, wsha, warnings)

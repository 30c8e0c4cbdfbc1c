"""The export stage: a PyTorch module and example inputs -> an ONNX model in memory.

Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``). Dynamic axes become
``torch.export.Dim`` objects shared by name, so every input axis called "batch" is one symbol.
After export the graph's input shapes are read back: an axis that should be symbolic but came
out as a number was fixed silently by the exporter, which is an error here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Mapping

import onnx
import torch
from qcrun.errors import UserError
from torch import nn

AxisMap = Mapping[str, Mapping[int, str]]
# The exporter colours its messages for terminals; a UserError message is plain text.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _dynamic_shapes(input_names, example_inputs, dynamic_axes: AxisMap):
    dims: dict[str, torch.export.Dim] = {}
    shapes = {}
    for name in input_names:
        axes = dynamic_axes.get(name)
        if not axes:
            shapes[name] = None
            continue
        rank = example_inputs[name].dim()
        for axis in axes:
            if not -rank <= axis < rank:
                raise UserError(
                    f"dynamic axis {axis} of input {name!r} is out of range for rank {rank}",
                    stage="export",
                    hint="fix the dynamic_axes mapping ({input: {axis: name}})",
                )
        shapes[name] = {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in axes.items()}
    return shapes


def sdpa_count(program: torch.export.ExportedProgram) -> int:
    """Calls of scaled_dot_product_attention in the captured program, cond branches included.

    This is the number of fused attention nodes the module should give: every SDPA call
    becomes one ``Attention`` node.
    """
    count = 0
    for gm in program.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product" in str(node.target):
                count += 1
    return count


def export_module(
    module: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_names: list[str] | tuple[str, ...],
    dynamic_axes: AxisMap,
    opset: int,
) -> tuple[onnx.ModelProto, int, str]:
    """Export ``module`` called as ``module(**example_inputs)``.

    Returns (model, number of SDPA calls captured, exporter log). Raises UserError naming the
    axis when a dynamic axis was fixed and when capture fails.
    """
    input_names = list(example_inputs)
    shapes = _dynamic_shapes(input_names, example_inputs, dynamic_axes)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    torch_logger = logging.getLogger("torch")
    torch_logger.addHandler(handler)
    # The exporter warns about every optional op library it cannot find (torchvision...);
    # that goes to the log kept for failures, not to the user's terminal.
    onnx_logger = logging.getLogger("torch.onnx")
    onnx_level, onnx_propagate = onnx_logger.level, onnx_logger.propagate
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (),
                kwargs=dict(example_inputs),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=shapes,
                input_names=input_names,
                output_names=list(output_names),
                verbose=False,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many types; all mean "could not capture"
        raise _capture_error(exc, log.getvalue()) from exc
    finally:
        torch_logger.removeHandler(handler)
        onnx_logger.setLevel(onnx_level)
        onnx_logger.propagate = onnx_propagate
    model = program.model_proto
    check_dynamic_axes(model, dynamic_axes)
    return model, sdpa_count(program.exported_program), log.getvalue()


def _capture_error(exc: Exception, log: str) -> UserError:
    text = _ANSI.sub("", f"{type(exc).__name__}: {exc}")
    first = text.strip().splitlines()[0][:400]
    if "Constraints violated" in text or "specialized" in text or "marked as dynamic" in text:
        axis = next((line.strip() for line in text.splitlines() if "Dim(" in line or "L['" in line), "")
        return UserError(
            f"a dynamic axis was fixed during capture ({axis or first})",
            stage="export",
            hint="the module derives a size from this axis in a way the exporter specialises "
            "(e.g. torch.linspace(steps=n), Python ints from .shape used in control flow); "
            "build such values with torch.arange on the symbolic size, or drop the axis from "
            "dynamic_axes",
        )
    if "data-dependent" in text.lower() or "GuardOnDataDependentSymNode" in text:
        # The exporter's first line is boilerplate; the guard and the user's line say more.
        lines = [line.strip() for line in text.splitlines()]
        detail = next((re.sub(r"^<class '[^']*'>:\s*", "", line) for line in lines
                       if "data-dependent expression" in line), first)
        if "The following call raised this error:" in lines:
            at = lines.index("The following call raised this error:")
            detail += " at " + " ".join(line for line in lines[at + 1:at + 3] if line)
        return UserError(
            f"the module has data-dependent Python control flow that torch.export cannot "
            f"capture ({detail[:600]})",
            stage="export",
            hint="replace `if tensor...:` with torch.where / torch.cond, or compute both "
            "branches and select",
        )
    return UserError(
        f"torch.onnx.export could not capture the module: {first}",
        stage="export",
        hint="check that module(**example_inputs) runs in eager mode; rerun with "
        "TORCH_LOGS=+dynamic for the exporter's detail",
    )


def check_dynamic_axes(model: onnx.ModelProto, dynamic_axes: AxisMap) -> None:
    """Every axis named in ``dynamic_axes`` must be symbolic in the graph's inputs."""
    inputs = {i.name: i for i in model.graph.input}
    fixed = []
    for name, axes in dynamic_axes.items():
        if name not in inputs:
            continue  # an output or an input the exporter dropped as unused
        dims = inputs[name].type.tensor_type.shape.dim
        for axis, label in axes.items():
            dim = dims[axis]
            if dim.HasField("dim_value"):
                fixed.append(f"{name}[{axis}] ({label!r}) = {dim.dim_value}")
    if fixed:
        raise UserError(
            "axis fixed: the exporter turned dynamic axes into constants: " + ", ".join(fixed),
            stage="export",
            hint="the module derives something from that size that the exporter specialises "
            "(e.g. torch.linspace(steps=n) on the token count); build it with torch.arange on "
            "the symbolic size, or remove the axis from dynamic_axes",
        )

"""The export stage: a PyTorch module and example inputs -> a staged ONNX model.

Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``). The exporter's program
writes its weights straight to a data file in the staging directory and only the graph is
read back (``qcexport.export.save``: a staged model), so export never builds a second
in-memory copy of the weights. Dynamic axes become
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
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from qcrun.errors import UserError
from qcrun.graphs import all_graphs
from torch import nn

AxisMap = Mapping[str, Mapping[int, str]]
_PLACEHOLDER = "qcexport_output_"
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
    directory: Path,
) -> ExportedGraph:
    """Export ``module`` called as ``module(**example_inputs)``; it returns a tensor or a
    flat tuple of tensors, one per name in ``output_names``. The model is staged in
    ``directory`` (its weights in ``exported.onnx.data`` there).

    Raises UserError naming the axis when a dynamic axis was fixed and when capture fails.
    """
    input_names = list(example_inputs)
    shapes = _dynamic_shapes(input_names, example_inputs, dynamic_axes)
    # Placeholders first, the real names after: the exporter gives an output the name of a
    # parameter of the same name and writes an invalid graph ("Duplicate definition").
    placeholders = [f"{_PLACEHOLDER}{i}" for i in range(len(output_names))]
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
                output_names=placeholders,
                verbose=False,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many types; all mean "could not capture"
        raise _capture_error(exc, log.getvalue()) from exc
    finally:
        torch_logger.removeHandler(handler)
        onnx_logger.setLevel(onnx_level)
        onnx_logger.propagate = onnx_propagate
    sdpa_calls = sdpa_count(program.exported_program)
    path = Path(directory) / "exported.onnx"
    try:
        program.save(path, external_data=True)
    except OSError as exc:
        raise UserError(f"could not write the exported model to {directory}: "
                        f"{exc.strerror or exc}", stage="export",
                        hint="free disk space in the output directory (a conversion stages "
                        "the weights there), or choose another -o") from exc
    _release_weights(program.model.graph)
    del program
    model = onnx.load(str(path), load_external_data=False)
    if len(model.graph.output) != len(output_names):
        raise UserError(
            f"the exported graph has {len(model.graph.output)} outputs, not the "
            f"{len(output_names)} planned ({', '.join(output_names)})",
            stage="export",
            hint="return only tensors from forward (non-tensor outputs are dropped by qcexport "
            "before export; this is a bug if it happens)",
        )
    renamed = name_outputs(model, output_names)
    check_dynamic_axes(model, dynamic_axes)
    return ExportedGraph(model, sdpa_calls, log.getvalue(), renamed)


def _release_weights(graph) -> None:
    """Cut the exporter's graph off from the module's weights.

    onnxscript's rewrite rules keep the last graph they matched (``SimplePatternMatcher``
    objects at module level), and onnx_ir's graph inputs keep a counter of every value that
    ever was an input, the module's parameters among them (they start as inputs). Each such
    value's ``const_value`` wraps a parameter: without this, a module handed to convert
    (``Owned``) keeps its weights in memory after export, through every later stage.
    """
    values = set(graph.initializers.values())
    values.update(getattr(graph.inputs, "_ref_counter", ()))  # onnx_ir internals, if present
    for value in values:
        value.const_value = None


@dataclass
class ExportedGraph:
    model: onnx.ModelProto  # staged: its weights are external, in the export's directory
    sdpa_calls: int  # scaled_dot_product_attention calls captured (cond branches included)
    log: str
    renamed: dict[str, str]  # a value renamed to free an output name: old name -> new name


def _all_graph_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for g in all_graphs(model.graph):
        names |= {i.name for i in g.input} | {i.name for i in g.initializer}
        names |= {o for n in g.node for o in n.output}
    return names


def rename_value(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename value ``old`` to ``new`` everywhere: producers, consumers (subgraphs too, which
    may read outer values), initializers, graph inputs/outputs and value_info."""
    for g in all_graphs(model.graph):
        for node in g.node:
            for seq in (node.input, node.output):
                for i, name in enumerate(seq):
                    if name == old:
                        seq[i] = new
        for vi in [*g.input, *g.output, *g.value_info, *g.initializer]:
            if vi.name == old:
                vi.name = new


def name_outputs(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """Give the graph outputs their names. An internal value (a parameter's initializer, a
    node's output) that already has one of the names is renamed to ``<name>.param`` (or a
    numbered variant) first, so the output keeps the name the user asked for; returns those
    renames. A name that is a graph input cannot be freed: that is an error."""
    inputs = {i.name for i in model.graph.input}
    clash = sorted(set(names) & inputs)
    if clash:
        raise UserError(
            f"outputs {clash} have the names of graph inputs",
            stage="export",
            hint="choose other output names (output_names=[...] / --outputs), or rename the "
            "module's inputs",
        )
    taken = _all_graph_names(model)
    renamed: dict[str, str] = {}
    for name in names:
        if name in taken:
            fresh, n = f"{name}.param", 1
            while fresh in taken:
                n += 1
                fresh = f"{name}.param{n}"
            rename_value(model, name, fresh)
            taken.add(fresh)
            renamed[name] = fresh
    for out, name in zip(list(model.graph.output), names, strict=True):
        if out.name != name:
            rename_value(model, out.name, name)
    return renamed


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
    cause, node = _root_cause(text)
    if cause:
        where = f" (while translating {node})" if node else ""
        sdpa = "scaled_dot_product_attention" in (node or "") or "4D query" in cause
        return UserError(
            f"torch.onnx.export could not convert the module: {cause}{where}",
            stage="export",
            hint="pass 4-D q/k/v (batch, heads, tokens, head_dim) to "
            "scaled_dot_product_attention, or compute attention with matmul/softmax"
            if sdpa else "rewrite the operation the exporter cannot translate, or export with "
            "torch.onnx.export(..., report=True) for the full report",
        )
    return UserError(
        f"torch.onnx.export could not capture the module: {first}",
        stage="export",
        hint="check that module(**example_inputs) runs in eager mode; rerun with "
        "TORCH_LOGS=+dynamic for the exporter's detail",
    )


def _root_cause(text: str) -> tuple[str, str]:
    """The innermost exception of the exporter's "## Exception summary" (its first line says
    only which step failed, then "Next steps:") and the node it was translating."""
    if "## Exception summary" not in text:
        return "", ""
    summary = text.split("## Exception summary", 1)[1]
    causes = re.findall(r"^<class '(?:[\w.]*\.)?(\w+)'>: (.+)$", summary, flags=re.MULTILINE)
    if not causes:
        return "", ""
    kind, message = causes[0]
    node = re.search(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]", summary)
    return f"{kind}: {message.strip()[:400]}", node.group(1) if node else ""


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

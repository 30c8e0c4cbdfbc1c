"""PyTorch module boundaries in an ONNX graph, from the exporter's name-scope metadata.

The dynamo exporter records, on every node, the modules it was traced in
(``pkg.torch.onnx.name_scopes``); qcexport keeps that metadata through simplification and
lowering. A module's *boundary tensors* are the values its nodes produce and something outside
it reads (or the graph returns): the module's output is one of them. Which one is decided by
the caller (by shape against the reference, see :mod:`qcrun.localize`).

Inside ``If`` branches the exporter records scopes relative to the branch function, and these
are empty for a module called from ``torch.cond``: such a node's module is read from the
parameters it uses (the ``%p_layers_0_attn_to_q_weight`` of its traced FX node, or a bias
initializer such as ``layers.0.attn.to_q.bias``), and nodes with neither take the common module
of their branch. To compare the modules inside the branch a case took, the graph is
*specialised*: each ``If`` whose condition is known is replaced by the nodes of the branch
taken, so their values become ordinary tensors of the main graph (:func:`specialise`).

Torch-free: the device localises with this module too (``qcrun verify --localize``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qcrun.errors import UserError, import_engine
from qcrun.graphs import walk_graphs
from qcrun.profiling.provenance import parse_scopes

_PARAM = re.compile(r"%p_([A-Za-z0-9_]+)")
_FLOAT_TYPES = (1, 10, 11, 16)
_PROJECTIONS = ("Gemm", "MatMul", "Add")  # float, float16, double, bfloat16


@dataclass(frozen=True)
class Candidate:
    """A tensor leaving ``module``: produced inside it, read outside it (or a graph output)."""

    module: str
    tensor: str
    position: int  # index of its producer in the (specialised) main graph: execution order


def _meta(node) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def known_modules(model) -> set[str]:
    """Module paths the graph names: absolute scopes and the prefixes of initializer names
    (parameters keep their dotted names, e.g. ``layers.0.attn.to_q.bias``)."""
    known: set[str] = set()
    for graph, _ in walk_graphs(model.graph):
        for node in graph.node:
            parsed = parse_scopes(_meta(node))
            if parsed and parsed[1]:
                known.update(parsed[0])
        for init in graph.initializer:
            parts = init.name.split(".")
            known.update(".".join(parts[:i]) for i in range(1, len(parts)))
    known.discard("")
    return known


def _module_from_params(node, flat: Mapping[str, str]) -> str | None:
    """The deepest known module whose parameters the node reads (traced FX node, or an
    initializer input with a dotted name)."""
    found = []
    for name in _PARAM.findall(_meta(node).get("pkg.torch.onnx.fx_node", "")):
        keys = [k for k in flat if name.startswith(k + "_")]
        if keys:
            found.append(flat[max(keys, key=len)])
    for name in node.input:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module in flat.values():
            found.append(module)
    return max(found, key=len) if found else None


def _common(paths: Iterable[str]) -> str:
    split = [p.split(".") for p in paths]
    if not split:
        return ""
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _deeper(recorded: str, node, flat: Mapping[str, str]) -> str:
    """The recorded scope, refined by the parameter the node reads: a simplifier's new node
    (Reshape-Gemm-Reshape) takes its metadata from a neighbour, so a projection's Gemm may
    carry its parent's or a sibling's scope but reads its own module's bias. Only inside the
    recorded module (or, for a projection, its parent): exporters merge equal constants, so
    a LayerNorm may read another layer's (equal) weight."""
    owner = _module_from_params(node, flat)
    if not owner or not recorded:
        return owner or recorded
    parent = recorded.rsplit(".", 1)[0] if node.op_type in _PROJECTIONS else recorded
    return owner if owner.startswith(parent + ".") else recorded


def node_key(node) -> str:
    """A node's identity across subgraphs: its first output (value names are unique in the
    model, node names are not: sibling branches repeat them)."""
    return next((o for o in node.output if o), node.name)


def node_modules(model) -> dict[str, str]:
    """:func:`node_key` -> dotted module path ("" for the top level), every subgraph included."""
    flat = {m.replace(".", "_"): m for m in known_modules(model)}
    paths: dict[str, str] = {}
    for graph, owners in walk_graphs(model.graph):
        outer = paths.get(node_key(owners[-1]), "") if owners else ""
        pending, inside = [], []
        for node in graph.node:
            parsed = parse_scopes(_meta(node))
            if parsed and parsed[1]:
                found = _deeper(parsed[0][-1] if parsed[0] else "", node, flat)
            elif parsed and parsed[0]:
                found = ".".join(p for p in (outer, parsed[0][-1]) if p)
            elif owners and node.op_type != "If":  # an If reads every branch's parameters
                found = _module_from_params(node, flat)
            else:
                found = None
            if found is None:
                pending.append(node_key(node))
                continue
            paths[node_key(node)] = found
            if found != outer:
                inside.append(found)
        # a branch's unnamed nodes (reshapes, attention cores) belong to the branch's module
        branch = _common(inside) if owners and inside else outer
        for key in pending:
            paths[key] = branch
    return paths


def candidates(model) -> list[Candidate]:
    """Every (module, tensor leaving it) of the main graph, in execution order; a tensor
    leaves each of its producer's enclosing modules that its readers are not inside."""
    modules = node_modules(model)
    graph = model.graph
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(modules.get(node_key(node), ""))
    outputs = {o.name for o in graph.output}
    found = []
    for position, node in enumerate(graph.node):
        own = modules.get(node_key(node), "")
        if not own:
            continue
        parts = own.split(".")
        enclosing = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for tensor in node.output:
            if not tensor:
                continue
            users = readers.get(tensor, [])
            for module in enclosing:
                outside = [u for u in users if not (u == module or u.startswith(module + "."))]
                if outside or tensor in outputs:
                    found.append(Candidate(module, tensor, position))
    return found


def float_tensors(model) -> dict[str, int]:
    """Value name -> ONNX element type, for the float values of the main graph (shape
    inference over a copy without the weights: initializers become typed inputs)."""
    onnx = import_engine("onnx")
    g = model.graph
    weights = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
               for t in g.initializer]
    skeleton = onnx.helper.make_model(
        onnx.helper.make_graph(list(g.node), g.name, list(g.input) + weights, list(g.output),
                               value_info=list(g.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # inference is a help here: the values' types are read where known
        inferred = skeleton
    types = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        elem = info.type.tensor_type.elem_type
        if elem in _FLOAT_TYPES:
            types[info.name] = elem
    return types


def expose(model, tensors: Sequence[str], types: Mapping[str, int]):
    """A copy of ``model`` that also returns ``tensors`` (the same nodes otherwise)."""
    onnx = import_engine("onnx")
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    for name in tensors:
        if name not in have:
            exposed.graph.output.append(
                onnx.helper.make_tensor_value_info(name, types.get(name, 1), None))
            have.add(name)
    return exposed


def if_conditions(model) -> dict[str, str]:
    """``If`` node name -> its condition tensor, for the ``If`` nodes of the main graph."""
    return {n.name: n.input[0] for n in model.graph.node if n.op_type == "If"}


def specialise(model, taken: Mapping[str, bool]):
    """A copy of ``model`` in which each main-graph ``If`` named in ``taken`` is replaced by the
    nodes of the branch it takes (``True``: then_branch); its outputs become Identity of the
    branch's. The branch's nodes keep their metadata, with their module (read from the ``If``
    and the branch) written as absolute scopes, so :func:`node_modules` still finds them."""
    onnx = import_engine("onnx")
    modules = node_modules(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if node.op_type != "If" or node.name not in taken:
            nodes.append(node)
            continue
        branch_name = "then_branch" if taken[node.name] else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == branch_name)
        # a branch's constants may repeat names of the main graph's: renamed on the way up
        have = {t.name for t in out.graph.initializer}
        renamed = {t.name: f"{node.name}/{t.name}" for t in branch.initializer if t.name in have}
        for init in branch.initializer:
            out.graph.initializer.append(init)
            out.graph.initializer[-1].name = renamed.get(init.name, init.name)
        for inner in branch.node:
            copied = onnx.NodeProto()
            copied.CopyFrom(inner)
            _rename_inputs(copied, renamed)
            copied.name = f"{node.name}/{inner.name}"  # branches repeat node names
            set_module(copied, modules.get(node_key(inner), modules.get(node_key(node), "")))
            nodes.append(copied)
        for result, source in zip(node.output, branch.output, strict=True):
            nodes.append(onnx.helper.make_node("Identity", [source.name], [result],
                                               name=f"{node.name}/{branch_name}/{result}"))
            set_module(nodes[-1], modules.get(node_key(node), ""))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _rename_inputs(node, renamed: Mapping[str, str]) -> None:
    """``node`` (and the graphs it owns) reading ``renamed`` values by their new names."""
    if not renamed:
        return
    for i, name in enumerate(node.input):
        node.input[i] = renamed.get(name, name)
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                _rename_inputs(inner, renamed)


def set_module(node, module: str) -> None:
    """Attribute ``node`` to PyTorch module ``module`` the way the exporter records it (its
    ``pkg.torch.onnx.name_scopes``), replacing what it had."""
    scopes = [""] + _ancestry(module) + [node.op_type]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            prop.value = repr(scopes)
            return
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))


def _ancestry(module: str) -> list[str]:
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def prefix_model(model, tensor: str, types: Mapping[str, int]):
    """The subgraph that computes ``tensor`` from the model's inputs (onnx's extractor), every
    input kept so the same feed runs it: what a target runs if the model ends there."""
    from onnx.utils import Extractor

    inputs = [i.name for i in model.graph.input]
    return Extractor(expose(model, [tensor], types)).extract_model(inputs, [tensor])


def save_temp(model, directory: Path, name: str) -> Path:
    """``model`` written for an engine to load (weights outside the file past 1.5 GiB)."""
    onnx = import_engine("onnx")
    path = directory / name
    big = model.ByteSize() > (3 << 29)
    onnx.save_model(model, str(path), save_as_external_data=big,
                    location=name + ".data" if big else None)
    return path


def check_has_scopes(model, where: str) -> None:
    if not any(node_modules(model).values()):
        raise UserError(
            f"{where}: no node carries a PyTorch module name, so nothing can be localised",
            stage="localize",
            hint="export the model with `qcexport convert` (which keeps the exporter's "
                 "name scopes); a tool that rewrote the graph may have dropped node metadata")

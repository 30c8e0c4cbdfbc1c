"""Split one ONNX graph into a context graph and a query graph.

Every value of the graph is classed by what it depends on: initializers and constants only
(``CONST``), the context inputs and no other input (``CONTEXT``), or some query input
(``QUERY``); a subgraph's node depends on every outer value its branches read. Context nodes
form the context graph, query nodes the query graph, and constant nodes go wherever they are
read (a copy on both sides costs nothing at run time). The context values that query nodes read
cross the cut: they are the context graph's outputs and the query graph's inputs.

Classing alone already puts all the work that depends only on the image (the visual keys and
values of every cross-attention layer) on the context side, which is where the saving is. What
is left to choose is the exact tensors that cross: a cheap op (a reshape, a shape read, an
expand to the batch) whose context inputs cross anyway is recomputed on the query side when that
shrinks the bytes crossing, so a ``Shape`` of a boundary tensor never crosses, nor a tensor and
its expanded copy both; heavy ops never move.

Work inside the branches of an ``If`` taken on the query (a routing choice) would be query
work like the ``If`` itself: before classing, its context-only heavy work (each branch's visual
keys and values) is moved out of the branches into the main graph (``hoist``), for the split
pair only: the single graph keeps its branches whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import helper
from qcrun.errors import UserError
from qcrun.graphs import subgraphs

from qcexport.split.hoist import hoist_branches
from qcexport.split.reads import CONST, CONTEXT, QUERY, node_reads

#: Ops the query side may recompute instead of receiving their output: they move or reshape
#: data, or compute on shapes, at a cost proportional to the tensor at most.
CHEAP_OPS = frozenset({
    "Shape", "Size", "Gather", "Slice", "Concat", "Reshape", "Transpose", "Unsqueeze", "Squeeze",
    "Flatten", "Expand", "Cast", "Identity", "Range", "Add", "Sub", "Mul", "Div", "Equal",
    "Less", "Greater", "Not", "And", "Or", "Where", "ConstantOfShape", "Neg",
})

#: Size assumed for an axis whose size is unknown before the run (a symbolic one): only used to
#: compare the bytes of tensors, where axes of the same name cancel out.
UNKNOWN_AXIS = 256


@dataclass(frozen=True)
class Boundary:
    """One tensor crossing the cut: its name, element type (ONNX enum) and shape (ints,
    symbolic names, or None for an unnamed axis)."""

    name: str
    elem_type: int
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class SplitGraphs:
    context: onnx.ModelProto
    query: onnx.ModelProto
    boundary: tuple[Boundary, ...]
    context_inputs: tuple[str, ...]
    query_inputs: tuple[str, ...]
    # query-graph input name -> graph output it is passed through as (outputs that depend on
    # the context inputs only still come out of the query graph, under their own names)
    passthrough: Mapping[str, str]
    # optional inputs of the model (see ``optional_inputs``): required inputs of the query
    # graph, whose defaults the context graph hands over as boundary tensors of their names
    defaults: tuple[str, ...] = ()


def classify(graph: onnx.GraphProto, context_inputs: Iterable[str]) -> dict[str, int]:
    """value name -> CONST, CONTEXT or QUERY (see the module docstring). An input with an
    initializer of its name (an optional input, the initializer its default) is an input."""
    context = set(context_inputs)
    kind = {t.name: CONST for t in graph.initializer}
    for value in graph.input:
        kind[value.name] = CONTEXT if value.name in context else QUERY
    for node in graph.node:
        k = max((kind.get(n, CONST) for n in node_reads(node)), default=CONST)
        for out in node.output:
            if out:
                kind[out] = k
    return kind


def _types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every value's type, after shape inference on the graph only (no weights needed)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for t in skeleton.graph.initializer:  # shapes and types are all inference reads of them
        if t.raw_data or t.float_data or t.int64_data or t.data_location:
            keep = onnx.TensorProto(dims=t.dims, data_type=t.data_type, name=t.name)
            if math.prod(t.dims) <= 64:  # small ones may be shapes inference folds
                keep.CopyFrom(t)
            t.CopyFrom(keep)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    except Exception:  # inference is a help for choosing the cut, never a requirement
        inferred = skeleton
    graph = inferred.graph
    values = {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}
    for t in model.graph.initializer:
        values.setdefault(t.name, helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    return values


def _shape(info: onnx.ValueInfoProto | None) -> tuple[int | str | None, ...] | None:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None
                 for d in info.type.tensor_type.shape.dim)


def _bytes(info: onnx.ValueInfoProto | None) -> float:
    """Estimated size of a value; unknown ranks count as large (never worth re-crossing)."""
    shape = _shape(info)
    if shape is None:
        return float("inf")
    itemsize = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).itemsize
    return itemsize * math.prod(d if isinstance(d, int) else UNKNOWN_AXIS for d in shape)


def _dim_sources(values: Iterable[str], infos: Mapping[str, onnx.ValueInfoProto]
                 ) -> dict[str, tuple[str, int]]:
    """symbolic axis -> (a value the query side has, its axis of that name), the first
    value of ``values`` that has the axis."""
    found: dict[str, tuple[str, int]] = {}
    for name in values:
        for axis, dim in enumerate(_shape(infos.get(name)) or ()):
            if isinstance(dim, str):
                found.setdefault(dim, (name, axis))
    return found


def _rebuilt_shape(node: onnx.NodeProto, infos: Mapping[str, onnx.ValueInfoProto],
                   sources: Mapping[str, tuple[str, int]]) -> list[onnx.NodeProto] | None:
    """Nodes computing ``Shape(x)`` on the query side from axes of the same (symbolic) name
    that it has, without x; None when some axis of x has no such source."""
    shape = _shape(infos.get(node.input[0]))
    if shape is None or any(d is None or (isinstance(d, str) and d not in sources)
                            for d in shape):
        return None
    attrs = {a.name: a.i for a in node.attribute}
    dims = shape[slice(attrs.get("start"), attrs.get("end"))]
    out, parts, nodes = node.output[0], [], []
    for i, dim in enumerate(dims):
        part = f"{out}/dim{i}"
        if isinstance(dim, int):
            nodes.append(helper.make_node("Constant", [], [part], name=part,
                                          value=helper.make_tensor(part, onnx.TensorProto.INT64,
                                                                   [1], [dim])))
        else:
            source, axis = sources[dim]
            nodes.append(helper.make_node("Shape", [source], [part], name=part, start=axis,
                                          end=axis + 1))
        parts.append(part)
    if not parts:
        return None
    nodes.append(helper.make_node("Concat", parts, [out], name=f"{out}/rebuilt", axis=0))
    return nodes


def _shape_derived(nodes: Sequence[onnx.NodeProto], kind: Mapping[str, int],
                   infos: Mapping[str, onnx.ValueInfoProto], sources: Mapping[str, tuple[str, int]]
                   ) -> dict[int, list[onnx.NodeProto]]:
    """Context nodes whose values depend on the context inputs only through their shapes
    (a batch size, a token count, a mask of ones), each with the nodes that compute it on the
    query side: a ``Shape`` is rebuilt from axes of the same name there, the rest copied."""
    derived: dict[int, list[onnx.NodeProto]] = {}
    done: set[str] = set()
    for i, node in enumerate(nodes):
        if _kind(kind, node) != CONTEXT or node.op_type not in CHEAP_OPS or subgraphs(node):
            continue
        if node.op_type == "Shape":
            rebuilt = _rebuilt_shape(node, infos, sources)
        elif all(kind.get(n) != CONTEXT or n in done for n in node_reads(node)):
            rebuilt = [node]
        else:
            rebuilt = None
        if rebuilt is not None:
            derived[i] = rebuilt
            done.update(node.output)
    return derived


def _pull_back(nodes: Sequence[onnx.NodeProto], kind: Mapping[str, int], crossing: set[str],
               infos: Mapping[str, onnx.ValueInfoProto], query_inputs: Iterable[str]
               ) -> dict[int, list[onnx.NodeProto]]:
    """Context nodes the query side recomputes, by index, with the nodes it runs instead.
    Whatever depends on the context only through shapes is recomputed there; a cheap node
    whose output crosses moves when the context inputs it needs are already crossing or
    smaller than its output. Repeated until nothing moves (a moved reshape can make its
    input's reshape movable)."""
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    # Shapes are read from the query inputs first, then from tensors that cross whatever
    # happens (not themselves derived from shapes, which would be circular).
    every_axis = {d: ("", 0) for v in infos.values() for d in _shape(v) or () if isinstance(d, str)}
    maybe = {o for i in _shape_derived(nodes, kind, infos, every_axis) for o in nodes[i].output}
    sources = _dim_sources([*query_inputs, *sorted(crossing - maybe)], infos)
    derived = _shape_derived(nodes, kind, infos, sources)
    moved: dict[int, list[onnx.NodeProto]] = {}
    changed = True
    while changed:
        changed = False
        for value in sorted(crossing):
            i = producer.get(value)
            if i is None or i in moved:
                continue
            node = nodes[i]
            if i in derived:
                moved[i] = derived[i]
                needs = {n for r in derived[i] for n in node_reads(r)}
            elif node.op_type not in CHEAP_OPS or subgraphs(node) \
                    or len(node.output) != 1:
                continue
            else:
                needs = {n for n in node.input if n and kind.get(n) == CONTEXT}
                if sum(_bytes(infos.get(n)) for n in needs - crossing) >= \
                        _bytes(infos.get(value)):
                    continue
                moved[i] = [node]
            crossing.discard(value)
            crossing.update(n for n in needs if kind.get(n) == CONTEXT)
            crossing.difference_update(o for j in moved for o in nodes[j].output)
            changed = True
    crossing.difference_update(query_inputs)
    return moved


def _prune(nodes: list[onnx.NodeProto], wanted: Iterable[str]) -> list[onnx.NodeProto]:
    """The nodes needed for ``wanted``, in their order."""
    needed = set(wanted)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node_reads(node))
    return kept[::-1]


def _topological(nodes: list[onnx.NodeProto], given: Iterable[str]) -> list[onnx.NodeProto]:
    """``nodes`` in an order where each runs after what it reads (recomputed context nodes
    can read query values computed later in the original order); stable otherwise."""
    ready, pending, order = set(given), list(nodes), []
    produced = {o for n in nodes for o in n.output}
    while pending:
        rest = []
        for node in pending:
            if all(n in ready or n not in produced for n in node_reads(node)):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"split: a cycle through {rest[0].name!r}")
        pending = rest
    return order


def _make(model: onnx.ModelProto, name: str, nodes: list[onnx.NodeProto],
          inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    read = {n for node in nodes for n in node_reads(node)} | {o.name for o in outputs}
    nodes = _topological(nodes, [i.name for i in inputs])
    graph = helper.make_graph(
        nodes, name, inputs, outputs,
        initializer=[t for t in model.graph.initializer if t.name in read],
        value_info=[v for v in model.graph.value_info if v.name in read])
    out = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version,
                            producer_name=model.producer_name,
                            producer_version=model.producer_version)
    out.functions.extend(model.functions)
    for prop in model.metadata_props:
        out.metadata_props.add(key=prop.key, value=prop.value)
    return out


def _value(name: str, infos: Mapping[str, onnx.ValueInfoProto], new_name: str | None = None
           ) -> onnx.ValueInfoProto:
    info = infos.get(name)
    if info is None or not info.type.tensor_type.elem_type:
        raise UserError(f"the type of {name!r}, which crosses the cut, is unknown (shape "
                        "inference could not type it)", stage="split",
                        hint="choose other --context-inputs, or export with a newer opset")
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = new_name or name
    return out


def check_context_inputs(model: onnx.ModelProto, context_inputs: Sequence[str]) -> None:
    names = [i.name for i in model.graph.input]
    unknown = [n for n in context_inputs if n not in names]
    if not context_inputs or unknown:
        raise UserError(f"context inputs {list(context_inputs)} are not inputs of the model "
                        f"(its inputs: {', '.join(names)})" if unknown else
                        "no context inputs given", stage="split",
                        hint="pass --context-inputs with some of the model's inputs, e.g. "
                        f"--context-inputs {names[0]}")
    if set(context_inputs) >= set(names):
        raise UserError(f"every input of the model ({', '.join(names)}) is a context input: "
                        "nothing is left to query", stage="split",
                        hint="a split needs at least one input that changes per query "
                        "(a text, a task, a count); leave it out of --context-inputs")


def split_graph(model: onnx.ModelProto, context_inputs: Sequence[str]) -> SplitGraphs:
    """The context and query graphs of ``model`` (see the module docstring)."""
    check_context_inputs(model, context_inputs)
    model = hoist_branches(model, context_inputs)
    graph = model.graph
    kind = classify(graph, context_inputs)
    infos = _types(model)
    nodes = list(graph.node)
    outputs = [o.name for o in graph.output]
    query_nodes = [n for n in nodes if _kind(kind, n) == QUERY]
    crossing = {n for node in query_nodes for n in node_reads(node) if kind.get(n) == CONTEXT}
    crossing.update(o for o in outputs if kind.get(o) == CONTEXT)
    if not query_nodes and not crossing - set(outputs):
        raise UserError("no output of the model depends on a query input: there is nothing "
                        "to split", stage="split", hint="check --context-inputs")
    q_names = [i.name for i in graph.input if i.name not in context_inputs]
    moved = _pull_back(nodes, kind, crossing, infos, q_names)
    # An output that depends on the context only crosses under another name (a graph may not
    # take and give one name) and leaves the query graph through an Identity.
    names = {b: f"{b}__context" if b in outputs else b for b in _ordered(nodes, graph, crossing)}
    passthrough = {new: old for old, new in names.items() if new != old}
    ctx_nodes = [n for n in nodes if _kind(kind, n) in (CONST, CONTEXT)]
    ctx_nodes += [helper.make_node("Identity", [o], [i], name=f"{i}/crossing")
                  for i, o in passthrough.items()]
    ctx_nodes = _prune(ctx_nodes, names.values())
    ctx_inputs = [i for i in graph.input if i.name in context_inputs]
    crossing_values = [_value(b, infos, new) for b, new in names.items()]
    context = _make(model, f"{graph.name}_context", ctx_nodes, ctx_inputs, crossing_values)
    # query graph: query nodes, the context nodes it recomputes and the constants it reads
    q_nodes = [r for i, n in enumerate(nodes)
               for r in ([n] if _kind(kind, n) in (CONST, QUERY) else moved.get(i, []))]
    q_nodes += [helper.make_node("Identity", [i], [o], name=f"{o}/passthrough")
                for i, o in passthrough.items()]
    q_nodes = _prune(q_nodes, outputs)
    # the optional inputs last: after the boundary, as the cut lists their defaults
    optional = set(optional_inputs(model))
    q_inputs = [i for i in graph.input if i.name not in {*context_inputs, *optional}] + \
        crossing_values + [i for i in graph.input if i.name in optional]
    query = _make(model, f"{graph.name}_query", q_nodes, q_inputs, list(graph.output))
    defaults = optional_inputs(model)
    _defaults_through_context(model, context, query, defaults)
    default_values = [i for i in graph.input if i.name in defaults]
    return SplitGraphs(
        context=context, query=query,
        boundary=tuple(Boundary(v.name, v.type.tensor_type.elem_type, _shape(v) or ())
                       for v in (*crossing_values, *default_values)),
        context_inputs=tuple(i.name for i in ctx_inputs),
        query_inputs=tuple(i.name for i in graph.input if i.name not in context_inputs),
        passthrough=passthrough, defaults=tuple(defaults))


def optional_inputs(model: onnx.ModelProto) -> list[str]:
    """Inputs with an initializer of their name: optional in ONNX, the initializer their
    default."""
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in initializers]


def _defaults_through_context(model: onnx.ModelProto, context: onnx.ModelProto,
                              query: onnx.ModelProto, names: Sequence[str]) -> None:
    """Every optional input becomes a required input of the query graph (engines differ on
    optional ones: OpenVINO reads the default as a constant) and an output of the context
    graph holding its default: a query that does not give it reads the context's."""
    if not names:
        return
    tensors = {t.name: t for t in model.graph.initializer}
    for name in names:
        default = onnx.TensorProto()
        default.CopyFrom(tensors[name])
        default.name = f"{name}/default"
        context.graph.initializer.append(default)
        context.graph.node.append(helper.make_node("Identity", [default.name], [name],
                                                   name=f"{name}/crossing"))
        value = next(i for i in model.graph.input if i.name == name)
        context.graph.output.append(value)
        kept = [t for t in query.graph.initializer if t.name != name]
        del query.graph.initializer[:]
        query.graph.initializer.extend(kept)


def _kind(kind: Mapping[str, int], node: onnx.NodeProto) -> int:
    return max((kind[o] for o in node.output if o), default=CONST)


def _ordered(nodes, graph, crossing: set[str]) -> list[str]:
    """The crossing values in the order they are computed (context inputs first)."""
    order = [i.name for i in graph.input] + [o for n in nodes for o in n.output]
    return [n for n in order if n in crossing]

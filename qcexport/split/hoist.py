"""Move the context-only work out of ``If`` branches, so that the split can cache it.

An ``If`` whose condition depends on the query (a routing choice made from a task) is a query
node, and with it everything inside its branches, the work that depends only on the image
included (the visual keys and values a branch's attention projects). ONNX lets a branch read
any value of the scopes around it, so that work can move out: in each branch, the nodes whose
values depend only on context values of the enclosing scopes and on initializers (never on a
query value or a branch input), and that are heavy work (a MatMul, a Gemm) or what feeds it or
follows from it, move into the enclosing graph under names prefixed with the ``If`` node and
the branch (sibling branches reuse node and initializer names), with copies of the branch
initializers they read; the branch reads their outputs from outside. Nested ``If`` nodes are
handled innermost first, so a branch's projections reach the main graph through every level.

The split then computes every branch's keys and values once per image (more than the one
branch a query takes: the price of caching whichever it takes) and a query runs only the
query side of its branch. Which hoisted tensors cross, and what cheap work goes back to the
query side, is the split's own choice, as for any other context node. ``Loop`` and ``Scan``
bodies are left as they are (their values may change per iteration).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field

import onnx
from qcrun.graphs import all_graphs, subgraphs

from qcexport.split.reads import CONST, CONTEXT, QUERY, node_reads

#: Ops worth computing once per image: a chain of context-only nodes in a branch moves out
#: only when it holds one of these.
HEAVY_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "Einsum", "MatMulInteger", "QLinearMatMul", "ConvInteger",
    "QLinearConv", "Attention", "MultiHeadAttention",
})
#: Reads of a context value's shape move out too: left in a branch they would make the whole
#: tensor cross for a few integers, while in the main graph the split rebuilds them on the query
#: side from axes of the same name it has.
SHAPE_OPS = frozenset({"Shape", "Size"})


@dataclass
class _Hoisted:
    """What a branch hands to its enclosing graph."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    value_info: list[onnx.ValueInfoProto] = field(default_factory=list)


def hoist_branches(model: onnx.ModelProto, context_inputs: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``If`` branches read their context-only heavy work from the
    main graph (see the module docstring); ``model`` itself is unchanged. A model without such
    work is returned as it is."""
    if not any(n.op_type == "If" for g in all_graphs(model.graph) for n in g.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    context = set(context_inputs)
    kind: dict[str, int] = {t.name: CONST for t in graph.initializer}
    for value in graph.input:  # an optional input's initializer is its default: an input
        kind[value.name] = CONTEXT if value.name in context else QUERY
    taken = {n for g in all_graphs(graph) for n in _names(g)}
    _hoist_in(graph, ChainMap(kind), taken)
    return out


def _names(graph: onnx.GraphProto) -> Iterable[str]:
    yield from (v.name for v in graph.input)
    yield from (t.name for t in graph.initializer)
    for node in graph.node:
        yield from node.output
        yield node.name


def _kind_of(kind: Mapping[str, int], node: onnx.NodeProto) -> int:
    # A value of no known scope is taken for a query value: it never moves.
    return max((kind.get(n, QUERY) for n in node_reads(node)), default=CONST)


def _hoist_in(graph: onnx.GraphProto, kind: ChainMap, taken: set[str]) -> None:
    """Hoist out of every ``If`` of ``graph`` (recursively) into ``graph``, filling
    ``kind.maps[0]`` with the kind of each value ``graph`` defines."""
    local = kind.maps[0]
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        # An If taken on the context side is a context node already, branches and all.
        if node.op_type == "If" and kind.get(node.input[0], QUERY) == QUERY:
            owner = node.name or node.output[0]
            for attr in node.attribute:
                if attr.type != onnx.AttributeProto.GRAPH:
                    continue
                moved = _hoist_branch(attr.g, kind, f"{owner}/{attr.name}", taken)
                graph.initializer.extend(moved.initializers)
                graph.value_info.extend(moved.value_info)
                local.update((t.name, CONST) for t in moved.initializers)
                for hoisted in moved.nodes:
                    local.update((o, _kind_of(kind, hoisted)) for o in hoisted.output)
                nodes += moved.nodes
        local.update((o, _kind_of(kind, node)) for o in node.output if o)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _hoist_branch(branch: onnx.GraphProto, outer: ChainMap, prefix: str,
                  taken: set[str]) -> _Hoisted:
    """Move the hoistable nodes of ``branch`` out (see the module docstring); what moved, for
    the enclosing graph to take in before the ``If``."""
    kind = outer.new_child({t.name: CONST for t in branch.initializer})
    kind.maps[0].update((v.name, QUERY) for v in branch.input)  # Loop-style inputs vary
    _hoist_in(branch, kind, taken)
    chosen = _chosen(list(branch.node), kind)
    if not chosen:
        return _Hoisted()
    nodes = list(branch.node)
    initializers = {t.name: t for t in branch.initializer}
    renamed = {}
    for i in chosen:
        for name in filter(None, nodes[i].output):
            renamed[name] = _fresh(f"{prefix}/{name}", taken)
    used = {n for i in chosen for n in node_reads(nodes[i]) if n in initializers}
    weights = {name: _fresh(f"{prefix}/{name}", taken) for name in sorted(used)}
    out = _Hoisted()
    for i in chosen:
        moved = onnx.NodeProto()
        moved.CopyFrom(nodes[i])
        moved.name = _fresh(f"{prefix}/{moved.name or moved.output[0]}", taken)
        _rename(moved.input, {**renamed, **weights})
        _rename(moved.output, renamed)
        out.nodes.append(moved)
    for name, new in weights.items():
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[name])
        copy.name = new
        out.initializers.append(copy)
    for info in branch.value_info:
        if info.name in renamed:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(info)
            copy.name = renamed[info.name]
            out.value_info.append(copy)
    _leave(branch, [n for i, n in enumerate(nodes) if i not in chosen], renamed)
    return out


def _chosen(nodes: list[onnx.NodeProto], kind: Mapping[str, int]) -> list[int]:
    """Indices of the branch nodes that move: of those that may (context-only or constant, no
    subgraph, every producer in the branch movable too), the heavy ones and the shape reads,
    the context nodes that follow from them, and what feeds either."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    movable: set[int] = set()
    for i, node in enumerate(nodes):
        if not subgraphs(node) and _kind_of(kind, node) in (CONST, CONTEXT) and all(
                producer[n] in movable for n in node_reads(node) if n in producer):
            movable.add(i)
    wanted: set[int] = set()
    for i, node in enumerate(nodes):
        if i in movable and _kind_of(kind, node) == CONTEXT and (
                node.op_type in HEAVY_OPS or node.op_type in SHAPE_OPS
                or any(producer.get(n) in wanted for n in node_reads(node))):
            wanted.add(i)
    stack = list(wanted)  # every producer of a movable node is movable: close over them
    while stack:
        for n in node_reads(nodes[stack.pop()]):
            if n in producer and producer[n] not in wanted:
                wanted.add(producer[n])
                stack.append(producer[n])
    return sorted(wanted)


def _fresh(name: str, taken: set[str]) -> str:
    new, k = name, 1
    while new in taken:
        new, k = f"{name}/{k}", k + 1
    taken.add(new)
    return new


def _rename(names, mapping: Mapping[str, str]) -> None:
    for i, name in enumerate(names):
        if name in mapping:
            names[i] = mapping[name]


def _leave(branch: onnx.GraphProto, kept: list[onnx.NodeProto],
           renamed: MutableMapping[str, str]) -> None:
    """What stays in ``branch``: its remaining nodes read the moved values from outside, an
    output that moved leaves through an Identity of its name, and an initializer no node of
    the branch reads any more is dropped."""
    for node in kept:
        _rename_reads(node, renamed)
    kept += [onnx.helper.make_node("Identity", [renamed[o.name]], [o.name],
                                   name=f"{renamed[o.name]}/out")
             for o in branch.output if o.name in renamed]
    del branch.node[:]
    branch.node.extend(kept)
    read = {n for node in kept for n in node_reads(node)} | {o.name for o in branch.output}
    kept_weights = [t for t in branch.initializer if t.name in read]
    del branch.initializer[:]
    branch.initializer.extend(kept_weights)
    kept_info = [v for v in branch.value_info if v.name not in renamed]
    del branch.value_info[:]
    branch.value_info.extend(kept_info)


def _rename_reads(node: onnx.NodeProto, mapping: Mapping[str, str]) -> None:
    """Rename what ``node`` reads, in its subgraphs too, except where a subgraph defines a
    name of its own."""
    _rename(node.input, mapping)
    for sub in subgraphs(node):
        own = set(_names(sub))
        inner = {k: v for k, v in mapping.items() if k not in own}
        if inner:
            for child in sub.node:
                _rename_reads(child, inner)
            for out in sub.output:  # a subgraph may hand an outer value out as it is
                out.name = inner.get(out.name, out.name)

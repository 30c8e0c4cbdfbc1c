"""The facts the split reads off a graph: what each value depends on (its kind) and what each
node reads, its subgraphs' reads from the scopes around them included."""

from __future__ import annotations

import onnx
from qcrun.graphs import subgraphs

#: A value's kind: it depends on initializers and constants only, on context inputs (and no
#: other input), or on some query input.
CONST, CONTEXT, QUERY = 0, 1, 2


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The values a (sub)graph reads from the scopes around it, its subgraphs' included."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read.update(n for n in node.input if n and n not in defined)
        for sub in subgraphs(node):
            read.update(n for n in outer_reads(sub) if n not in defined)
        defined.update(node.output)
    return read


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every value ``node`` reads: its inputs and what its subgraphs read from outside."""
    names = [n for n in node.input if n]
    for sub in subgraphs(node):
        names += sorted(outer_reads(sub))
    return names

"""The one walk over an ONNX graph and its subgraphs (``If`` branches, ``Loop`` bodies).

Needs the ``onnx`` package (imported lazily). ``qcrun.onnxfile`` reads the same structure from
the raw protobuf bytes, for readers that must not depend on onnx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qcrun.errors import UserError, import_engine


def load_graph_only(model) -> Any:
    """An onnx ModelProto without its external weights (only their shapes are needed)."""
    onnx = import_engine("onnx")
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise UserError(f"model file {path} does not exist", stage="flops")
    return onnx.load(str(path), load_external_data=False)


def subgraphs(node) -> list:
    """The graphs held by ``node``'s attributes, in attribute order."""
    onnx = import_engine("onnx")
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def walk_graphs(graph, path: tuple = ()) -> Iterator[tuple[Any, tuple]]:
    """``(graph, path)`` for ``graph`` and every subgraph below it, depth first, a graph before
    its subgraphs; ``path`` holds the nodes that own it, outermost first (() for the main
    graph). A caller that handles a whole graph before asking for the next has therefore seen
    every node of ``path`` already."""
    yield graph, path
    for node in graph.node:
        for sub in subgraphs(node):
            yield from walk_graphs(sub, (*path, node))


def all_graphs(graph) -> Iterator[Any]:
    """``graph`` and every subgraph below it, in the order of :func:`walk_graphs`."""
    return (g for g, _ in walk_graphs(graph))

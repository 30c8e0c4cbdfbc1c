"""Where an engine's time goes in PyTorch terms: ONNX node -> PyTorch module.

The dynamo exporter writes module scopes into node ``metadata_props``; nodes an engine fused
or created are traced to the ONNX node whose output they compute, else to the next such node
downstream (``Tracer``; each engine module adds its own naming rules).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qcrun.graphs import load_graph_only, walk_graphs
from qcrun.profiling.records import NodeTime


@dataclass
class Provenance:
    """What the exporter recorded about each ONNX node, and the graph around it."""

    ops: dict[str, str] = field(default_factory=dict)  # node -> ONNX op type
    scopes: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # node -> modules
    producer: dict[str, str] = field(default_factory=dict)  # tensor -> node

    @property
    def has_metadata(self) -> bool:
        return any(s is not None for s in self.scopes.values())


def parse_scopes(metadata: Mapping[str, str]) -> tuple[tuple[str, ...], bool] | None:
    """Module scopes of one node from its exporter metadata, and whether they are absolute.

    ``pkg.torch.onnx.name_scopes`` is a list like ``['', 'layers.0', 'layers.0.attn', 'view']``:
    the root module (''), the modules down to the op, and the op's own name (dropped). Inside a
    ``torch.cond`` branch the list is relative to the branch (no leading ''). ``namespace``
    (``": pkg.Root/layers.0: pkg.Layer/view: aten.view"``) carries the same names.
    """
    raw = metadata.get("pkg.torch.onnx.name_scopes")
    names = None
    if raw:
        try:
            names = [str(n) for n in ast.literal_eval(raw)]
        except (ValueError, SyntaxError):
            names = None
    if names is None and metadata.get("namespace"):
        names = [segment.split(": ")[0] for segment in metadata["namespace"].split("/")]
    if not names:
        return None
    # Size queries of the inputs sit under a placeholder "module": the top level.
    absolute = names[0] == "" or names[0].startswith("_empty_nn_module_stack")
    modules = names[1:-1] if absolute else names[:-1]
    return tuple(n for n in modules if n), absolute


def provenance(model) -> Provenance:
    """Node names, op types, module scopes and tensor producers of an ONNX model (every
    subgraph included; a branch's relative scopes are put under its ``If`` node's module)."""
    model = load_graph_only(model)
    result = Provenance()
    for graph, owners in walk_graphs(model.graph):
        parent = _scopes_of(owners)
        for node in graph.node:
            parsed = parse_scopes({p.key: p.value for p in node.metadata_props})
            scopes = None if parsed is None else _scopes_of((node,), parent)
            result.ops.setdefault(node.name, node.op_type)
            result.scopes.setdefault(node.name, scopes)
            for out in node.output:
                if out:
                    result.producer.setdefault(out, node.name)
    return result


def _scopes_of(nodes, outer: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    """The module scopes of the last of ``nodes`` (a path of nested nodes, outermost first):
    absolute scopes stand alone, relative ones (inside a branch) extend the enclosing ones, and
    a node without metadata takes the enclosing scopes."""
    scopes = outer
    for node in nodes:
        parsed = parse_scopes({p.key: p.value for p in node.metadata_props})
        if parsed is not None:
            names, absolute = parsed
            scopes = names if absolute or scopes is None else scopes + names
    return scopes


def graph_links(model) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """node -> output tensors, node -> consumer nodes, over every (sub)graph."""
    outputs, consumers_of_tensor = {}, {}
    for graph, _ in walk_graphs(model.graph):
        for node in graph.node:
            outputs[node.name] = [o for o in node.output if o]
            for tensor in node.input:
                consumers_of_tensor.setdefault(tensor, []).append(node.name)
    consumers = {
        name: [c for t in outs for c in consumers_of_tensor.get(t, [])]
        for name, outs in outputs.items()
    }
    return outputs, consumers


class Tracer:
    """Traces engine node names to ONNX nodes: same name, else the ONNX node whose output it
    computes, else (for helpers the engine added) the first traceable node downstream."""

    def __init__(self, prov: Provenance, outputs: Mapping[str, Sequence[str]] | None = None,
                 consumers: Mapping[str, Sequence[str]] | None = None):
        self.prov = prov
        self.outputs = outputs or {}
        self.consumers = consumers or {}
        self._cache: dict[str, tuple[str | None, str]] = {}

    def _direct(self, name: str) -> tuple[str | None, str]:
        if name in self.prov.ops:
            return name, "name"
        base = name.split("/")[0]
        if base in self.prov.ops:
            return base, "name"
        for tensor in self.outputs.get(name, ()):
            node = self.prov.producer.get(tensor)
            if node is not None:
                return node, "output"
        return None, ""

    def trace(self, name: str) -> tuple[str | None, str]:
        if name in self._cache:
            return self._cache[name]
        found = self._direct(name)
        if found[0] is None:
            seen, queue = {name}, deque(self.consumers.get(name, ()))
            while queue and len(seen) < 200:
                nxt = queue.popleft()
                if nxt in seen:
                    continue
                seen.add(nxt)
                node, _ = self._direct(nxt)
                if node is not None:
                    found = (node, "downstream")
                    break
                queue.extend(self.consumers.get(nxt, ()))
        self._cache[name] = found
        return found

    def node_time(self, name, op_type, time_ms, kernel="") -> NodeTime:
        onnx_node, how = self.trace(name)
        return NodeTime(
            name=name,
            op_type=op_type,
            time_ms=time_ms,
            kernel=kernel,
            onnx_node=onnx_node,
            onnx_op=self.prov.ops.get(onnx_node) if onnx_node else None,
            scopes=self.prov.scopes.get(onnx_node) if onnx_node else None,
            mapped=how,
        )

"""FLOPs of an ONNX graph at concrete input shapes: the work the matrix units do.

Counted (a multiply-add is 2 FLOPs; bias adds, softmax, normalisation and other elementwise
work are not counted: they are memory-bound and a few percent of the total in these models,
and leaving them out keeps the count comparable with a GEMM peak):

| op | FLOPs |
| --- | --- |
| MatMul, FusedMatMul | 2 * M * K * N per broadcast batch element |
| Gemm | 2 * M * K * N |
| Attention (opset 23), 3-D or 4-D q/k/v, past key/value | 2 * B * Hq * Lq * Lk * (Dk + Dv) |
| com.microsoft.MultiHeadAttention (3-D, packed kv, 4-D key/value) | 2 * B * S * L * (D + Dv) |
| Conv | 2 * N * M * prod(out spatial) * C / group * prod(kernel) |
| ConvTranspose | 2 * N * C * prod(in spatial) * M / group * prod(kernel) |
| Einsum | 2 * product of every index size (one multiply-add per term) |
| If | the branch that ran (from observed shapes), else the costliest branch (an upper bound) |

Attention counts the full Lq x Lk score matrix even with a causal or padding mask: the CPU
kernels compute it whole.

Shapes come from onnx shape inference at the given input shapes, with symbolic dims the
exporter wrote (``text + 8``) evaluated; where that leaves a dim unknown (reshapes whose target
shape is computed at run time, values inside ``If`` branches), ``observe_shapes`` runs the
model once in onnxruntime with optimisations off and records every tensor's real shape, and
which ``If`` branch ran. Nodes whose shapes stay unknown are listed as unresolved, and the
count says it is not exact. Needs the ``onnx`` package (imported here, lazily).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from qcrun import engines
from qcrun.engines.base import ObservedShapes
from qcrun.errors import import_engine
from qcrun.graphs import load_graph_only, walk_graphs

Shape = tuple[int, ...]

COUNTED_OPS = (
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "Attention",
    "MultiHeadAttention",
    "Conv",
    "ConvTranspose",
    "Einsum",
)


# --- per-op formulas -------------------------------------------------------------------------


def _prod(values) -> int:
    return math.prod(int(v) for v in values)


def matmul_flops(a: Sequence[int], b: Sequence[int]) -> int:
    """numpy matmul semantics: 1-D operands are promoted, batch dims broadcast."""
    a, b = list(a), list(b)
    if not a or not b:
        raise ValueError("MatMul of a scalar")
    if len(a) == 1:
        a = [1, *a]
    if len(b) == 1:
        b = [*b, 1]
    m, k, n = a[-2], a[-1], b[-1]
    if b[-2] != k:
        raise ValueError(f"MatMul inner dims differ: {a} @ {b}")
    batch_a, batch_b = a[:-2], b[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = [1] * (width - len(batch_a)) + batch_a
    batch_b = [1] * (width - len(batch_b)) + batch_b
    batch = _prod(max(x, y) for x, y in zip(batch_a, batch_b, strict=True))
    return 2 * batch * m * k * n


def gemm_flops(a: Sequence[int], b: Sequence[int], trans_a: int = 0, trans_b: int = 0) -> int:
    m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
    n = b[0] if trans_b else b[1]
    return 2 * m * k * n


def attention_flops(
    q: Sequence[int],
    k: Sequence[int],
    v: Sequence[int],
    *,
    q_num_heads: int | None = None,
    kv_num_heads: int | None = None,
    past_length: int = 0,
) -> int:
    """ONNX ``Attention`` (opset 23): QK^T and PV over every query head.

    4-D: q [B, Hq, Lq, Dk], k [B, Hkv, Lk, Dk], v [B, Hkv, Lk, Dv]. 3-D: q [B, Lq, Hq*Dk],
    k [B, Lk, Hkv*Dk], v [B, Lk, Hkv*Dv] with the head counts from the attributes. Grouped
    queries (Hq > Hkv) share keys, but every query head still computes its own scores.
    """
    if len(q) == 4:
        batch, heads, lq, dk = q
        lk, dv = k[2], v[3]
    elif len(q) == 3:
        if not q_num_heads or not kv_num_heads:
            raise ValueError("3-D Attention needs q_num_heads and kv_num_heads")
        batch, lq, hidden = q
        heads, dk = q_num_heads, hidden // q_num_heads
        lk, dv = k[1], v[2] // kv_num_heads
    else:
        raise ValueError(f"Attention query of rank {len(q)}")
    lk += past_length
    return 2 * batch * heads * lq * lk * (dk + dv)


def mha_flops(
    query: Sequence[int], key: Sequence[int] | None, value: Sequence[int] | None, num_heads: int
) -> int:
    """``com.microsoft.MultiHeadAttention``: query [B, S, D]; key [B, L, D] with value
    [B, L, Dv], or key [B, N, L, H] (BNSH), or packed kv [B, L, N, 2, H] (value absent), or
    packed qkv in query [B, S, N, 3, H] (key and value absent)."""
    if len(query) == 5:  # packed qkv
        batch, s, n, _, h = query
        return 2 * batch * s * s * (n * h) * 2
    batch, s, d = query
    if key is None:
        raise ValueError("MultiHeadAttention without key needs a packed query")
    if len(key) == 5:  # packed kv
        length, n, h = key[1], key[2], key[4]
        return 2 * batch * s * length * (d + n * h)
    if len(key) == 4:  # BNSH
        length = key[2]
        dv = value[1] * value[3] if value is not None and len(value) == 4 else d
        return 2 * batch * s * length * (d + dv)
    length = key[1]
    dv = value[-1] if value is not None else d
    return 2 * batch * s * length * (d + dv)


def conv_flops(x: Sequence[int], w: Sequence[int], y: Sequence[int], group: int = 1) -> int:
    """Conv: x [N, C, ...], w [M, C/group, k...], y [N, M, out...]."""
    return 2 * y[0] * w[0] * _prod(y[2:]) * w[1] * _prod(w[2:])


def conv_transpose_flops(x: Sequence[int], w: Sequence[int], group: int = 1) -> int:
    """ConvTranspose: x [N, C, in...], w [C, M/group, k...]: every input pixel scatters."""
    return 2 * x[0] * x[1] * _prod(x[2:]) * w[1] * _prod(w[2:])


def einsum_flops(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    lhs = equation.replace(" ", "").split("->")[0]
    terms = lhs.split(",")
    if "..." in lhs or len(terms) != len(shapes):
        raise ValueError(f"unsupported einsum {equation!r}")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        for letter, size in zip(term, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    factor = 2 if len(terms) > 1 else 1
    return factor * _prod(sizes.values())


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeFlops:
    name: str
    op_type: str
    flops: int
    graph: str = ""  # "" for the main graph, else "<If node>/<branch>/..."


@dataclass
class FlopCount:
    """FLOPs of one model at one set of input shapes; ``qcrun.schema.dump`` writes it without
    the per-node list (kept in memory for callers that want it)."""

    DERIVED: ClassVar[dict[str, Callable]] = {"exact": lambda count: count.exact}

    total: int
    by_op_type: dict[str, int]
    nodes: list[NodeFlops] = field(default_factory=list, metadata={"dump": False})
    unresolved: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)  # how each If was counted
    shapes_from: str = "inference"  # "inference" | "observed"

    @property
    def exact(self) -> bool:
        """True when every counted node had known shapes and every If branch is known."""
        return not self.unresolved and not any("upper bound" in b for b in self.branches)


# --- shapes ----------------------------------------------------------------------------------


def _onnx():
    return import_engine("onnx")


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def eval_dim(expression: str, symbols: Mapping[str, int]) -> int | None:
    """The value of a symbolic dim such as ``text + 8`` or ``2*tokens``, or None."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = [value(a) for a in node.args]
            funcs = {"Max": max, "Min": min, "max": max, "min": min}
            if node.func.id in funcs and args:
                return funcs[node.func.id](*args)
        raise KeyError(expression)

    try:
        result = value(tree)
    except (KeyError, ZeroDivisionError):
        return None
    return int(result) if result >= 0 else None


def _symbols(model, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    symbols = {}
    for value in model.graph.input:
        shape = input_shapes.get(value.name)
        if shape is None or not value.type.tensor_type.HasField("shape"):
            continue
        for dim, size in zip(value.type.tensor_type.shape.dim, shape, strict=False):
            if dim.dim_param:
                symbols[dim.dim_param] = int(size)
    return symbols


def _concrete(model, input_shapes: Mapping[str, Sequence[int]]):
    """A copy of ``model`` whose graph inputs have the given static shapes."""
    onnx = _onnx()
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for value in concrete.graph.input:
        if value.name not in input_shapes:
            continue
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        for size in input_shapes[value.name]:
            shape.dim.add().dim_value = int(size)
    return concrete


def _shape_of(value_info, symbols) -> Shape | None:
    tensor = value_info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            size = eval_dim(d.dim_param, symbols)
            if size is None:
                return None
            dims.append(size)
        else:
            return None
    return tuple(dims)


def _graph_shapes(graph, symbols) -> dict[str, Shape]:
    onnx = _onnx()
    shapes: dict[str, Shape] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        shape = _shape_of(value, symbols)
        if shape is not None:
            shapes[value.name] = shape
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(int(d) for d in tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return shapes


def observe_shapes(model_path: str | Path, feed: Mapping[str, Any]) -> ObservedShapes:
    """Run the model once (on the first engine here that observes shapes: onnxruntime with
    optimisations off, so every node keeps its name and its tensors) and read each node's real
    output shapes."""
    return engines.observe_shapes(model_path, feed)


# --- counting --------------------------------------------------------------------------------


def _attr(node, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            if attr.type == attr.INT:
                return attr.i
            if attr.type == attr.STRING:
                return attr.s.decode()
            if attr.type == attr.FLOAT:
                return attr.f
    return default


def _node_flops(node, shape) -> int:
    """FLOPs of one counted node; ``shape(i)`` is the shape of input i (or None if absent)."""
    op = node.op_type
    if op in ("MatMul", "FusedMatMul"):
        a, b = list(shape(0)), list(shape(1))
        if op == "FusedMatMul":
            if _attr(node, "transA", 0):
                a[-2], a[-1] = a[-1], a[-2]
            if _attr(node, "transB", 0):
                b[-2], b[-1] = b[-1], b[-2]
        return matmul_flops(a, b)
    if op == "Gemm":
        return gemm_flops(shape(0), shape(1), _attr(node, "transA", 0), _attr(node, "transB", 0))
    if op == "Attention" and node.domain in ("", "ai.onnx"):
        past = shape(4) if len(node.input) > 4 and node.input[4] else None
        return attention_flops(
            shape(0),
            shape(1),
            shape(2),
            q_num_heads=_attr(node, "q_num_heads"),
            kv_num_heads=_attr(node, "kv_num_heads"),
            past_length=past[-2] if past else 0,
        )
    if op == "MultiHeadAttention":
        key = shape(1) if len(node.input) > 1 and node.input[1] else None
        value = shape(2) if len(node.input) > 2 and node.input[2] else None
        return mha_flops(shape(0), key, value, int(_attr(node, "num_heads")))
    if op == "ConvTranspose":
        return conv_transpose_flops(shape(0), shape(1), _attr(node, "group", 1))
    if op == "Einsum":
        return einsum_flops(
            _attr(node, "equation"), [shape(i) for i in range(len(node.input))]
        )
    raise ValueError(f"{op} is not counted")


def count_flops(
    model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    observed: ObservedShapes | None = None,
) -> FlopCount:
    """Matrix FLOPs of ``model`` (a path or ModelProto) at ``input_shapes`` (see the module
    docstring for what is counted). ``observed`` real shapes, when given, take precedence over
    inferred ones and decide which ``If`` branch is counted."""
    onnx = _onnx()
    inferred, symbols = _inferred(onnx, load_graph_only(model), input_shapes, observed)

    def walk(graph, outer: dict[str, Shape], where: str) -> _Tally:
        shapes = {**outer, **_graph_shapes(graph, symbols)}
        if observed is not None:
            shapes.update(observed.tensors)
        tally = _Tally()
        for node in graph.node:
            label = _where(where, node.name)
            if node.op_type == "If":
                tally.add(walk_if(node, shapes, label))
            elif node.op_type in ("Loop", "Scan"):
                subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
                if any(_counts_any(onnx, g) for g in subgraphs):
                    tally.unresolved.append(f"{label} ({node.op_type}: unknown trip count)")
            elif node.op_type in COUNTED_OPS:
                flops = _count_node(node, shapes)
                if flops is None:
                    tally.unresolved.append(f"{label} ({node.op_type})")
                else:
                    tally.nodes.append(NodeFlops(node.name, node.op_type, flops, where))
                    tally.total += flops
        return tally

    def walk_if(node, shapes, label) -> _Tally:
        subs = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        tallies = {name: walk(g, shapes, f"{label}/{name}") for name, g in subs.items()}
        ran = [
            name
            for name, g in subs.items()
            if observed is not None and observed.ran(g)
        ]
        if len(ran) == 1:
            chosen = tallies[ran[0]]
            chosen.branches.append(f"{label}: {ran[0]} ran ({chosen.total} FLOPs)")
            return chosen
        if not tallies:
            return _Tally()
        best = max(tallies, key=lambda name: tallies[name].total)
        chosen = tallies[best]
        detail = ", ".join(f"{name} {t.total}" for name, t in tallies.items())
        chosen.branches.append(
            f"{label}: counted the costliest branch, {best} (upper bound; {detail} FLOPs)"
        )
        return chosen

    tally = walk(inferred.graph, {}, "")
    by_op: dict[str, int] = {}
    for n in tally.nodes:
        by_op[n.op_type] = by_op.get(n.op_type, 0) + n.flops
    return FlopCount(
        total=tally.total,
        by_op_type=dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        nodes=tally.nodes,
        unresolved=tally.unresolved,
        branches=tally.branches,
        shapes_from="observed" if observed is not None else "inference",
    )


def _inferred(onnx, model, input_shapes: Mapping[str, Sequence[int]] | None,
              observed: ObservedShapes | None) -> tuple[Any, dict[str, int]]:
    """``model`` with its inputs fixed at ``input_shapes`` (the observed ones when none are
    given) and shapes inferred as far as inference goes; the symbol -> size map."""
    if input_shapes is None and observed is not None:
        input_shapes = {
            v.name: observed.tensors[v.name]
            for v in model.graph.input
            if v.name in observed.tensors
        }
    input_shapes = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    symbols = _symbols(model, input_shapes)
    concrete = _concrete(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, data_prop=True)
    except Exception:  # inference is best effort here; observed shapes or unresolved remain
        inferred = concrete
    return inferred, symbols


@dataclass
class _Tally:
    total: int = 0
    nodes: list[NodeFlops] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)

    def add(self, other: _Tally) -> None:
        self.total += other.total
        self.nodes += other.nodes
        self.unresolved += other.unresolved
        self.branches += other.branches


def _where(where: str, name: str) -> str:
    return f"{where}/{name}" if where else name


def _counts_any(onnx, graph) -> bool:
    return any(n.op_type in COUNTED_OPS for g, _ in walk_graphs(graph) for n in g.node)


def _count_node(node, shapes: Mapping[str, Shape]) -> int | None:
    def shape(i: int) -> Shape:
        if i >= len(node.input) or not node.input[i]:
            raise KeyError(i)
        return shapes[node.input[i]]

    try:
        if node.op_type == "Conv":
            out = shapes[node.output[0]]
            return conv_flops(shape(0), shape(1), out, _attr(node, "group", 1))
        return _node_flops(node, shape)
    except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError):
        return None


def format_flops(flops: float | None) -> str:
    """3.2 GFLOP, 850 MFLOP..."""
    if flops is None:
        return "?"
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:g} FLOP"

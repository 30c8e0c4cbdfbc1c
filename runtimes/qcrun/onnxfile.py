"""What qcrun needs to know about an ONNX file, read from its protobuf bytes without ``onnx``.

The device has an engine but not the ``onnx`` package, and an engine does not list a graph's
nodes. To judge a model by what it *is* rather than by what its manifest says (its precision,
its metadata, the external data files it reads), qcrun reads the few protobuf fields it needs
straight from the wire format, in one walk over the graph and every subgraph (``If`` and
``Loop`` bodies), skipping tensor data without copying it.

Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
TensorProto, StringStringEntryProto); they are stable across ONNX versions.
"""

from __future__ import annotations

import mmap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qcrun.errors import UserError

# onnx.TensorProto.DataType values that decide a precision
FLOAT16, BFLOAT16 = 10, 16
INT8, UINT8 = 3, 2

_QDQ = {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv"}
_DYNAMIC = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}

MS_DOMAIN = "com.microsoft"
# The fused attention op of each attention form (what `qcexport convert --attention` emits);
# a graph with neither computes attention from its own MatMul/Softmax ("decomposed").
FUSED_ATTENTION = {"onnx": ("", "Attention"), "ort": (MS_DOMAIN, "MultiHeadAttention")}

# onnx.TensorProto.DataType -> numpy dtype name, as the manifests write dtypes
DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
          8: "object", 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
          14: "complex64", 15: "complex128", 16: "bfloat16"}


@dataclass(frozen=True)
class ValueSpec:
    """A graph input or output as the graph declares it: name, numpy dtype name (None when it
    is not a tensor) and shape (an int per fixed dimension, the name of a symbolic one, None
    for an unnamed one; the shape is None when the graph declares none)."""

    name: str
    dtype: str | None
    shape: tuple[int | str | None, ...] | None


@dataclass
class GraphSummary:
    """The facts qcrun reads from a model: op counts (subgraphs included, by op type and by
    (domain, op type)), initializer element types, model metadata, the external data files its
    tensors name, the opsets it imports and the main graph's inputs and outputs."""

    ops: Counter = field(default_factory=Counter)  # op_type -> count
    domain_ops: Counter = field(default_factory=Counter)  # (domain, op_type) -> count
    initializer_types: Counter = field(default_factory=Counter)  # TensorProto data_type -> count
    metadata: dict[str, str] = field(default_factory=dict)
    external_files: set[str] = field(default_factory=set)
    opsets: dict[str, int] = field(default_factory=dict)  # domain ("" = ai.onnx) -> version
    inputs: list[ValueSpec] = field(default_factory=list)  # initializers (IR < 4) left out
    outputs: list[ValueSpec] = field(default_factory=list)
    initializers: set[str] = field(default_factory=set)  # names, main graph
    tables: dict[str, tuple[int, ...]] = field(default_factory=dict)  # initializer dims, all graphs
    gathers: list[tuple[str, str, int]] = field(default_factory=list)  # (data, indices, axis)

    def index_bounds(self) -> dict[str, int]:
        """Rows of the smallest initializer table each graph input indexes with a Gather (an
        embedding): its values must lie in [0, rows - 1], or the Gather wraps around."""
        inputs = {v.name for v in self.inputs}
        bounds: dict[str, int] = {}
        for data, indices, axis in self.gathers:
            dims = self.tables.get(data)
            if indices in inputs and dims and -len(dims) <= axis < len(dims):
                bounds[indices] = min(bounds.get(indices, dims[axis]), dims[axis])
        return bounds

    @property
    def opset(self) -> int | None:
        """The version of the default (ai.onnx) operator set the model imports."""
        return self.opsets.get("")

    def fused_attention(self) -> dict[str, int]:
        """Fused attention nodes per attention form (only the forms that occur)."""
        return {form: self.domain_ops[key] for form, key in FUSED_ATTENTION.items()
                if self.domain_ops[key]}

    @property
    def attention(self) -> str:
        """The attention form the graph computes in: the form of its fused attention nodes,
        "decomposed" when it has none, "mixed" when it has both kinds."""
        forms = list(self.fused_attention())
        return forms[0] if len(forms) == 1 else "mixed" if forms else "decomposed"

    @property
    def precision(self) -> str:
        """The precision the graph computes in, from its ops and weights (not from any label):
        dynamic int8 (MatMulInteger / DynamicQuantizeLinear), static int8 (QDQ), fp16
        (half-precision initializers), else fp32."""
        if any(self.ops[op] for op in _DYNAMIC):
            return "int8-dynamic"
        if any(self.ops[op] for op in _QDQ):
            return "int8-static"
        if self.initializer_types[FLOAT16] or self.initializer_types[BFLOAT16]:
            return "fp16"
        return "fp32"


class _Truncated(Exception):
    pass


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Truncated
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of one message; a length-delimited value is the
    (start, end) of its bytes, read lazily."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise _Truncated  # groups are not used by onnx.proto
        if pos > end or number == 0:
            raise _Truncated
        yield number, wire, value


def _text(buf, span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _string_pair(buf, span) -> tuple[str, str]:
    key = value = ""
    for number, wire, v in _fields(buf, *span):
        if wire == 2 and number == 1:
            key = _text(buf, v)
        elif wire == 2 and number == 2:
            value = _text(buf, v)
    return key, value


def _tensor(buf, span, summary: GraphSummary, initializer: bool = False) -> str:
    data_type, external, location, name, dims = 0, False, None, "", []
    for number, wire, v in _fields(buf, *span):
        if number == 2 and wire == 0:
            data_type = v
        elif number == 1 and wire == 0:
            dims.append(_signed(v))
        elif number == 1 and wire == 2:  # packed dims
            pos, end = v
            while pos < end:
                dim, pos = _varint(buf, pos, end)
                dims.append(_signed(dim))
        elif number == 8 and wire == 2:
            name = _text(buf, v)
        elif number == 14 and wire == 0:
            external = v == 1
        elif number == 13 and wire == 2:
            key, value = _string_pair(buf, v)
            if key == "location":
                location = value
    summary.initializer_types[data_type] += 1
    if initializer:
        summary.tables[name] = tuple(dims)
    if external and location is not None:
        summary.external_files.add(location)
    return name


def _signed(value: int) -> int:
    """An int64 read as an unsigned varint, back to its sign."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _dim(buf, span) -> int | str | None:
    value = None
    for number, wire, v in _fields(buf, *span):
        if number == 1 and wire == 0:
            value = _signed(v)
        elif number == 2 and wire == 2:
            value = _text(buf, v)
    return value


def _value_info(buf, span) -> ValueSpec:
    """ValueInfoProto: name (1), type (2: TypeProto, tensor_type 1: elem_type 1, shape 2)."""
    name, dtype, shape = "", None, None
    for number, wire, v in _fields(buf, *span):
        if number == 1 and wire == 2:
            name = _text(buf, v)
        elif number == 2 and wire == 2:
            for n, w, tv in _fields(buf, *v):
                if n != 1 or w != 2:
                    continue
                for tn, tw, x in _fields(buf, *tv):
                    if tn == 1 and tw == 0:
                        dtype = DTYPES.get(x, f"onnx-type-{x}")
                    elif tn == 2 and tw == 2:
                        shape = tuple(_dim(buf, d) for dn, dw, d in _fields(buf, *x)
                                      if dn == 1 and dw == 2)
    return ValueSpec(name, dtype, shape)


def _graph(buf, span, summary: GraphSummary, depth: int) -> None:
    if depth > 32:
        raise _Truncated
    for number, wire, v in _fields(buf, *span):
        if wire != 2:
            continue
        if number == 1:  # node
            _node(buf, v, summary, depth)
        elif number == 5:  # initializer
            name = _tensor(buf, v, summary, initializer=True)
            if depth == 0:
                summary.initializers.add(name)
        elif number in (11, 12) and depth == 0:  # the main graph's inputs and outputs
            (summary.inputs if number == 11 else summary.outputs).append(_value_info(buf, v))
        elif number == 15:  # sparse_initializer: values (1) is a TensorProto
            for n, w, sv in _fields(buf, *v):
                if n == 1 and w == 2:
                    _tensor(buf, sv, summary)


def _node(buf, span, summary: GraphSummary, depth: int) -> None:
    op_type = domain = ""
    inputs, axis = [], 0
    for number, wire, v in _fields(buf, *span):
        if wire != 2:
            continue
        if number == 1:
            inputs.append(_text(buf, v))
        elif number == 4:
            op_type = _text(buf, v)
        elif number == 7:
            domain = _text(buf, v)
        elif number == 5:  # attribute: a graph (6), graphs (11) or a tensor (5: Constant)
            name, value = "", 0
            for n, w, av in _fields(buf, *v):
                if n == 1 and w == 2:
                    name = _text(buf, av)
                elif n == 3 and w == 0:  # i
                    value = _signed(av)
                elif w != 2:
                    continue
                elif n in (6, 11):
                    _graph(buf, av, summary, depth + 1)
                elif n == 5:
                    _tensor(buf, av, summary)
            if name == "axis":
                axis = value
    if op_type == "Gather" and domain in ("", "ai.onnx") and len(inputs) >= 2:
        summary.gathers.append((inputs[0], inputs[1], axis))
    summary.ops[op_type] += 1
    summary.domain_ops[("" if domain == "ai.onnx" else domain, op_type)] += 1


def read_summary(path: str | Path, *, stage: str = "model") -> GraphSummary:
    """The :class:`GraphSummary` of the ONNX file at ``path``, or a UserError when it is not a
    readable ONNX model (truncated, another format)."""
    path = Path(path)
    summary = GraphSummary()
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise _Truncated
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                graphs = 0
                for number, wire, v in _fields(buf, 0, size):
                    if number == 7 and wire == 2:
                        _graph(buf, v, summary, 0)
                        graphs += 1
                    elif number == 14 and wire == 2:
                        key, value = _string_pair(buf, v)
                        summary.metadata[key] = value
                    elif number == 8 and wire == 2:  # opset_import: domain (1), version (2)
                        domain, version = "", 0
                        for n, w, ov in _fields(buf, *v):
                            if n == 1 and w == 2:
                                domain = _text(buf, ov)
                            elif n == 2 and w == 0:
                                version = _signed(ov)
                        summary.opsets["" if domain == "ai.onnx" else domain] = version
                if not graphs:
                    raise _Truncated
                # Protobuf merges a message field that occurs more than once (a writer may
                # stream the graph in parts), so the graph is whole only here. Before IR 4
                # every initializer was also listed as an input; it is not one to feed.
                summary.inputs = [i for i in summary.inputs if i.name not in summary.initializers]
    except _Truncated:
        raise UserError(f"{path} is not a readable ONNX model (truncated or another format)",
                        stage=stage, hint="re-export it with `qcexport convert`") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e.strerror or e}", stage=stage) from None
    return summary

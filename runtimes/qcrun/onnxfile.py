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


@dataclass
class GraphSummary:
    """The facts qcrun reads from a model: op counts (subgraphs included), initializer
    element types, model metadata and the external data files its tensors name."""

    ops: Counter = field(default_factory=Counter)  # op_type -> count
    initializer_types: Counter = field(default_factory=Counter)  # TensorProto data_type -> count
    metadata: dict[str, str] = field(default_factory=dict)
    external_files: set[str] = field(default_factory=set)

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


def _tensor(buf, span, summary: GraphSummary) -> None:
    data_type, external, location = 0, False, None
    for number, wire, v in _fields(buf, *span):
        if number == 2 and wire == 0:
            data_type = v
        elif number == 14 and wire == 0:
            external = v == 1
        elif number == 13 and wire == 2:
            key, value = _string_pair(buf, v)
            if key == "location":
                location = value
    summary.initializer_types[data_type] += 1
    if external and location is not None:
        summary.external_files.add(location)


def _graph(buf, span, summary: GraphSummary, depth: int) -> None:
    if depth > 32:
        raise _Truncated
    for number, wire, v in _fields(buf, *span):
        if wire != 2:
            continue
        if number == 1:  # node
            _node(buf, v, summary, depth)
        elif number == 5:  # initializer
            _tensor(buf, v, summary)
        elif number == 15:  # sparse_initializer: values (1) is a TensorProto
            for n, w, sv in _fields(buf, *v):
                if n == 1 and w == 2:
                    _tensor(buf, sv, summary)


def _node(buf, span, summary: GraphSummary, depth: int) -> None:
    op_type = ""
    for number, wire, v in _fields(buf, *span):
        if wire != 2:
            continue
        if number == 4:
            op_type = _text(buf, v)
        elif number == 5:  # attribute: a graph (6), graphs (11) or a tensor (5: Constant)
            for n, w, av in _fields(buf, *v):
                if w != 2:
                    continue
                if n in (6, 11):
                    _graph(buf, av, summary, depth + 1)
                elif n == 5:
                    _tensor(buf, av, summary)
    summary.ops[op_type] += 1


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
                if not graphs:
                    raise _Truncated
    except _Truncated:
        raise UserError(f"{path} is not a readable ONNX model (truncated or another format)",
                        stage=stage, hint="re-export it with `qcexport convert`") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read: {e.strerror or e}", stage=stage) from None
    return summary

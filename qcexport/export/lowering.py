"""Attention lowering: from the exporter's opset-23 graph to the form a target accepts.

Three attention forms (a target lists the ones it reads, ``qcrun.targets``):

- ``onnx``: the standard opset-23 ``Attention`` node, as the dynamo exporter emits it for
  ``F.scaled_dot_product_attention``; nothing to do here.
- ``ort``: ``com.microsoft.MultiHeadAttention``. Each ``Attention`` node on 4-D q/k/v is
  rewritten in place: q/k/v go to [B, L, H*Dh], the boolean mask becomes an additive bias,
  and rows that may attend to nothing are zeroed afterwards (the contrib op would return
  mean(V) there, the standard op and PyTorch return zeros).
- ``decomposed``: MatMul/Softmax, exported from the math path at opset 18 and brought down to
  opset 17 by :func:`downgrade_to_opset17` (onnx's version converter fails on these graphs).

Every function walks ``If``/``Loop`` subgraphs too: routed models keep attention in branches.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from qcrun.errors import UserError
from qcrun.graphs import all_graphs

from qcexport.export import save

FORMS = ("onnx", "ort", "decomposed")
MS_DOMAIN = "com.microsoft"
# Additive bias for a masked key: finite so fp16 conversion stays free of -inf arithmetic.
MASKED_BIAS = -10000.0


def count_ops(model: onnx.ModelProto) -> Counter:
    """Op counts over the whole model, subgraphs included, keyed 'domain::Op' for non-default."""
    counts: Counter = Counter()
    for graph in all_graphs(model.graph):
        for node in graph.node:
            key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            counts[key] += 1
    return counts


def fused_attention_count(model: onnx.ModelProto, form: str) -> int:
    """Fused attention nodes of ``form`` in the model (0 for the decomposed form)."""
    counts = count_ops(model)
    if form == "onnx":
        return counts["Attention"]
    if form == "ort":
        return counts[f"{MS_DOMAIN}::MultiHeadAttention"]
    return 0


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy that never serialises the whole model (over 2 GB that fails)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers keep their type and shape but not their bytes (marked
    external): small enough to serialise for shape inference at any model size. A staged
    model (its large tensors already external) is returned as it is."""
    if not any(len(t.raw_data) > save.INLINE_TENSOR_BYTES
               for g in all_graphs(model.graph) for t in g.initializer):
        return model
    skeleton = copy_model(model)
    for graph in all_graphs(skeleton.graph):
        for t in graph.initializer:
            if len(t.raw_data) > save.INLINE_TENSOR_BYTES:  # shape constants stay inline
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                t.external_data.add(key="location", value="weightless.data")
    return skeleton


def check_model(model: onnx.ModelProto, base_dir: Path | None = None) -> None:
    """``onnx.checker.check_model`` and strict type/shape inference at any size.

    A model in memory is checked as it is. A staged model (``qcexport.export.save``: its
    weights external, in ``base_dir``) or one over the protobuf limit is checked from disk,
    where the checker also proves every external tensor's file is there; neither path
    serialises the weights.
    """
    if not save.has_external_data(model) and not save.is_large(model):
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True)
        return
    with tempfile.TemporaryDirectory(prefix="qcexport-check-") as tmp:
        if save.has_external_data(model):
            if base_dir is None:
                raise ValueError("a staged model is checked in its staging directory: pass "
                                 "base_dir")
            fd, name = tempfile.mkstemp(dir=base_dir, prefix=".check-", suffix=".onnx")
            os.close(fd)
            path = Path(name)
            path.write_bytes(model.SerializeToString())
        else:
            path = Path(tmp) / "model.onnx"
            save.save_model_atomic(model, path)
        try:
            onnx.checker.check_model(str(path))
            onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"),
                                                   check_type=True)
        finally:
            if path.parent != Path(tmp):
                path.unlink(missing_ok=True)


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes of every value, with None for symbolic dims, after shape inference."""
    inferred = onnx.shape_inference.infer_shapes(weightless(model), data_prop=True)
    dims: dict[str, list[int | None]] = {}
    for graph in all_graphs(inferred.graph):
        for vi in [*graph.value_info, *graph.input, *graph.output]:
            t = vi.type.tensor_type
            if t.HasField("shape"):
                dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return dims


class _Names:
    def __init__(self, model: onnx.ModelProto):
        self.used = {n for g in all_graphs(model.graph) for node in g.node for n in node.output}
        self.count = 0

    def __call__(self, base: str) -> str:
        while True:
            self.count += 1
            name = f"{base}__mha{self.count}"
            if name not in self.used:
                self.used.add(name)
                return name


def to_ort_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every opset-23 ``Attention`` node as ``com.microsoft.MultiHeadAttention``."""
    model = copy_model(model)
    dims = _static_dims(model)
    fresh = _Names(model)
    for graph in all_graphs(model.graph):
        nodes = []
        for node in graph.node:
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                nodes.extend(_mha_nodes(node, graph, dims, fresh))
            else:
                nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def _mha_nodes(node, graph, dims, fresh) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # Attributes at their defaults (is_causal=0, softcap=0, qk_matmul_output_mode=0) are fine.
    unsupported = sorted(k for k, v in attrs.items() if k not in ("scale", "softmax_precision") and v)
    if unsupported or any(node.output[1:]):
        raise UserError(
            f"Attention node {node.name!r} uses {unsupported} or extra outputs, which the "
            "com.microsoft.MultiHeadAttention rewrite does not cover",
            stage="lower",
            hint="use --attention onnx or --attention decomposed for this module",
        )
    q, k, v = node.input[:3]
    mask = node.input[3] if len(node.input) > 3 and node.input[3] else None
    q_shape = dims.get(q)
    if not q_shape or len(q_shape) != 4 or q_shape[1] is None or q_shape[3] is None:
        raise UserError(
            f"Attention node {node.name!r}: query shape {q_shape} is not 4-D with static heads "
            "and head size",
            stage="lower",
            hint="use --attention onnx or --attention decomposed",
        )
    heads, head_dim = q_shape[1], q_shape[3]
    out = []
    shape_3d = fresh("shape_b_l_hd")
    shape_4d = fresh("shape_b_l_h_d")
    out.append(helper.make_node("Constant", [], [shape_3d], value=numpy_helper.from_array(
        np.array([0, 0, heads * head_dim], dtype=np.int64))))
    out.append(helper.make_node("Constant", [], [shape_4d], value=numpy_helper.from_array(
        np.array([0, 0, heads, head_dim], dtype=np.int64))))

    def to_3d(name):  # [B, H, L, Dh] -> [B, L, H*Dh]
        t, r = fresh(name + "_bshd"), fresh(name + "_bsd")
        out.append(helper.make_node("Transpose", [name], [t], perm=[0, 2, 1, 3]))
        out.append(helper.make_node("Reshape", [t, shape_3d], [r]))
        return r

    q3, k3, v3 = to_3d(q), to_3d(k), to_3d(v)
    inputs = [q3, k3, v3]
    if mask is not None:
        bias, zero, neg = fresh("attn_bias"), fresh("zero"), fresh("neg")
        out.append(helper.make_node("Constant", [], [zero], value=numpy_helper.from_array(np.array(0.0, np.float32))))
        out.append(helper.make_node("Constant", [], [neg], value=numpy_helper.from_array(np.array(MASKED_BIAS, np.float32))))
        out.append(helper.make_node("Where", [mask, zero, neg], [bias]))  # [B|1, 1|H, Lq, Lk]
        inputs += ["", "", bias]  # bias, key_padding_mask, attention_bias
    mha = fresh("mha_out")
    kwargs = {"num_heads": heads}
    if "scale" in attrs:
        kwargs["scale"] = float(attrs["scale"])
    out.append(helper.make_node("MultiHeadAttention", inputs, [mha], domain=MS_DOMAIN,
                                name=(node.name or "attention") + "_mha", **kwargs))
    r4, t4 = fresh("mha_bshd"), fresh("mha_bhsd")
    out.append(helper.make_node("Reshape", [mha, shape_4d], [r4]))
    result = node.output[0] if mask is None else t4
    out.append(helper.make_node("Transpose", [r4], [result], perm=[0, 2, 1, 3]))
    if mask is not None:
        # Zero the rows with no visible key: [B, 1|H, Lq, 1]
        as_float, any_key = fresh("mask_f"), fresh("row_visible")
        out.append(helper.make_node("Cast", [mask], [as_float], to=onnx.TensorProto.FLOAT))
        axes = fresh("axes")
        out.append(helper.make_node("Constant", [], [axes], value=numpy_helper.from_array(np.array([-1], np.int64))))
        out.append(helper.make_node("ReduceMax", [as_float, axes], [any_key], keepdims=1))
        out.append(helper.make_node("Mul", [t4, any_key], [node.output[0]]))
    for n in out:
        if n.op_type != "Constant":
            n.metadata_props.extend(node.metadata_props)  # keep the PyTorch module names
    return out


# Reduce ops whose ``axes`` moved from attribute to input in opset 18.
_REDUCE_18 = {
    "ReduceMax", "ReduceMin", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}


def downgrade_to_opset17(model: onnx.ModelProto, base_dir: Path | None = None
                         ) -> onnx.ModelProto:
    """Bring an opset-18 model down to opset 17 (for TensorRT 10.3 and old runtimes).

    Handles what changed between the two for the ops our graphs use: Reduce* ``axes`` as an
    input (18) versus an attribute (17), and Split's ``num_outputs``. Constant axes are needed;
    a model that computes them at run time cannot go to 17 and is reported. ``base_dir``: where
    a staged model's weights are (see ``check_model``).
    """
    model = copy_model(model)
    consts = _constants(model)
    dims = _static_dims(model)
    for graph in all_graphs(model.graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in _REDUCE_18:
                _reduce_axes_to_attribute(node, consts)
            elif node.op_type == "Split":
                _split_to_17(node, graph, dims)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 17
    check_model(model, base_dir)
    return model


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    consts = {}
    for graph in all_graphs(model.graph):
        for init in graph.initializer:
            if init.data_location != onnx.TensorProto.EXTERNAL:  # weights: staged, not axes
                consts[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return consts


def _fail17(node, why: str) -> UserError:
    return UserError(
        f"cannot express node {node.name!r} ({node.op_type}) at opset 17: {why}",
        stage="lower",
        hint="use --opset 18 with --attention decomposed (TensorRT 10.x parses opset 18)",
    )


def _reduce_axes_to_attribute(node, consts) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axes = None
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in consts:
            raise _fail17(node, "its axes are computed at run time")
        axes = [int(a) for a in consts[node.input[1]].reshape(-1)]
        del node.input[1:]
    if attrs.get("noop_with_empty_axes") and not axes:
        raise _fail17(node, "noop_with_empty_axes has no opset-17 equivalent")
    keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
    del node.attribute[:]
    node.attribute.extend(keep)
    if axes:
        node.attribute.append(helper.make_attribute("axes", axes))


def _split_to_17(node, graph, dims) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "num_outputs" not in attrs:
        return  # split sizes given as input: valid at 13-17 too
    axis = attrs.get("axis", 0)
    shape = dims.get(node.input[0])
    n = attrs["num_outputs"]
    if not shape or shape[axis] is None or shape[axis] % n:
        raise _fail17(node, "Split by num_outputs over a dynamic or uneven axis")
    sizes = helper.make_tensor(node.name + "_sizes", onnx.TensorProto.INT64, [n], [shape[axis] // n] * n)
    graph.initializer.append(sizes)
    node.input.append(sizes.name)
    keep = [a for a in node.attribute if a.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(keep)

"""OpenVINO IR beside (or instead of) model.onnx, and shapes fixed at load time.

A model directory or bundle may hold the model twice: ``model.onnx`` for every engine, and
OpenVINO's own IR (``model.xml`` + ``model.bin``, written by ``qcexport ir``), which OpenVINO
reads without parsing and converting ONNX again at every load. Which file a target reads is
the engine's declaration (``Engine.formats``, preferred first), never a branch on the engine:
``qcrun.engines.model_file`` (``ModelFiles.pick``) takes the first format the engine reads
that the model has, and refuses an IR-only model on an engine that reads ONNX only, saying how to make ONNX.

Fixed axes: an app that always feeds one shape names the symbolic axes it fixes
(``{"batch": 1, "tokens": 257}``, by the manifest's axis roles or by the axis labels);
``resolve_fix_axes`` turns them into axis labels, ``fixed_shapes`` into per-input shapes
(the engines apply them: onnxruntime's free-dimension overrides, OpenVINO's ``reshape``), and
``contradicting_cases`` says which golden cases no longer fit.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcrun.choices import stored_precision
from qcrun.errors import UserError
from qcrun.targets import Target

IR_XML = "model.xml"
IR_BIN = "model.bin"
#: The command that writes IR beside a model directory's ONNX.
IR_COMMAND = "qcexport ir MODEL_DIR"

# --- which file an engine reads --------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """The model files of one model, by format: ONNX, OpenVINO IR (its .xml), or both."""

    onnx: Path | None
    ir: Path | None = None
    label: str = "the model"

    @property
    def primary(self) -> Path:
        """The file that names the model in reports: ONNX when there is one."""
        return self.onnx or self.ir

    def formats(self) -> list[str]:
        return [f for f, p in (("onnx", self.onnx), ("ir", self.ir)) if p is not None]

    def pick(self, t: Target, engine: str, formats: Sequence[str]) -> Path:
        """The file an engine reading ``formats`` (preferred first) takes, or a UserError
        saying why it reads none of them and the command that makes one. Called through
        ``qcrun.engines.model_file``, which knows each target's engine."""
        by_format = {"onnx": self.onnx, "ir": self.ir}
        for fmt in formats:
            if by_format.get(fmt) is not None:
                return by_format[fmt]
        raise UserError(
            f"{self.label} holds only OpenVINO IR ({self.ir.name if self.ir else '?'}), and "
            f"{t.name} runs on {engine}, which reads {' or '.join(formats)} only",
            stage="load",
            hint="run it on an OpenVINO target (openvino-cpu, openvino-gpu), or make ONNX of "
            "the model: `qcexport convert` it again (an int8-nncf model: `qcexport quantize "
            "DIR --precision int8-static` for onnxruntime)")


# --- the IR's own precision, read from its XML (no openvino needed) ---------------------------

_HALF = {"f16", "bf16"}
_INT8 = {"i8", "u8", "i4", "u4"}


def ir_precision(xml_path: str | Path) -> str:
    """What an IR graph stores, from its layers (not from any label): "int8" with
    FakeQuantize layers or 8/4-bit weights, "fp16" with half-precision constants (the weights
    ``openvino.save_model`` compresses by default), else "fp32"."""
    try:
        root = ElementTree.parse(str(xml_path)).getroot()
    except (OSError, ElementTree.ParseError) as e:
        raise UserError(f"{xml_path} is not readable OpenVINO IR: {e}", stage="manifest",
                        hint=f"write it again with `{IR_COMMAND}`") from None
    types, consts = set(), set()
    for layer in root.iter("layer"):
        types.add(layer.get("type"))
        if layer.get("type") == "Const":
            data = layer.find("data")
            if data is not None:
                consts.add(data.get("element_type"))
    if "FakeQuantize" in types or consts & _INT8:
        return "int8"
    if consts & _HALF:
        return "fp16"
    return "fp32"


def expected_ir_precision(precision: str) -> str:
    """What the IR of a model declared ``precision`` stores (``ir_precision``'s names)."""
    stored = stored_precision(precision)
    return "int8" if stored.startswith("int8") else stored


# --- fixed axes ------------------------------------------------------------------------------


def _axis_labels(input_shapes: Mapping[str, Sequence[Any]]) -> list[str]:
    labels: list[str] = []
    for shape in input_shapes.values():
        for dim in shape or ():
            if isinstance(dim, str) and dim not in labels:
                labels.append(dim)
    return labels


def resolve_fix_axes(fix_axes: Mapping[str, Any], input_shapes: Mapping[str, Sequence[Any]],
                     roles: Mapping[str, str] | None = None, *, flag: str = "fix_axes"
                     ) -> dict[str, int]:
    """``{"batch": 1, "tokens": 257}`` (axis roles or labels) -> {axis label: size}.

    An axis no input has, a size below 1 or one role and its label given twice with two
    sizes is a UserError listing the axes that can be fixed."""
    labels = _axis_labels(input_shapes)
    roles = {r: a for r, a in (roles or {}).items() if a in labels}
    names = sorted(set(labels) | set(roles))
    fixed: dict[str, int] = {}
    for name, value in fix_axes.items():
        label = roles.get(name, name)
        if label not in labels:
            raise UserError(f"{flag}: {name!r} is not a symbolic axis of the model (its axes: "
                            f"{', '.join(names) or 'none, every axis is fixed'})",
                            stage="load", hint="name an axis by its role or label, e.g. "
                            + (f"{names[0]}=1" if names else "nothing: the shapes are fixed"))
        try:
            size = int(value)
        except (TypeError, ValueError):
            size = 0
        if isinstance(value, bool) or size < 1 or size != value:
            raise UserError(f"{flag}: {name}={value!r} is not a size (a whole number >= 1)",
                            stage="load", hint=f"e.g. {name}=1")
        if fixed.get(label, size) != size:
            raise UserError(f"{flag}: axis {label!r} is given two sizes ({fixed[label]} and "
                            f"{size})", stage="load", hint="give each axis one size")
        fixed[label] = size
    return fixed


def fixed_shapes(input_shapes: Mapping[str, Sequence[Any]], axes: Mapping[str, int]
                 ) -> dict[str, list[Any]]:
    """Each input's shape with the fixed axes' sizes put in (other symbolic axes kept)."""
    return {name: [axes.get(d, d) if isinstance(d, str) else d for d in shape or ()]
            for name, shape in input_shapes.items()}


def contradicting_cases(cases: Iterable[tuple[str, Mapping[str, Sequence[int]]]],
                        input_shapes: Mapping[str, Sequence[Any]], axes: Mapping[str, int]
                        ) -> dict[str, str]:
    """Golden cases ``(name, {input: shape})`` whose shapes contradict the fixed ``axes``,
    with the reason for each: a model fixed there cannot run them."""
    refused = {}
    for name, shapes in cases:
        clashes = []
        for input_name, spec in input_shapes.items():
            actual = shapes.get(input_name)
            if actual is None:
                continue
            for dim, size in zip(spec or (), actual, strict=False):
                if isinstance(dim, str) and dim in axes and int(size) != axes[dim]:
                    clashes.append(f"{input_name!r} has {dim}={int(size)}")
        if clashes:
            fixed = ", ".join(f"{a}={s}" for a, s in axes.items())
            refused[name] = (f"its shapes contradict the fixed axes {fixed} "
                             f"({'; '.join(dict.fromkeys(clashes))})")
    return refused

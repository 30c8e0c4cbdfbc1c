"""The closed sets of names that model files, targets and tolerance policies share.

A manifest's precision and attention form, a target's accepted forms and precisions and a
policy's tolerance keys are checked against these sets; they live at the bottom of qcrun so
that every layer can check against them without importing the layer that uses them most.
"""

from __future__ import annotations

ATTENTION_FORMS = ("onnx", "ort", "decomposed")
# bf16 is a precision the engine computes in (OpenVINO CPU's INFERENCE_PRECISION_HINT), not
# one stored in the graph; int8-nncf is NNCF's post-training quantization, saved as OpenVINO IR.
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static", "bf16", "int8-nncf")
TOLERANCE_FIELDS = ("max_abs", "max_rel", "min_cosine")

#: The precision of the stored graph, for precisions that differ from it: a bf16 model is an
#: fp32 graph that the engine is told to compute in bf16.
STORED_PRECISION = {"bf16": "fp32"}

#: The precision floating-point operations compute in, per declared precision: an int8 model
#: keeps its non-quantized operations in fp32, and an fp32 model is never computed in less.
FLOAT_PRECISION = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8-dynamic": "fp32",
                   "int8-static": "fp32", "int8-nncf": "fp32"}


def stored_precision(precision: str) -> str:
    """The precision of the graph that a model declared ``precision`` stores."""
    return STORED_PRECISION.get(precision, precision)

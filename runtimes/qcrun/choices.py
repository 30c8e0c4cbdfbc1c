"""The closed sets of names that model files, targets and tolerance policies share.

A manifest's precision and attention form, a target's accepted forms and precisions and a
policy's tolerance keys are checked against these sets; they live at the bottom of qcrun so
that every layer can check against them without importing the layer that uses them most.
"""

from __future__ import annotations

ATTENTION_FORMS = ("onnx", "ort", "decomposed")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
TOLERANCE_FIELDS = ("max_abs", "max_rel", "min_cosine")

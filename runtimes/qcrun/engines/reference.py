"""onnx.reference: ``ReferenceEvaluator``, slow, pure Python, a second opinion on kernels.

The evaluator is not known to be thread-safe: calls are serialised by a lock.
"""

from __future__ import annotations

import importlib
import threading

import numpy as np

from qcrun.engines.base import Adapter, Engine, TensorInfo, missing
from qcrun.errors import import_engine
from qcrun.targets import Target

NAME = "onnx-reference"


class ReferenceAdapter(Adapter):
    """``onnx.reference.ReferenceEvaluator``: slow, pure Python, a second opinion on kernels."""

    engine = NAME
    concurrency = "calls serialised by a lock"
    known_options = frozenset()

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self._evaluator = None
        self._lock = threading.Lock()

    def _load(self):
        onnx = import_engine("onnx")
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(self.model_path))
        self._evaluator = ReferenceEvaluator(model)
        initializers = {t.name for t in model.graph.initializer}
        inputs = [_info(onnx, v) for v in model.graph.input if v.name not in initializers]
        return inputs, [_info(onnx, v) for v in model.graph.output]

    def _run(self, feed):
        names = [o.name for o in self._outputs]
        with self._lock:
            results = self._evaluator.run(names, feed)
        return {name: np.asarray(r) for name, r in zip(names, results, strict=True)}

    def _close(self):
        self._evaluator = None


def _info(onnx, value_info) -> TensorInfo:
    tensor = value_info.type.tensor_type
    try:
        dtype = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    except Exception:  # undefined or exotic element types have no numpy equivalent
        dtype = None
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    return TensorInfo(value_info.name, dtype, shape)


class ReferenceEngine(Engine):
    name = NAME
    adapter = ReferenceAdapter

    def availability(self, target: Target) -> tuple[bool, str]:
        try:
            onnx = importlib.import_module("onnx")
            importlib.import_module("onnx.reference")
        except ImportError as e:
            return missing("onnx", e)
        return True, f"onnx {getattr(onnx, '__version__', '?')} ReferenceEvaluator"


ENGINE = ReferenceEngine()

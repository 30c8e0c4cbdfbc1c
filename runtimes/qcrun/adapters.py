"""The runners, by their old address: they live in ``qcrun.engines`` (one module per engine).

Kept while code outside qcrun's engines still imports from here; new code imports
``qcrun.engines``.
"""

from __future__ import annotations

from qcrun.engines import (
    ENGINES,
    Adapter,
    LoadFailed,
    RunFailed,
    TargetUnavailable,
    TensorInfo,
    adapter_for,
    describe,
    open_adapter,
)
from qcrun.engines.base import Dim
from qcrun.engines.ort import OrtAdapter
from qcrun.engines.ov import OpenVinoAdapter
from qcrun.engines.reference import ReferenceAdapter

#: engine name -> adapter class
ADAPTERS: dict[str, type[Adapter]] = {name: e.adapter for name, e in ENGINES.items()}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Dim",
    "LoadFailed",
    "OpenVinoAdapter",
    "OrtAdapter",
    "ReferenceAdapter",
    "RunFailed",
    "TargetUnavailable",
    "TensorInfo",
    "adapter_for",
    "describe",
    "open_adapter",
]

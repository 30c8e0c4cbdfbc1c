"""qcrun: the torch-free edge runtime of qcexport.

Importing this package must never import torch (a test proves it): everything here runs on a
device that has only numpy and an inference engine.
"""

from qcrun.errors import UserError

__version__ = "0.1.0"
__all__ = ["Model", "UserError", "__version__", "load"]

# The embedding API (qcrun.api) is imported on first use, so that `import qcrun` stays a
# few milliseconds and imports neither numpy nor an engine.
_LAZY = {"load": "qcrun.api", "Model": "qcrun.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qcrun' has no attribute {name!r}")

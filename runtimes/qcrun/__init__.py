"""qcrun: the torch-free edge runtime of qcexport.

Importing this package must never import torch (a test proves it): everything here runs on a
device that has only numpy and an inference engine.
"""

from qcrun.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]

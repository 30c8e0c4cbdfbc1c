"""The mechanism zoo: reference PyTorch modules and their registry.

    from qcexport import mechanisms
    module = mechanisms.create("qformer", preset="tiny")
    spec = mechanisms.get("qformer")
"""

from qcexport.mechanisms import (  # noqa: F401  (registration happens on import)
    flamingo_resampler,
    flamingo_xattn,
    matryoshka,
    perceiver,
    qformer,
    routing,
)
from qcexport.mechanisms.registry import (
    AxisRoles,
    Case,
    MechanismSpec,
    create,
    describe,
    get,
    names,
    parameter_count,
)

__all__ = ["AxisRoles", "Case", "MechanismSpec", "create", "describe", "get", "list", "names", "parameter_count"]


def list() -> list[str]:  # noqa: A001  (the registry's public name, as in timm.list_models)
    return names()

"""What a mechanism's attention maps are, as data on its spec (``MechanismSpec.maps``).

A mechanism file says which of its submodules are cross-attention cores, how their inputs
are read, and what the map axes hold; ``qcexport.export.maps`` turns such a plan into
extra model outputs without knowing which mechanism it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

MAP_PREFIX = "attn_map."
# Keys a map ranges over: the visual tokens; the visual tokens followed by the latents
# (a resampler); every media item's tokens, media-major (gated cross-attention); or latents
# only (an output-query decoder), which have no patch grid.
KEY_KINDS = ("visual", "visual+latents", "media", "latents")


@dataclass(frozen=True)
class MapSite:
    """One attention map: which core's weights it holds and where its inputs are captured.

    ``hook`` is the module whose call is captured (default: the core itself, whose inputs
    are (x, context, mask)); ``inputs(hooked module, bound arguments)`` then returns
    (queries input, context, mask, gate), where ``gate`` (or None) multiplies the map: 0 for
    a routed branch that did not run.
    """

    core: str
    layer: int
    label: str
    keys: str = "visual"
    same_queries: bool = True  # the map's queries are the queries of the main output
    hook: str = ""
    inputs: Callable[[nn.Module, Mapping[str, Any]], tuple] | None = None

    def __post_init__(self):
        if self.keys not in KEY_KINDS:
            raise ValueError(f"map keys {self.keys!r} is not one of {KEY_KINDS}")


@dataclass(frozen=True)
class Extra:
    """A diagnostic output other than a map: ``compute(module, taps, inputs) -> tensor``,
    ``taps`` holding the inputs and outputs of the watched submodules during the forward."""

    name: str
    watch: tuple[str, ...]  # module paths whose inputs and outputs ``compute`` reads
    compute: Callable[[nn.Module, Any, Mapping[str, Any]], Any]
    axes: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MapPlan:
    """What the maps of one mechanism are, and how to read them."""

    sites: Callable[[nn.Module], list[MapSite]]
    visual_input: str
    token_axis: int
    queries: str  # what the query axis of a map holds
    query_output: str | None  # regular output whose axis -2 holds the same queries
    media_axis: int | None = None
    rows: str = "batch"  # what the leading axis of a map holds
    # "q" (queries: q0, q1...) or "t" (text tokens: t0, t1...): how a report names a map row
    query_prefix: str = "q"
    extras: Callable[[nn.Module], list[Extra]] = lambda module: []
    describe: Callable[[nn.Module], dict[str, Any]] = lambda module: {}

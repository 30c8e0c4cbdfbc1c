"""Attention maps as extra model outputs.

``with_attention_maps(module, mechanism, output_names)`` wraps a mechanism so that its forward
returns the regular outputs, unchanged, followed by the cross-attention weights of every layer
and the diagnostic extras of the mechanism's plan (e.g. gate values). Which submodules are
cross-attention cores, and how their inputs are read, is the mechanism's own data: the
``maps`` plan on its spec (``qcexport.mechanisms.map_plan``). The wrapper can be run in eager
mode or exported like any module.

How the weights are obtained: forward pre-hooks capture the inputs of each cross-attention
core, and the weights are recomputed from them with the core's math path
(``attend(..., fused=False, return_weights=True)``): softmax(QK^T / sqrt(d)) with the same
boolean mask and the same zeroed rows for queries that see nothing. The core itself is left
alone, so the regular outputs still come from the fused ``Attention`` node and stay identical
to the model without maps. (torch's SDPA does not return its probabilities, so the fused
op's own probability output is not reachable from an export; the extra MatMul/Softmax is the
price of the maps.)

Cores that run inside ``torch.cond`` cannot be hooked (no tensor may leave a branch except
through its outputs): a plan then captures the enclosing module, outside the ``If``, and
returns a gate that zeroes the map of a branch that did not run.

Map outputs are named ``attn_map.<core path>`` and shaped [rows, queries, keys] (heads
averaged) or [rows, heads, queries, keys] (``heads="each"``). ``maps_descriptor()`` gives the
data that tells a reader (``qcrun inspect``, ``qcexport inspect``) what every extra output
holds; ``convert_mechanism(..., with_attention_maps=True)`` stores it in the manifest under
``attention_maps``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from qcrun.errors import UserError, unknown_choice
from torch import nn

from qcexport import mechanisms
from qcexport.mechanisms.attention import MultiHeadAttention, attend
from qcexport.mechanisms.map_plan import (  # noqa: F401  (re-exported: the plan's vocabulary)
    KEY_KINDS,
    MAP_PREFIX,
    Extra,
    MapPlan,
    MapSite,
)

DESCRIPTOR_FORMAT = 1
HEAD_MODES = ("mean", "each")


# --- capturing module calls ------------------------------------------------------------------


class Taps:
    """The inputs and output of the first call of each watched submodule during one forward.

    Hooks are registered for the duration of a ``with`` block only, so the wrapped module is
    never left with a hook (and never holds a tensor) after the forward.
    """

    def __init__(self, root: nn.Module, paths):
        self.root = root
        self.paths = list(dict.fromkeys(paths))
        self.inputs: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, Any] = {}
        self._handles: list = []

    def __enter__(self) -> Taps:
        for path in self.paths:
            module = self.root.get_submodule(path)
            signature = inspect.signature(module.forward)

            def pre(mod, args, kwargs, path=path, signature=signature):
                if path not in self.inputs:
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    self.inputs[path] = dict(bound.arguments)

            def post(mod, args, kwargs, output, path=path):
                self.outputs.setdefault(path, output)

            self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def input(self, path: str) -> dict[str, Any]:
        if path not in self.inputs:
            raise RuntimeError(f"{path} was not called during the forward: no attention map")
        return self.inputs[path]


def attention_probs(
    core: MultiHeadAttention, x: torch.Tensor, context: torch.Tensor | None, mask
) -> torch.Tensor:
    """The core's attention weights [B, H, Lq, Lk] by its math path (what SDPA computes)."""
    context = x if context is None else context
    q = core._split(core.to_q(x))  # [B, H, Lq, Dh]
    k = core._split(core.to_k(context))  # [B, H, Lk, Dh]
    # v only shapes the discarded weighted sum; k stands in for it and the exporter drops it.
    _, weights = attend(q, k, k, mask, fused=False, return_weights=True)
    return weights


def _core_inputs(core: nn.Module, args: Mapping[str, Any]) -> tuple:
    return args["x"], args["context"], args["mask"], None


# --- the wrapper -----------------------------------------------------------------------------


class AttentionMaps:
    """Mixin of a module whose forward also returns attention maps (and diagnostic extras).

    :func:`with_attention_maps` makes the wrapped module an instance of a subclass of its own
    class that shares its parameters and submodules: parameter names, and so the weights hash
    and the ONNX initializer names, stay those of the module without maps.
    """

    def _init_maps(self, mechanism: str, output_names, heads: str) -> None:
        if heads not in HEAD_MODES:
            raise unknown_choice("map head mode", heads, HEAD_MODES, flag="--map-heads")
        self.maps_mechanism = mechanism
        self.maps_heads = heads
        spec = spec_with_maps(mechanism)
        self.maps_plan = spec.maps
        # recorded so that `qcrun inspect --random` makes inputs of the example's sizes
        self.maps_example_sizes = spec.example_sizes(self.config)
        self.maps_sites = self.maps_plan.sites(self)
        self.maps_extras = self.maps_plan.extras(self)
        self.maps_base_output_names = list(output_names)
        names = self.output_names
        if len(set(names)) != len(names):
            raise RuntimeError(f"{mechanism}: duplicate output names {names}")
        for site in self.maps_sites:
            if not isinstance(self.get_submodule(site.core), MultiHeadAttention):
                raise RuntimeError(f"{mechanism}: {site.core} is not an attention core")

    @property
    def map_names(self) -> list[str]:
        return [MAP_PREFIX + site.core for site in self.maps_sites]

    @property
    def output_names(self) -> list[str]:
        return [*self.maps_base_output_names, *self.map_names, *(e.name for e in self.maps_extras)]

    def _forward_with_maps(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        watched = [s.hook or s.core for s in self.maps_sites]
        watched += [p for e in self.maps_extras for p in e.watch]
        with Taps(self, watched) as taps:
            out = self._base_forward(self, **inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if len(outs) != len(self.maps_base_output_names):
            raise RuntimeError(f"{self.maps_mechanism}: {len(outs)} outputs for names "
                               f"{self.maps_base_output_names}")
        maps = []
        for site in self.maps_sites:
            path = site.hook or site.core
            read_inputs = site.inputs or _core_inputs
            x, context, mask, gate = read_inputs(self.get_submodule(path), taps.input(path))
            probs = attention_probs(self.get_submodule(site.core), x, context, mask)
            if gate is not None:
                probs = probs * gate
            maps.append(probs.mean(dim=1) if self.maps_heads == "mean" else probs)
        extras = [e.compute(self, taps, inputs) for e in self.maps_extras]
        return (*outs, *maps, *extras)

    def maps_dynamic_axes(self, base: Mapping[str, Mapping[int, str]]) -> dict[str, dict]:
        """``base`` (the spec's axes) plus the axes of every map and extra output."""
        axes = {k: dict(v) for k, v in base.items()}
        key_axis = 2 if self.maps_heads == "mean" else 3
        # a map's rows are the visual input's leading axis, its visual keys the token axis
        visual = base.get(self.maps_plan.visual_input, {})
        rows = visual.get(0) if self.maps_plan.rows == "batch" else None
        tokens = visual.get(self.maps_plan.token_axis)
        for name, site in zip(self.map_names, self.maps_sites, strict=True):
            entry = {0: rows} if rows else {}
            if site.keys == "visual" and tokens:
                entry[key_axis] = tokens
            axes[name] = entry
        for extra in self.maps_extras:
            axes[extra.name] = dict(extra.axes)
        return axes

    def maps_descriptor(self) -> dict[str, Any]:
        """Plain data that says what every extra output holds (stored in the manifest)."""
        maps = []
        for name, site in zip(self.map_names, self.maps_sites, strict=True):
            maps.append({
                "output": name,
                "core": site.core,
                "layer": site.layer,
                "label": site.label,
                "keys": site.keys,
                "heads": self.get_submodule(site.core).heads,
                "same_queries": site.same_queries,
            })
        return {
            "format": DESCRIPTOR_FORMAT,
            "mechanism": self.maps_mechanism,
            "heads": self.maps_heads,
            "visual_input": self.maps_plan.visual_input,
            "token_axis": self.maps_plan.token_axis,
            "media_axis": self.maps_plan.media_axis,
            "rows": self.maps_plan.rows,
            "queries": self.maps_plan.queries,
            "query_prefix": self.maps_plan.query_prefix,
            "query_output": self.maps_plan.query_output,
            "maps": maps,
            "example_sizes": dict(self.maps_example_sizes),
            **self.maps_plan.describe(self),
        }


def with_attention_maps(
    module: nn.Module, mechanism: str, output_names, *, heads: str = "mean"
) -> nn.Module:
    """``module`` (mechanism ``mechanism``) that also returns attention maps.

    The result shares ``module``'s parameters and submodules; ``module`` itself is unchanged.
    """
    base = type(module)
    if isinstance(module, AttentionMaps):
        raise RuntimeError("the module already returns attention maps")
    params = inspect.signature(module.forward).parameters
    names = list(params)
    # An optional input (e.g. perceiver-io's run-time queries) keeps its default.
    namespace: dict[str, Any] = {f"_default_{n}": p.default for n, p in params.items()
                                 if p.default is not inspect.Parameter.empty}
    args = ", ".join(n + (f"=_default_{n}" if f"_default_{n}" in namespace else "")
                     for n in names)
    call = ", ".join(f"{n}={n}" for n in names)
    # The exporter binds example inputs by the forward's parameter names: generate a forward
    # with exactly the module's names (a **kwargs forward cannot be bound).
    exec(f"def forward(self, {args}):\n    return self._forward_with_maps(dict({call}))\n",
         namespace)
    cls = type(f"{base.__name__}WithAttentionMaps", (AttentionMaps, base),
               {"forward": namespace["forward"], "_base_forward": staticmethod(base.forward),
                "__module__": __name__})
    wrapped = copy.copy(module)  # a new object over the same parameter and module dicts
    wrapped.__class__ = cls
    wrapped._init_maps(mechanism, output_names, heads)
    return wrapped.eval()


def plan_for(mechanism: str) -> MapPlan:
    """The attention-map plan on the spec of registered mechanism ``mechanism``."""
    return spec_with_maps(mechanism).maps


def spec_with_maps(mechanism: str):
    """The spec of registered mechanism ``mechanism``, which must have an attention-map plan."""
    spec = mechanisms.get(mechanism) if mechanism in mechanisms.names() else None
    if spec is None or spec.maps is None:
        with_maps = sorted(n for n in mechanisms.names() if mechanisms.get(n).maps is not None)
        raise UserError(
            f"attention maps are defined for the built-in mechanisms, not {mechanism!r}",
            stage="maps",
            hint=f"use one of {', '.join(with_maps)}, or drop --with-attention-maps",
        )
    return spec

"""Attention maps as extra model outputs.

``with_attention_maps(module, mechanism, output_names)`` wraps a mechanism so that its forward
returns the regular outputs, unchanged, followed by the cross-attention weights of every layer
(and, for ``flamingo-xattn``, the gate values and the share of the output that came through the
gated visual path). The wrapper can be run in eager mode or exported like any module.

How the weights are obtained: forward pre-hooks capture the inputs of each cross-attention
core, and the weights are recomputed from them with the core's math path
(``attend(..., fused=False, return_weights=True)``): softmax(QK^T / sqrt(d)) with the same
boolean mask and the same zeroed rows for queries that see nothing. The core itself is left
alone, so the regular outputs still come from the fused ``Attention`` node and stay identical
to the model without maps. (torch's SDPA does not return its probabilities, so the fused
op's own probability output is not reachable from an export; the extra MatMul/Softmax is the
price of the maps.)

Routing with ``routing="cond"``: the attention branches run inside ``torch.cond``, where no
tensor may leave a branch except through its outputs, and a hook there would leak one. The
maps of a routed layer are therefore captured at the layer, outside the ``If``: both
attention branches' maps are computed from the layer's inputs, and a map is returned only
for the branch that ran; the other map is all zeros. With ``cond`` the branch that ran is
the batch's choice (what the ``If`` executes), with ``select`` each sample's own choice, with
``soft`` every branch runs (weighted by ``routing_weights``), so both maps are returned. The
regular outputs keep the model's own routing: hard routing stays an ONNX ``If``.

Map outputs are named ``attn_map.<core path>`` and shaped [rows, queries, keys] (heads
averaged) or [rows, heads, queries, keys] (``heads="each"``). ``maps_descriptor()`` gives the
data that tells a reader (``qcrun inspect``, ``qcexport inspect``) what every extra output
holds; ``convert_mechanism(..., with_attention_maps=True)`` stores it in the manifest under
``attention_maps``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from qcrun.errors import UserError, unknown_choice
from torch import nn

from qcexport.mechanisms.attention import MultiHeadAttention, attend

DESCRIPTOR_FORMAT = 1
MAP_PREFIX = "attn_map."
HEAD_MODES = ("mean", "each")
# Keys a map ranges over: the visual tokens; the visual tokens followed by the latents
# (Perceiver Resampler); every media item's tokens, media-major (Flamingo gated xattn); or
# latents only (Perceiver IO's decoder), which have no patch grid.
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
    """A diagnostic output other than a map: ``compute(module, taps, inputs) -> tensor``."""

    name: str
    watch: tuple[str, ...]  # module paths whose inputs and outputs ``compute`` reads
    compute: Callable[[nn.Module, Taps, Mapping[str, torch.Tensor]], torch.Tensor]
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
    extras: Callable[[nn.Module], list[Extra]] = lambda module: []
    describe: Callable[[nn.Module], dict[str, Any]] = lambda module: {}


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
        self.maps_plan = plan_for(mechanism)
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
        for name, site in zip(self.map_names, self.maps_sites, strict=True):
            entry = {0: "batch"} if self.maps_plan.rows == "batch" else {}
            if site.keys == "visual":
                entry[key_axis] = "tokens"
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
            "query_output": self.maps_plan.query_output,
            "maps": maps,
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
    names = list(inspect.signature(module.forward).parameters)
    args = ", ".join(names)
    call = ", ".join(f"{n}={n}" for n in names)
    # The exporter binds example inputs by the forward's parameter names: generate a forward
    # with exactly the module's names (a **kwargs forward cannot be bound).
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {args}):\n    return self._forward_with_maps(dict({call}))\n",
         namespace)
    cls = type(f"{base.__name__}WithAttentionMaps", (AttentionMaps, base),
               {"forward": namespace["forward"], "_base_forward": staticmethod(base.forward),
                "__module__": __name__})
    wrapped = copy.copy(module)  # a new object over the same parameter and module dicts
    wrapped.__class__ = cls
    wrapped._init_maps(mechanism, output_names, heads)
    return wrapped.eval()


# --- the plans of the built-in mechanisms ----------------------------------------------------


def _perceiver_sites(module) -> list[MapSite]:
    sites = [MapSite("encode.attn", 0, "latents -> visual tokens", same_queries=not
                     module.config.num_outputs)]
    if module.config.num_outputs:
        sites.append(MapSite("decode.attn", 1, "output queries -> latents", keys="latents"))
    return sites


def _resampler_sites(module) -> list[MapSite]:
    return [MapSite(f"layers.{i}.attn", i, "latents -> [visual tokens; latents]",
                    keys="visual+latents") for i in range(len(module.layers))]


def _xattn_sites(module) -> list[MapSite]:
    return [MapSite(f"blocks.{i}.attn", i, "text tokens -> media tokens", keys="media")
            for i in range(len(module.blocks))]


def _qformer_sites(module) -> list[MapSite]:
    return [MapSite(f"layers.{i}.cross_attn", i, "queries -> visual tokens")
            for i, layer in enumerate(module.layers) if layer.cross_attn is not None]


def _matryoshka_sites(module) -> list[MapSite]:
    return [MapSite(f"layers.{i}.cross_attn", i, "queries -> visual tokens")
            for i in range(len(module.layers))]


def _routed_inputs(branch: int, mask_name: str):
    def inputs(layer: nn.Module, args: Mapping[str, Any]) -> tuple:
        weights, routing = args["weights"], args["routing"]  # weights: [B, branches]
        if routing == "cond":  # what the If runs: one branch for the whole batch
            gate = (weights.sum(dim=0).argmax() == branch).to(weights.dtype)
        elif routing == "select":  # every branch runs; the sample keeps its own choice
            gate = weights[:, branch, None, None, None]  # [B, 1, 1, 1]
        else:  # soft: every branch contributes
            gate = None
        return layer.norm_q(args["x"]), layer.norm_kv(args["image"]), args[mask_name], gate

    return inputs


def _routing_sites(module) -> list[MapSite]:
    sites = []
    for i in range(len(module.layers)):
        sites.append(MapSite(f"layers.{i}.global_attn", i, "global branch", hook=f"layers.{i}",
                             inputs=_routed_inputs(0, "global_mask")))
        sites.append(MapSite(f"layers.{i}.local_attn", i, "local branch", hook=f"layers.{i}",
                             inputs=_routed_inputs(1, "local_mask")))
    return sites


def _routing_describe(module) -> dict[str, Any]:
    from qcexport.mechanisms.routing import BRANCHES

    return {"routing": {"output": "routing_weights", "branches": list(BRANCHES),
                        "mode": module.config.routing,
                        "map_branch": {MAP_PREFIX + s.core: s.label.split()[0]
                                       for s in _routing_sites(module)}}}


def _matryoshka_describe(module) -> dict[str, Any]:
    top = module.config.max_queries
    values = sorted({1, *(2 ** i for i in range(top.bit_length()) if 2 ** i <= top), top})
    return {"sweep": {"input": "num_queries", "values": values, "output": "query_outputs"}}


XATTN_GATES = "xattn_gates"
XATTN_SHARE = "xattn_visual_share"


def _xattn_gates(module, taps, inputs) -> torch.Tensor:
    gates = [torch.cat([b.attn_gate.tanh(), b.ff_gate.tanh()]) for b in module.blocks]
    return torch.stack(gates)  # [layers, 2]


def _xattn_share(module, taps, inputs) -> torch.Tensor:
    """Per layer and text token: |update| / (|h_in| + |update|), the update being everything
    the block added (both gated branches; without vision the block is the identity)."""
    shares = []
    for i in range(len(module.blocks)):
        path = f"blocks.{i}"
        h_in = taps.input(path)["h"]
        update = taps.outputs[path] - h_in  # [B, T, D]
        added, kept = update.norm(dim=-1), h_in.norm(dim=-1)  # [B, T]
        shares.append(added / (added + kept).clamp_min(torch.finfo(added.dtype).tiny))
    return torch.stack(shares, dim=1)  # [B, layers, T]


def _xattn_extras(module) -> list[Extra]:
    blocks = tuple(f"blocks.{i}" for i in range(len(module.blocks)))
    return [Extra(XATTN_GATES, (), _xattn_gates),
            Extra(XATTN_SHARE, blocks, _xattn_share, {0: "batch", 2: "text"})]


def _xattn_describe(module) -> dict[str, Any]:
    return {"gates": {"output": XATTN_GATES, "columns": ["attention", "feed-forward"]},
            "visual_share": {"output": XATTN_SHARE, "token_input": "media_ids",
                             "residual": {"input": "text_hidden", "output": "text_hidden_out"}}}


PLANS: dict[str, MapPlan] = {
    "perceiver": MapPlan(_perceiver_sites, "image_features", 1, "latents", "latent_tokens"),
    "perceiver-io": MapPlan(_perceiver_sites, "image_features", 1, "latents", "outputs"),
    "flamingo-resampler": MapPlan(_resampler_sites, "image_features", 2, "latents",
                                  "latent_tokens", media_axis=1, rows="batch*media"),
    "flamingo-xattn": MapPlan(_xattn_sites, "media_features", 2, "text tokens", None,
                              media_axis=1, extras=_xattn_extras, describe=_xattn_describe),
    "qformer": MapPlan(_qformer_sites, "image_features", 1, "queries", "query_outputs"),
    "routing": MapPlan(_routing_sites, "image_features", 1, "queries", "query_outputs",
                       describe=_routing_describe),
    "matryoshka": MapPlan(_matryoshka_sites, "image_features", 1, "queries", "query_outputs",
                          describe=_matryoshka_describe),
}


def plan_for(mechanism: str) -> MapPlan:
    if mechanism not in PLANS:
        raise UserError(
            f"attention maps are defined for the built-in mechanisms, not {mechanism!r}",
            stage="maps",
            hint=f"use one of {', '.join(sorted(PLANS))}, or drop --with-attention-maps",
        )
    return PLANS[mechanism]

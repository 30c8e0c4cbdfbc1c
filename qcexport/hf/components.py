"""Hugging Face components: one declarative spec per transformers class that qcexport exports.

A spec says, for one component (the BLIP-2 Q-Former, the Idefics2 perceiver resampler...),
everything the generic stages need, as the mechanism registry does for the built-in modules:
which saved models hold it (their ``model_type``), how to take the submodule out of the full
model (and wrap it so that the ONNX inputs are what a runtime has at hand: image features, not
the parent model's learned queries), how to make example inputs from the model's config, the
dynamic axes, the outputs kept by default and the golden cases. Generic code reads the spec and
never asks which component it holds.

Visual token counts come from the vision config: (image_size / patch_size)^2 patches, plus one
where the vision tower prepends a CLS token (BLIP-2, InstructBLIP, Idefics and Kosmos-2 use
CLIP-like towers; Idefics2's SigLIP tower has none).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from qcrun.errors import unknown_choice
from torch import nn

from qcexport.mechanisms.registry import AxisRoles, Case

# --- shapes from the config -------------------------------------------------------------------


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def visual_tokens(vision_config, *, cls_token: bool) -> int:
    """Tokens the vision tower gives one image: its patch grid, plus the CLS token if any."""
    grid = _side(vision_config.image_size) // _side(vision_config.patch_size)
    return grid * grid + int(cls_token)


def _features(g: torch.Generator, batch: int, tokens: int, width: int) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=g)


def _mask(batch: int, length: int, padding: int) -> torch.Tensor:
    """1 for real tokens, 0 for padding: the last ``padding`` tokens of every row but the first
    (so one row is unpadded and the others differ from it)."""
    mask = torch.ones(batch, length, dtype=torch.int64)
    if padding:
        mask[1:, length - padding:] = 0
    return mask


# --- wrappers: what the ONNX graph computes ----------------------------------------------------


class QueryTokensQFormer(nn.Module):
    """A Q-Former fed with its parent model's learned ``query_tokens``.

    The queries are a parameter of the full model (``Blip2Model.query_tokens``), not an input a
    runtime has; they are carried here so the graph takes image features only (plus the
    instruction for InstructBLIP), as the parent's ``get_image_features`` does.
    """

    def __init__(self, qformer: nn.Module, query_tokens: nn.Parameter, *, text: bool):
        super().__init__()
        self.qformer = qformer
        self.query_tokens = query_tokens
        self.text = text

    def forward(self, image_features: torch.Tensor, instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None):
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        if not self.text:
            return self.qformer(query_embeds=queries, encoder_hidden_states=image_features)
        # as InstructBlipModel does: the queries are never padding
        query_mask = torch.ones(queries.shape[:2], dtype=instruction_mask.dtype,
                                device=instruction_mask.device)
        return self.qformer(input_ids=instruction_ids, query_embeds=queries,
                            attention_mask=torch.cat([query_mask, instruction_mask], dim=1),
                            encoder_hidden_states=image_features)


class KeywordInputs(nn.Module):
    """A submodule called with renamed keyword inputs (ONNX input name -> forward argument)."""

    def __init__(self, inner: nn.Module, names: Mapping[str, str]):
        super().__init__()
        self.inner = inner
        self.names = dict(names)

    def forward(self, **inputs):
        return self.inner(**{self.names.get(k, k): v for k, v in inputs.items()})


class MaskedGatedCrossAttention(nn.Module):
    """The Idefics gated cross-attention layer with a 0/1 mask as input.

    ``image_attention_mask[b, t, s]`` is 1 where text token t may see visual token s. The
    additive mask and the per-token gate (zero for a token that sees no image) are derived
    from it as ``IdeficsModel.forward`` derives them, so the runtime feeds plain 0/1 masks.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, image_hidden_states: torch.Tensor,
                image_attention_mask: torch.Tensor):
        allowed = image_attention_mask.bool()
        additive = torch.where(allowed[:, None], torch.zeros((), dtype=hidden_states.dtype),
                               torch.finfo(hidden_states.dtype).min)
        gate = allowed.any(dim=-1).to(hidden_states.dtype)
        return self.layer(hidden_states, image_hidden_states=image_hidden_states,
                          image_attention_mask=additive, cross_attention_gate=gate)


def _attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def find(model: nn.Module, paths: tuple[str, ...]) -> Any:
    """The first of ``paths`` (dotted attributes) that ``model`` has: transformers moved some
    submodules between versions (``model.qformer`` vs ``model.model.qformer``)."""
    for path in paths:
        try:
            return _attr(model, path)
        except AttributeError:
            continue
    raise LookupError(f"{type(model).__name__} has none of {', '.join(paths)}")


# --- the specs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    summary: str
    model_types: tuple[str, ...]  # config.model_type of the saved models that hold it
    component_class: str  # the transformers class taken out of the full model
    # take(model) -> the module to export (the submodule, wrapped where the graph needs it)
    take: Callable[[nn.Module], nn.Module]
    # make_inputs(config, *, seed, **params) -> {input name: tensor}
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    input_names: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    # The outputs kept by default, by their flattened path (None: every tensor leaf); for a
    # module that returns bare tensors, one name per tensor.
    outputs: tuple[str, ...] | None = None
    golden_cases: tuple[Case, ...] = ()
    export_case: Case = field(default_factory=lambda: Case("export", {"batch": 2}))
    verify_case: Case = field(default_factory=lambda: Case("verify", {"batch": 3, "tokens": 9}))
    # which symbolic axis is the batch and which the visual token count (profile --batch/--tokens)
    roles: AxisRoles = field(default_factory=AxisRoles)
    # The image-side inputs `convert --split context` computes once (see MechanismSpec).
    context_inputs: tuple[str, ...] = ()

    def axis_roles(self) -> dict[str, str]:
        """{role: axis name} for the roles whose axis this component's inputs have."""
        labels = {label for axes in self.dynamic_axes.values() for label in axes.values()}
        return {role: axis for role, axis in dataclasses.asdict(self.roles).items()
                if axis in labels}

    def inputs(self, config, case: Case | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        feed = self.make_inputs(config, seed=seed, **(dict(case.params) if case else {}))
        if list(feed) != list(self.input_names):
            raise RuntimeError(f"{self.name}: example inputs {list(feed)} != {self.input_names}")
        return feed


def _qformer_take(*, text: bool) -> Callable[[nn.Module], nn.Module]:
    """take() of BLIP-2's (``text=False``) or InstructBLIP's Q-Former, with its queries."""

    def take(model):
        return QueryTokensQFormer(find(model, ("qformer", "model.qformer")),
                                  find(model, ("query_tokens", "model.query_tokens")), text=text)

    return take


def _qformer_inputs(config, *, seed, batch=2, tokens=None, text=None, padding=0):
    g = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    feed = {"image_features": _features(
        g, batch, tokens or visual_tokens(vision, cls_token=True), vision.hidden_size)}
    if text is not None:
        q = config.qformer_config
        feed["instruction_ids"] = torch.randint(1, q.vocab_size, (batch, text), generator=g)
        feed["instruction_mask"] = _mask(batch, text, padding)
    return feed


def _instructblip_inputs(config, *, seed, batch=2, tokens=None, text=6, padding=0):
    return _qformer_inputs(config, seed=seed, batch=batch, tokens=tokens, text=text,
                           padding=padding)


def _image_inputs(name: str, width: str) -> Callable[..., dict[str, torch.Tensor]]:
    """make_inputs of a component fed one image's features only: the input ``name``, as wide
    as the vision config's ``width`` field, CLS token included."""

    def make_inputs(config, *, seed, batch=2, tokens=None):
        g = torch.Generator().manual_seed(seed)
        vision = config.vision_config
        return {name: _features(g, batch, tokens or visual_tokens(vision, cls_token=True),
                                getattr(vision, width))}

    return make_inputs


def _idefics_xattn_inputs(config, *, seed, batch=2, tokens=None, text=5, images=1,
                          no_image_rows=1):
    """Text hidden states attending to ``images`` resampled images; the first
    ``no_image_rows`` text tokens of row 0 see no image (their gate is closed)."""
    g = torch.Generator().manual_seed(seed)
    latents = tokens or config.perceiver_config.resampler_n_latents * images
    mask = torch.ones(batch, text, latents, dtype=torch.int64)
    mask[0, :no_image_rows] = 0
    if batch > 1 and latents > 1:
        mask[1, :, latents // 2:] = 0  # row 1 sees only the first half of the visual tokens
    return {"hidden_states": _features(g, batch, text, config.hidden_size),
            "image_hidden_states": _features(g, batch, latents, config.vision_config.embed_dim),
            "image_attention_mask": mask}


def _idefics2_inputs(config, *, seed, batch=2, tokens=None, padding=0):
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or visual_tokens(config.vision_config, cls_token=False)
    return {"context": _features(g, batch, tokens, config.perceiver_config.hidden_size),
            "attention_mask": _mask(batch, tokens, padding)}


_FEATURE_AXES = {0: "batch", 1: "tokens"}


def _image_cases(tokens: int) -> tuple[Case, ...]:
    """The golden cases of a component fed image features only; ``tokens``: another count."""
    return (Case("base", {"batch": 2}, "the vision tower's token count"),
            Case("batch1", {"batch": 1}, "a single image"),
            Case("tokens", {"batch": 3, "tokens": tokens}, "another token count"))

_REGISTRY: dict[str, ComponentSpec] = {}


def register(spec: ComponentSpec) -> ComponentSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"component {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


register(ComponentSpec(
    name="qformer",
    summary="BLIP-2 Q-Former: the model's learned queries cross-attend to image features",
    model_types=("blip-2",),
    component_class="Blip2QFormerModel",
    take=_qformer_take(text=False),
    make_inputs=_qformer_inputs,
    input_names=("image_features",),
    dynamic_axes={"image_features": _FEATURE_AXES},
    outputs=("last_hidden_state", "pooler_output"),
    golden_cases=_image_cases(40),
))

register(ComponentSpec(
    name="instructblip-qformer",
    summary="InstructBLIP Q-Former: queries and instruction tokens, cross-attending to images",
    model_types=("instructblip",),
    component_class="InstructBlipQFormerModel",
    take=_qformer_take(text=True),
    make_inputs=_instructblip_inputs,
    input_names=("image_features", "instruction_ids", "instruction_mask"),
    context_inputs=("image_features",),
    dynamic_axes={"image_features": _FEATURE_AXES,
                  "instruction_ids": {0: "batch", 1: "text"},
                  "instruction_mask": {0: "batch", 1: "text"}},
    outputs=("last_hidden_state", "pooler_output"),
    export_case=Case("export", {"batch": 2, "text": 6, "padding": 2}),
    verify_case=Case("verify", {"batch": 3, "tokens": 9, "text": 4, "padding": 1}),
    golden_cases=(Case("base", {"batch": 2, "text": 6}, "unpadded instructions"),
                  Case("padded", {"batch": 3, "text": 7, "padding": 3},
                       "instructions padded in every row but the first"),
                  Case("tokens", {"batch": 2, "tokens": 30, "text": 3, "padding": 1},
                       "another token count and instruction length")),
))

register(ComponentSpec(
    name="idefics-resampler",
    summary="Idefics perceiver resampler: learned latents attend to [image tokens; latents]",
    model_types=("idefics",),
    component_class="IdeficsPerceiverResampler",
    take=lambda model: find(model, ("model.perceiver_resampler", "perceiver_resampler")),
    make_inputs=_image_inputs("context", "embed_dim"),
    input_names=("context",),
    dynamic_axes={"context": _FEATURE_AXES},
    outputs=("perceiver_embeddings",),  # the name IdeficsModel.forward takes them by
    golden_cases=_image_cases(50),
))

register(ComponentSpec(
    name="idefics-gated-xattn",
    summary="Idefics gated cross-attention layer: h + tanh(alpha) * xattn(h, image), masked",
    model_types=("idefics",),
    component_class="IdeficsGatedCrossAttentionLayer",
    take=lambda model: MaskedGatedCrossAttention(
        find(model, ("model.gated_cross_attn_layers", "gated_cross_attn_layers"))[0]),
    make_inputs=_idefics_xattn_inputs,
    input_names=("hidden_states", "image_hidden_states", "image_attention_mask"),
    context_inputs=("image_hidden_states",),
    dynamic_axes={"hidden_states": {0: "batch", 1: "text"},
                  "image_hidden_states": {0: "batch", 1: "image_tokens"},
                  "image_attention_mask": {0: "batch", 1: "text", 2: "image_tokens"}},
    export_case=Case("export", {"batch": 2, "text": 5, "images": 2}),
    verify_case=Case("verify", {"batch": 3, "text": 7, "images": 1}),
    golden_cases=(Case("one_image", {"batch": 2, "text": 5, "images": 1},
                       "one image; a token of row 0 sees none (gate closed)"),
                  Case("two_images", {"batch": 2, "text": 6, "images": 2},
                       "two images, row 1 sees only the first"),
                  Case("batch1", {"batch": 1, "text": 4, "images": 1, "no_image_rows": 2},
                       "a single sequence")),
))

register(ComponentSpec(
    name="idefics2-resampler",
    summary="Idefics2 perceiver resampler: latents attend to [image tokens; latents], masked",
    model_types=("idefics2",),
    component_class="Idefics2PerceiverResampler",
    take=lambda model: find(model, ("model.connector.perceiver_resampler",
                                    "connector.perceiver_resampler")),
    make_inputs=_idefics2_inputs,
    input_names=("context", "attention_mask"),
    dynamic_axes={"context": _FEATURE_AXES, "attention_mask": _FEATURE_AXES},
    outputs=("perceiver_embeddings",),
    export_case=Case("export", {"batch": 2, "padding": 3}),
    verify_case=Case("verify", {"batch": 3, "tokens": 9, "padding": 2}),
    golden_cases=(Case("base", {"batch": 2}, "every patch real"),
                  Case("padded", {"batch": 3, "padding": 5},
                       "padding patches in every row but the first"),
                  Case("tokens", {"batch": 2, "tokens": 36, "padding": 4},
                       "another patch count")),
))

register(ComponentSpec(
    name="kosmos2-projection",
    summary="Kosmos-2 image-to-text projection: latent queries attend to projected features",
    model_types=("kosmos-2",),
    component_class="Kosmos2ImageToTextProjection",
    take=lambda model: find(model, ("image_to_text_projection",
                                    "model.image_to_text_projection")),
    make_inputs=_image_inputs("features", "hidden_size"),
    input_names=("features",),
    dynamic_axes={"features": _FEATURE_AXES},
    # forward returns (image_embeds, attention weights or None); None is dropped
    outputs=("image_embeds",),
    golden_cases=_image_cases(33),
))


def get(name: str) -> ComponentSpec:
    if name not in _REGISTRY:
        raise unknown_choice("Hugging Face component", name, _REGISTRY, flag="--component")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def for_model_type(model_type: str) -> list[str]:
    return [s.name for s in _REGISTRY.values() if model_type in s.model_types]

"""Perceiver latent cross-attention, and Perceiver IO's output-query decoder.

Jaegle et al., "Perceiver: General Perception with Iterative Attention" (ICML 2021) and
"Perceiver IO: A General Architecture for Structured Inputs & Outputs" (ICLR 2022).
A learned latent array cross-attends to the visual tokens (cost O(L x N), any N), then
latent self-attention blocks refine it. No positional encoding is added here: the visual
features already carry position (they come from a ViT), so the module is invariant to a
permutation of the tokens. Perceiver IO adds output queries that cross-attend to the latents.

As in the Perceiver IO paper's decoders, the output queries are an input the caller may give
(``queries``, [O, Do], shared by the batch, any O): a task or position asks the same latents a
new question. Left out, the learned queries are used, so every export of the module without it
computes what it always did. A split model (``convert --split context``) computes the latents
and the decoder's keys and values once per image and answers each new set of queries with the
decoder alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcexport.mechanisms.attention import FeedForward, MultiHeadAttention, key_padding_mask
from qcexport.mechanisms.common import VisualConfig, features, generator, token_mask
from qcexport.mechanisms.map_plan import MapPlan, MapSite
from qcexport.mechanisms.registry import Case, MechanismSpec, register


@dataclass
class PerceiverConfig(VisualConfig):
    vision_dim: int = 64
    num_latents: int = 16
    cross_heads: int = 1
    heads: int = 4
    self_layers: int = 2
    ff_mult: int = 4
    # Perceiver IO decoder; 0 means plain Perceiver (output = latents).
    num_outputs: int = 0
    output_dim: int = 64


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + feed-forward, with residuals on the query side."""

    def __init__(self, dim: int, context_dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(context_dim)
        self.attn = MultiHeadAttention(dim, heads, context_dim=context_dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, context, mask=None):
        x = x + self.attn(self.norm_q(x), self.norm_kv(context), mask)
        return x + self.ff(x)


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm(x), mask=mask)
        return x + self.ff(x)


class Perceiver(nn.Module):
    def __init__(self, config: PerceiverConfig):
        super().__init__()
        c = self.config = config
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim) * 0.02)
        self.encode = CrossAttentionBlock(c.dim, c.vision_dim, c.cross_heads, c.ff_mult)
        self.process = nn.ModuleList(
            SelfAttentionBlock(c.dim, c.heads, c.ff_mult) for _ in range(c.self_layers)
        )
        self.norm = nn.LayerNorm(c.dim)
        if c.num_outputs:
            self.output_queries = nn.Parameter(torch.randn(c.num_outputs, c.output_dim) * 0.02)
            self.decode = CrossAttentionBlock(c.output_dim, c.dim, c.cross_heads, c.ff_mult)

    def forward(self, image_features: torch.Tensor, image_mask: torch.Tensor,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        batch = image_features.shape[0]
        x = self.latents.expand(batch, -1, -1)  # [B, L, D]
        mask = key_padding_mask(image_mask, x.shape[1])  # [B, 1, L, N]
        x = self.encode(x, image_features, mask)
        for block in self.process:
            x = block(x)
        x = self.norm(x)
        if not self.config.num_outputs:
            return x
        if queries is None:
            queries = self.output_queries
        queries = queries.expand(batch, -1, -1)  # [O, Do] -> [B, O, Do]
        return self.decode(queries, x)


def make_inputs(c: PerceiverConfig, *, seed=0, batch=1, tokens=49, pad=False):
    g = generator(seed)
    return {
        "image_features": features(g, batch, tokens, c.vision_dim),
        "image_mask": token_mask(batch, tokens, pad),
    }


_CASES = (
    Case("b1_t49", {"batch": 1, "tokens": 49}, "one image, 7x7 tokens"),
    Case("b2_t17_pad", {"batch": 2, "tokens": 17, "pad": True}, "two images, one padded"),
    Case("b2_t65", {"batch": 2, "tokens": 65}, "two images, 8x8 tokens + CLS"),
)
_AXES = {"image_features": {0: "batch", 1: "tokens"}, "image_mask": {0: "batch", 1: "tokens"}}


def map_sites(module: Perceiver) -> list[MapSite]:
    sites = [MapSite("encode.attn", 0, "latents -> visual tokens",
                     same_queries=not module.config.num_outputs)]
    if module.config.num_outputs:
        sites.append(MapSite("decode.attn", 1, "output queries -> latents", keys="latents"))
    return sites

def _spec(name: str, summary: str, source: str, presets, output: str,
          **decoder) -> MechanismSpec:
    """Perceiver and Perceiver IO: one module, inputs and cases; the output differs, and
    Perceiver IO's ``decoder`` fields (its optional output queries) are added."""
    return MechanismSpec(
        name=name,
        summary=summary,
        source=source,
        config_cls=PerceiverConfig,
        presets=presets,
        builder=Perceiver,
        make_inputs=make_inputs,
        input_names=("image_features", "image_mask"),
        output_names=(output,),
        dynamic_axes={**_AXES, output: {0: "batch"}},
        golden_cases=_CASES,
        export_case=Case("export", {"batch": 2, "tokens": 37}),
        verify_case=Case("verify", {"batch": 3, "tokens": 101, "pad": True}),
        maps=MapPlan(map_sites, "image_features", 1, "latents", output),
        **decoder,
    )


register(_spec(
    "perceiver",
    "learned latents cross-attend to any number of visual tokens, then latent self-attention",
    "Jaegle et al. 2021, Perceiver (arXiv:2103.03206)",
    {
        "tiny": {},
        # ImageNet Perceiver: 512 latents x 1024, 1-head cross-attention, 8-head latent
        # transformer with 6 layers per block (Sec. 4.1, Table 6). We export one block: the
        # paper's later repeats share its weights and only add depth.
        "base": {"vision_dim": 1024, "dim": 1024, "num_latents": 512, "cross_heads": 1,
                 "heads": 8, "self_layers": 6},
    },
    "latent_tokens",
))

register(_spec(
    "perceiver-io",
    "Perceiver with an output-query decoder that cross-attends to the latents",
    "Jaegle et al. 2022, Perceiver IO (arXiv:2107.14795)",
    {
        "tiny": {"num_outputs": 8, "output_dim": 32},
        # Perceiver IO ImageNet: 512 latents x 1024, 1-head encoder/decoder cross-attention,
        # 8-head latent self-attention (Table 7); one 6-layer block as in `perceiver`, and
        # 64 output queries of width 1024 as the tokens handed to a language model.
        "base": {"vision_dim": 1024, "dim": 1024, "num_latents": 512, "cross_heads": 1,
                 "heads": 8, "self_layers": 6, "num_outputs": 64, "output_dim": 1024},
    },
    "outputs",
    # the image side is all of the encoder: the latents (and the decoder's keys and values of
    # them) are the context; new output queries are answered by the decoder alone
    context_inputs=("image_features", "image_mask"),
    optional_inputs={"queries": "output_queries"},
    optional_axes={"queries": {0: "queries"}, "outputs": {1: "queries"}},
))

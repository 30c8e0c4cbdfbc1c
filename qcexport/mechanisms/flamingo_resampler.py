"""Flamingo's Perceiver Resampler.

Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning" (NeurIPS 2022),
Sec. 2.1 and Appendix A.1.1; layer layout as in OpenFlamingo. For each media item a fixed
set of latents attends to the concatenation [visual tokens; latents] (keys and values), so
the latents also see each other; a learned media (time) embedding is added to the visual
tokens of each media item. Output: the same number of latents per media item, whatever the
number of visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcexport.mechanisms.attention import FeedForward, MultiHeadAttention, key_padding_mask
from qcexport.mechanisms.common import features, generator, token_mask
from qcexport.mechanisms.map_plan import MapPlan, MapSite
from qcexport.mechanisms.registry import AxisRoles, Case, MechanismSpec, register


@dataclass
class ResamplerConfig:
    dim: int = 64
    num_latents: int = 8
    depth: int = 2
    heads: int = 4
    head_dim: int = 16
    ff_mult: int = 4
    max_media: int = 4
    media_embeddings: bool = True


class ResamplerLayer(nn.Module):
    def __init__(self, c: ResamplerConfig):
        super().__init__()
        self.norm_media = nn.LayerNorm(c.dim)
        self.norm_latents = nn.LayerNorm(c.dim)
        self.attn = MultiHeadAttention(c.dim, c.heads, head_dim=c.head_dim)
        self.ff = FeedForward(c.dim, c.ff_mult)

    def forward(self, x, latents, mask):
        x = self.norm_media(x)
        normed = self.norm_latents(latents)
        context = torch.cat([x, normed], dim=1)  # [B*M, N + L, D]
        latents = latents + self.attn(normed, context, mask)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    def __init__(self, config: ResamplerConfig):
        super().__init__()
        c = self.config = config
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim) * 0.02)
        self.media_embed = nn.Parameter(torch.randn(c.max_media, c.dim) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)

    def forward(self, image_features: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        b, m, n, d = image_features.shape
        torch._check(m <= self.config.max_media)
        x = image_features
        if self.config.media_embeddings:
            x = x + self.media_embed[:m].unsqueeze(1)  # [B, M, N, D]
        x = x.reshape(b * m, n, d)  # each media item resampled on its own
        latents = self.latents.expand(b * m, -1, -1)  # [B*M, L, D]
        num_latents = latents.shape[1]
        valid = torch.cat(
            [image_mask.reshape(b * m, n), image_mask.new_ones(b * m, num_latents)], dim=1
        )  # [B*M, N + L]: latents are always visible
        mask = key_padding_mask(valid, num_latents)  # [B*M, 1, L, N + L]
        for layer in self.layers:
            latents = layer(x, latents, mask)
        return self.norm(latents).reshape(b, m, num_latents, d)  # [B, M, L, D]


def make_inputs(c: ResamplerConfig, *, seed=0, batch=1, media=1, tokens=49, pad=False):
    g = generator(seed)
    mask = token_mask(batch * media, tokens, pad).reshape(batch, media, tokens)
    return {"image_features": features(g, batch, media, tokens, c.dim), "image_mask": mask}


def map_sites(module: PerceiverResampler) -> list[MapSite]:
    return [MapSite(f"layers.{i}.attn", i, "latents -> [visual tokens; latents]",
                    keys="visual+latents") for i in range(len(module.layers))]


register(
    MechanismSpec(
        name="flamingo-resampler",
        summary="Perceiver Resampler: latents attend to [visual tokens; latents] per media item",
        source="Alayrac et al. 2022, Flamingo (arXiv:2204.14198), App. A.1.1; OpenFlamingo",
        config_cls=ResamplerConfig,
        presets={
            "tiny": {},
            # Flamingo: 64 latents, 6 layers (App. A.1.1); width 1024, 8 heads of 64, ff x4 as
            # in OpenFlamingo's resampler over CLIP ViT-L/14 features.
            "base": {"dim": 1024, "num_latents": 64, "depth": 6, "heads": 8, "head_dim": 64,
                     "max_media": 8},
        },
        builder=PerceiverResampler,
        make_inputs=make_inputs,
        input_names=("image_features", "image_mask"),
        output_names=("latent_tokens",),
        dynamic_axes={
            "image_features": {0: "batch", 1: "media", 2: "tokens"},
            "image_mask": {0: "batch", 1: "media", 2: "tokens"},
            "latent_tokens": {0: "batch", 1: "media"},
        },
        golden_cases=(
            Case("b1_m1_t49", {"batch": 1, "media": 1, "tokens": 49}, "one image"),
            Case("b2_m2_t17_pad", {"batch": 2, "media": 2, "tokens": 17, "pad": True},
                 "two samples of two images, one image padded"),
            Case("b1_m3_t65", {"batch": 1, "media": 3, "tokens": 65}, "three media items"),
        ),
        export_case=Case("export", {"batch": 2, "media": 2, "tokens": 37}),
        verify_case=Case("verify", {"batch": 3, "media": 3, "tokens": 101, "pad": True}),
        roles=AxisRoles(media="media"),
        maps=MapPlan(map_sites, "image_features", 2, "latents", "latent_tokens", media_axis=1,
                     rows="batch*media"),
    )
)

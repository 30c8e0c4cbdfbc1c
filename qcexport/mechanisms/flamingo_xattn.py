"""Flamingo's gated cross-attention dense block.

Alayrac et al. 2022, Flamingo, Sec. 2.2 and Fig. 4: language hidden states attend to the
visual tokens of the media item that most recently precedes them, and the result enters the
residual stream through tanh gates initialised at 0, so a fresh block is the identity:

    h = h + tanh(alpha_attn) * xattn(h, media)
    h = h + tanh(alpha_ff)   * ff(h)

``media_ids[b, t]`` is the 1-based index of the media item that text token t attends to
(0: no image precedes it). Such a token sees nothing: its attention row is empty (zeros, not
NaN) and, unlike OpenFlamingo where the gated FF still touches it, both branches are masked
for it, so text before any image leaves the block unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcexport.mechanisms.attention import FeedForward, MultiHeadAttention
from qcexport.mechanisms.common import features, generator
from qcexport.mechanisms.map_plan import Extra, MapPlan, MapSite
from qcexport.mechanisms.registry import AxisRoles, Case, MechanismSpec, register


@dataclass
class XAttnConfig:
    dim: int = 64  # language model width
    vision_dim: int = 48
    heads: int = 4
    head_dim: int = 16
    ff_mult: int = 4
    layers: int = 2
    gate_init: float = 0.0


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, c: XAttnConfig):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim)
        self.attn = MultiHeadAttention(c.dim, c.heads, context_dim=c.vision_dim, head_dim=c.head_dim)
        self.attn_gate = nn.Parameter(torch.full((1,), c.gate_init))
        self.ff = FeedForward(c.dim, c.ff_mult)
        self.ff_gate = nn.Parameter(torch.full((1,), c.gate_init))

    def forward(self, h, media, mask, sees_media):
        h = h + self.attn_gate.tanh() * self.attn(self.norm(h), media, mask) * sees_media
        return h + self.ff_gate.tanh() * self.ff(h) * sees_media


class FlamingoCrossAttention(nn.Module):
    def __init__(self, config: XAttnConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(config) for _ in range(config.layers))

    def forward(
        self, text_hidden: torch.Tensor, media_features: torch.Tensor, media_ids: torch.Tensor
    ) -> torch.Tensor:
        b, m, n, dv = media_features.shape
        media = media_features.reshape(b, m * n, dv)  # [B, M*N, Dv]
        # 1-based media index of every key: [M*N] (arange // N, not repeat_interleave, which
        # exports to an Expand that breaks at other shapes)
        key_media = torch.arange(m * n, device=media.device) // n + 1
        mask = media_ids[:, None, :, None] == key_media  # [B, 1, T, M*N]
        sees_media = (media_ids > 0).unsqueeze(-1).to(text_hidden.dtype)  # [B, T, 1]
        h = text_hidden
        for block in self.blocks:
            h = block(h, media, mask, sees_media)
        return h

    def gates(self) -> list[tuple[float, float]]:
        """tanh(alpha) of (attention, feed-forward) per layer."""
        return [(blk.attn_gate.tanh().item(), blk.ff_gate.tanh().item()) for blk in self.blocks]


def media_ids_for(batch: int, text: int, media: int) -> torch.Tensor:
    """Interleaved text: a few text tokens, then image 1, more text, image 2, ...

    The first tokens of every sample come before any image (id 0); the rest are split evenly
    between the media items in order.
    """
    lead = max(1, text // (media + 2))
    ids = torch.zeros(batch, text, dtype=torch.int64)
    span = max(1, (text - lead) // media)
    for t in range(lead, text):
        ids[:, t] = min(media, 1 + (t - lead) // span)
    return ids


def make_inputs(c: XAttnConfig, *, seed=0, batch=1, text=12, media=2, tokens=8):
    g = generator(seed)
    return {
        "text_hidden": features(g, batch, text, c.dim),
        "media_features": features(g, batch, media, tokens, c.vision_dim),
        "media_ids": media_ids_for(batch, text, media),
    }


def map_sites(module: FlamingoCrossAttention) -> list[MapSite]:
    return [MapSite(f"blocks.{i}.attn", i, "text tokens -> media tokens", keys="media")
            for i in range(len(module.blocks))]


GATES = "xattn_gates"
VISUAL_SHARE = "xattn_visual_share"


def _gates(module: FlamingoCrossAttention, taps, inputs) -> torch.Tensor:
    gates = [torch.cat([b.attn_gate.tanh(), b.ff_gate.tanh()]) for b in module.blocks]
    return torch.stack(gates)  # [layers, 2]


def _visual_share(module: FlamingoCrossAttention, taps, inputs) -> torch.Tensor:
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


def map_extras(module: FlamingoCrossAttention) -> list[Extra]:
    blocks = tuple(f"blocks.{i}" for i in range(len(module.blocks)))
    return [Extra(GATES, (), _gates),
            Extra(VISUAL_SHARE, blocks, _visual_share, {0: "batch", 2: "text"})]


def describe_maps(module: FlamingoCrossAttention) -> dict:
    return {"gates": {"output": GATES, "columns": ["attention", "feed-forward"]},
            "visual_share": {"output": VISUAL_SHARE, "token_input": "media_ids",
                             "residual": {"input": "text_hidden", "output": "text_hidden_out"}}}



register(
    MechanismSpec(
        name="flamingo-xattn",
        summary="gated cross-attention: text attends to its preceding image, tanh-gated residual",
        source="Alayrac et al. 2022, Flamingo (arXiv:2204.14198), Sec. 2.2",
        config_cls=XAttnConfig,
        presets={
            # The paper initialises alpha at 0 (the config default). The presets start with the
            # gates open (tanh(0.55) = 0.5) as a trained block has them: with closed gates the
            # block is the identity and every parity check would pass trivially.
            "tiny": {"gate_init": 0.55},
            # OpenFlamingo-3B: MPT-1B language model (width 2048) over CLIP ViT-L/14 features
            # (1024), 8 heads of 64, ff x4; one gated block (inserted every N LM layers).
            "base": {"dim": 2048, "vision_dim": 1024, "heads": 8, "head_dim": 64, "layers": 1,
                     "gate_init": 0.55},
        },
        builder=FlamingoCrossAttention,
        make_inputs=make_inputs,
        input_names=("text_hidden", "media_features", "media_ids"),
        context_inputs=("media_features",),
        output_names=("text_hidden_out",),
        dynamic_axes={
            "text_hidden": {0: "batch", 1: "text"},
            "media_features": {0: "batch", 1: "media", 2: "tokens"},
            "media_ids": {0: "batch", 1: "text"},
            "text_hidden_out": {0: "batch", 1: "text"},
        },
        golden_cases=(
            Case("b1_t12_m2", {"batch": 1, "text": 12, "media": 2, "tokens": 8},
                 "two images; the first text tokens precede any image"),
            Case("b2_t20_m1_n17", {"batch": 2, "text": 20, "media": 1, "tokens": 17},
                 "one image, 17 visual tokens"),
            Case("b2_t9_m3", {"batch": 2, "text": 9, "media": 3, "tokens": 8},
                 "three images in a short text"),
        ),
        export_case=Case("export", {"batch": 2, "text": 10, "media": 2, "tokens": 6}),
        verify_case=Case("verify", {"batch": 3, "text": 23, "media": 3, "tokens": 11}),
        roles=AxisRoles(media="media"),
        maps=MapPlan(map_sites, "media_features", 2, "text tokens", None, media_axis=1,
                     query_prefix="t", extras=map_extras, describe=describe_maps),
    )
)

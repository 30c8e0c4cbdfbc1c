"""BLIP-2 Q-Former.

Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
Large Language Models" (ICML 2023), Sec. 3.1: a BERT-base transformer whose learned queries
self-attend together with the text tokens (when text is given) and cross-attend to the frozen
image features every ``cross_attention_freq`` layers; queries and text have their own
feed-forward weights. Layers are post-norm as in BERT. The mask used is the image-text
matching one: queries and text tokens all see each other, padding text tokens are invisible.

``conditioning="modulate"`` is the simpler pattern: the queries are shifted by a
projection of the pooled text embedding, and only the queries run through the layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qcexport.mechanisms.attention import MultiHeadAttention, key_padding_mask
from qcexport.mechanisms.common import (
    VisualConfig,
    features,
    generator,
    masked_mean,
    text_token_ids,
    token_mask,
)
from qcexport.mechanisms.map_plan import MapPlan, MapSite
from qcexport.mechanisms.registry import Case, MechanismSpec, register


@dataclass
class QFormerConfig(VisualConfig):
    num_queries: int = 8
    layers: int = 2
    heads: int = 4
    ff_dim: int = 128
    cross_attention_freq: int = 2
    vocab_size: int = 100
    max_text: int = 64
    conditioning: str = "joint"  # "joint" (BLIP-2) or "modulate" (text-shifted queries)


def _ff(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class QFormerLayer(nn.Module):
    def __init__(self, c: QFormerConfig, has_cross: bool):
        super().__init__()
        self.self_attn = MultiHeadAttention(c.dim, c.heads)
        self.self_norm = nn.LayerNorm(c.dim)
        self.cross_attn = (
            MultiHeadAttention(c.dim, c.heads, context_dim=c.vision_dim) if has_cross else None
        )
        self.cross_norm = nn.LayerNorm(c.dim) if has_cross else None
        self.ff_query, self.ff_query_norm = _ff(c.dim, c.ff_dim), nn.LayerNorm(c.dim)
        self.ff_text, self.ff_text_norm = _ff(c.dim, c.ff_dim), nn.LayerNorm(c.dim)

    def forward(self, x, num_queries: int, self_mask, image):
        x = self.self_norm(x + self.self_attn(x, mask=self_mask))
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.cross_attn is not None:
            queries = self.cross_norm(queries + self.cross_attn(queries, image))
        queries = self.ff_query_norm(queries + self.ff_query(queries))
        text = self.ff_text_norm(text + self.ff_text(text))
        return torch.cat([queries, text], dim=1)


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        c = self.config = config
        if c.conditioning not in ("joint", "modulate"):
            raise ValueError(f"conditioning must be 'joint' or 'modulate', not {c.conditioning!r}")
        self.query_tokens = nn.Parameter(torch.randn(c.num_queries, c.dim) * 0.02)
        self.vision_norm = nn.LayerNorm(c.vision_dim)
        self.word_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Embedding(c.max_text, c.dim)
        self.embed_norm = nn.LayerNorm(c.dim)
        self.text_proj = nn.Linear(c.dim, c.dim) if c.conditioning == "modulate" else None
        self.layers = nn.ModuleList(
            QFormerLayer(c, has_cross=i % c.cross_attention_freq == 0) for i in range(c.layers)
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = image_features.shape[0]
        q = self.config.num_queries
        image = self.vision_norm(image_features)
        queries = self.query_tokens.expand(b, -1, -1)  # [B, Q, D]
        if text_ids is None:
            text = queries.new_zeros(b, 0, queries.shape[-1])  # [B, 0, D]
            text_mask = torch.ones(b, 0, dtype=torch.bool, device=queries.device)
        else:
            if text_mask is None:
                text_mask = torch.ones_like(text_ids, dtype=torch.bool)
            positions = torch.arange(text_ids.shape[1], device=text_ids.device)
            text = self.word_embed(text_ids) + self.pos_embed(positions)  # [B, T, D]
        if self.text_proj is not None:
            pooled = masked_mean(self.embed_norm(text), text_mask)  # [B, D]
            queries = queries + self.text_proj(pooled).unsqueeze(1) * text_mask.any(
                dim=1, keepdim=True
            ).unsqueeze(-1).to(queries.dtype)
            text = text[:, :0]
            text_mask = text_mask[:, :0]
        x = self.embed_norm(torch.cat([queries, text], dim=1))  # [B, Q + T, D]
        valid = torch.cat([text_mask.new_ones(b, q), text_mask], dim=1)  # [B, Q + T]
        self_mask = key_padding_mask(valid, x.shape[1])  # [B, 1, Q + T, Q + T]
        for layer in self.layers:
            x = layer(x, q, self_mask, image)
        return x[:, :q]


def make_inputs(c: QFormerConfig, *, seed=0, batch=1, tokens=49, text=6, pad=False, no_text=False):
    g = generator(seed)
    mask = token_mask(batch, text, pad)
    if no_text:
        mask[:] = False  # no text: every text position is padding
    return {
        "image_features": features(g, batch, tokens, c.vision_dim),
        "text_ids": torch.randint(1, c.vocab_size, (batch, text), generator=g),
        "text_mask": mask,
    }


def text_inputs(c: QFormerConfig, text: str, feed) -> dict[str, np.ndarray]:
    """The prompt: hashed words as token ids, none of them padding."""
    ids = text_token_ids(text, c.vocab_size, c.max_text)
    return {"text_ids": ids, "text_mask": np.ones(ids.shape, dtype=bool)}


def map_sites(module: QFormer) -> list[MapSite]:
    return [MapSite(f"layers.{i}.cross_attn", i, "queries -> visual tokens")
            for i, layer in enumerate(module.layers) if layer.cross_attn is not None]


register(
    MechanismSpec(
        name="qformer",
        summary="BLIP-2 Q-Former: learned queries + optional text, cross-attention every 2 layers",
        source="Li et al. 2023, BLIP-2 (arXiv:2301.12597), Sec. 3.1",
        config_cls=QFormerConfig,
        presets={
            "tiny": {},
            # BLIP-2: BERT-base Q-Former (12 layers, 768 wide, 12 heads, ff 3072, vocab 30522),
            # 32 queries, cross-attention every 2nd layer, over EVA ViT-g/14 features (1408).
            "base": {"vision_dim": 1408, "dim": 768, "num_queries": 32, "layers": 12,
                     "heads": 12, "ff_dim": 3072, "cross_attention_freq": 2,
                     "vocab_size": 30522, "max_text": 512},
        },
        builder=QFormer,
        make_inputs=make_inputs,
        input_names=("image_features", "text_ids", "text_mask"),
        context_inputs=("image_features",),
        output_names=("query_outputs",),
        dynamic_axes={
            "image_features": {0: "batch", 1: "tokens"},
            "text_ids": {0: "batch", 1: "text"},
            "text_mask": {0: "batch", 1: "text"},
            "query_outputs": {0: "batch"},
        },
        golden_cases=(
            Case("b1_t49_text", {"batch": 1, "tokens": 49, "text": 6}, "one image and a prompt"),
            Case("b2_t17_textpad", {"batch": 2, "tokens": 17, "text": 8, "pad": True},
                 "two images, the second prompt padded"),
            Case("b2_t65_notext", {"batch": 2, "tokens": 65, "text": 4, "no_text": True},
                 "no text: every text position is padding"),
        ),
        export_case=Case("export", {"batch": 2, "tokens": 37, "text": 5, "pad": True}),
        verify_case=Case("verify", {"batch": 3, "tokens": 101, "text": 9, "pad": True}),
        input_ranges=lambda c: {"text_ids": (0, c.vocab_size - 1)},
        maps=MapPlan(map_sites, "image_features", 1, "queries", "query_outputs"),
        text_inputs=text_inputs,
    )
)

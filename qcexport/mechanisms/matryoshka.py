"""Matryoshka Query Transformer.

Hu et al., "Matryoshka Query Transformer for Large Vision-Language Models" (NeurIPS 2024):
up to M learned queries are trained so that any prefix of m queries is a good visual summary;
at inference the first m are used, with m chosen per request. ``num_queries`` is a 0-d int64
tensor input, so one exported model serves every m.

The queries self-attend (among the m that run) and cross-attend to the visual tokens. Running
only the first m queries equals running all M with the later ones invisible: query i never
depends on query j > m, which is the nesting property.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qcexport.mechanisms.attention import FeedForward, MultiHeadAttention
from qcexport.mechanisms.common import VisualConfig, features, generator
from qcexport.mechanisms.map_plan import MapPlan, MapSite
from qcexport.mechanisms.registry import Case, MechanismSpec, register


@dataclass
class MatryoshkaConfig(VisualConfig):
    max_queries: int = 16
    layers: int = 1
    heads: int = 4
    ff_mult: int = 4
    output_dim: int = 96  # the language model's width


class MatryoshkaLayer(nn.Module):
    def __init__(self, c: MatryoshkaConfig):
        super().__init__()
        self.norm_self = nn.LayerNorm(c.dim)
        self.self_attn = MultiHeadAttention(c.dim, c.heads)
        self.norm_q = nn.LayerNorm(c.dim)
        self.norm_kv = nn.LayerNorm(c.vision_dim)
        self.cross_attn = MultiHeadAttention(c.dim, c.heads, context_dim=c.vision_dim)
        self.ff = FeedForward(c.dim, c.ff_mult)

    def forward(self, x, image):
        x = x + self.self_attn(self.norm_self(x))
        x = x + self.cross_attn(self.norm_q(x), self.norm_kv(image))
        return x + self.ff(x)


class MatryoshkaQueryTransformer(nn.Module):
    def __init__(self, config: MatryoshkaConfig):
        super().__init__()
        c = self.config = config
        self.queries = nn.Parameter(torch.randn(c.max_queries, c.dim) * 0.02)
        self.layers = nn.ModuleList(MatryoshkaLayer(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.proj = nn.Linear(c.dim, c.output_dim)

    def forward(self, image_features: torch.Tensor, num_queries: torch.Tensor) -> torch.Tensor:
        m = num_queries.item()  # exported as a runtime value (an unbacked symbol)
        torch._check(m >= 1)
        torch._check(m <= self.config.max_queries)
        x = self.queries[:m].expand(image_features.shape[0], -1, -1)  # [B, m, D]
        for layer in self.layers:
            x = layer(x, image_features)
        return self.proj(self.norm(x))  # [B, m, Dout]


def make_inputs(c: MatryoshkaConfig, *, seed=0, batch=1, tokens=49, m=None):
    g = generator(seed)
    return {
        "image_features": features(g, batch, tokens, c.vision_dim),
        "num_queries": torch.tensor(c.max_queries if m is None else m, dtype=torch.int64),
    }


def map_sites(module: MatryoshkaQueryTransformer) -> list[MapSite]:
    return [MapSite(f"layers.{i}.cross_attn", i, "queries -> visual tokens")
            for i in range(len(module.layers))]


def describe_maps(module: MatryoshkaQueryTransformer) -> dict:
    """The m sweep `inspect` runs: powers of two up to M, and M."""
    top = module.config.max_queries
    values = sorted({1, *(2 ** i for i in range(top.bit_length()) if 2 ** i <= top), top})
    return {"sweep": {"input": "num_queries", "values": values, "output": "query_outputs"}}


register(
    MechanismSpec(
        name="matryoshka",
        summary="Matryoshka queries: the first m of M learned queries, m chosen at run time",
        source="Hu et al. 2024, Matryoshka Query Transformer (arXiv:2405.19315)",
        config_cls=MatryoshkaConfig,
        presets={
            "tiny": {},
            # MQT-LLaVA: up to 256 queries, a one-layer query transformer over CLIP ViT-L/14-336
            # features (1024), projected to the LLM width (Vicuna-7B: 4096).
            "base": {"vision_dim": 1024, "dim": 1024, "max_queries": 256, "layers": 1,
                     "heads": 16, "output_dim": 4096},
        },
        builder=MatryoshkaQueryTransformer,
        make_inputs=make_inputs,
        input_names=("image_features", "num_queries"),
        context_inputs=("image_features",),
        output_names=("query_outputs",),
        dynamic_axes={
            "image_features": {0: "batch", 1: "tokens"},
            "query_outputs": {0: "batch", 1: "queries"},
        },
        golden_cases=(
            Case("b1_t49_m1", {"batch": 1, "tokens": 49, "m": 1}, "one query"),
            Case("b1_t49_m4", {"batch": 1, "tokens": 49, "m": 4}, "four queries"),
            Case("b2_t17_m9", {"batch": 2, "tokens": 17, "m": 9}, "nine queries, batch 2"),
            Case("b2_t65_mmax", {"batch": 2, "tokens": 65}, "all M queries"),
        ),
        export_case=Case("export", {"batch": 2, "tokens": 37, "m": 6}),
        verify_case=Case("verify", {"batch": 3, "tokens": 101, "m": 11}),
        input_ranges=lambda c: {"num_queries": (1, c.max_queries)},
        maps=MapPlan(map_sites, "image_features", 1, "queries", "query_outputs",
                     describe=describe_maps),
    )
)

"""Task-aware dynamic routing of visual attention (after TADT).

A controller reads the task embedding (e.g. a sentence embedding of the task query) and the
pooled image features, and produces routing logits for every layer. Each layer has several
attention branches over the visual tokens:

- ``global``: the queries cross-attend to every visual token;
- ``local``: query i attends only to the i-th contiguous window of tokens (windowed attention,
  any token count);
- ``mlp``: a cheap branch, an MLP on the queries and the pooled image.

Routing modes:

- ``soft`` (training): the layer output is the softmax-weighted sum of all branches;
- ``select`` (hard, masked select): every branch runs and a one-hot weight keeps the argmax,
  per sample; exports as plain tensor ops;
- ``cond`` (hard, inference): only the chosen branch runs, through ``torch.cond``, which
  exports as ONNX ``If``. ``If`` takes one scalar predicate, so the choice is made per batch
  (argmax of the logits summed over the batch); with batch 1, or a batch that agrees, it equals
  ``select`` exactly.

Outputs: the query tokens and the routing weights actually used, [B, layers, branches].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qcexport.mechanisms.attention import FeedForward, MultiHeadAttention, key_padding_mask
from qcexport.mechanisms.common import (
    VisualConfig,
    features,
    generator,
    masked_mean,
    text_embedding,
    token_mask,
)
from qcexport.mechanisms.map_plan import MAP_PREFIX, MapPlan, MapSite
from qcexport.mechanisms.registry import Case, MechanismSpec, register

BRANCHES = ("global", "local", "mlp")


@dataclass
class RoutingConfig(VisualConfig):
    task_dim: int = 32
    num_queries: int = 8
    layers: int = 2
    heads: int = 4
    ff_mult: int = 2
    routing: str = "cond"  # "soft" | "select" | "cond"


def local_window_mask(num_queries: int, valid: torch.Tensor) -> torch.Tensor:
    """[B, N] validity -> [B, 1, Q, N]: query i sees tokens i*N//Q .. (i+1)*N//Q - 1.

    Windows are built from arange(N), not linspace, so the token axis stays symbolic.
    """
    n = valid.shape[1]
    window = torch.arange(n, device=valid.device) * num_queries // n  # [N] window id per token
    owner = torch.arange(num_queries, device=valid.device)  # [Q]
    in_window = owner[:, None] == window[None, :]  # [Q, N]
    return in_window[None, None] & valid[:, None, None, :]  # [B, 1, Q, N]


class RoutedLayer(nn.Module):
    def __init__(self, c: RoutingConfig):
        super().__init__()
        self.norm_q = nn.LayerNorm(c.dim)
        self.norm_kv = nn.LayerNorm(c.vision_dim)
        self.global_attn = MultiHeadAttention(c.dim, c.heads, context_dim=c.vision_dim)
        self.local_attn = MultiHeadAttention(c.dim, c.heads, context_dim=c.vision_dim)
        self.mlp = nn.Sequential(
            nn.Linear(c.dim + c.vision_dim, c.dim * c.ff_mult), nn.GELU(),
            nn.Linear(c.dim * c.ff_mult, c.dim),
        )
        self.ff = FeedForward(c.dim, c.ff_mult)

    def branch(self, index: int, q, image, global_mask, local_mask, pooled) -> torch.Tensor:
        if index == 0:
            return self.global_attn(q, image, global_mask)
        if index == 1:
            return self.local_attn(q, image, local_mask)
        context = pooled.unsqueeze(1).expand(-1, q.shape[1], -1)  # [B, Q, Dv]
        return self.mlp(torch.cat([q, context], dim=-1))

    def forward(self, x, image, global_mask, local_mask, pooled, weights, routing: str):
        q = self.norm_q(x)
        image = self.norm_kv(image)
        args = (q, image, global_mask, local_mask, pooled)
        if routing == "cond":
            x = x + self._cond(weights, args)
        else:
            outs = torch.stack([self.branch(i, *args) for i in range(len(BRANCHES))], dim=1)
            x = x + (weights[:, :, None, None] * outs).sum(dim=1)  # [B, Q, D]
        return x + self.ff(x)

    def _cond(self, weights, args) -> torch.Tensor:
        choice = weights.sum(dim=0).argmax()  # one branch for the whole batch (If predicate)

        def run(i):
            return lambda *a: self.branch(i, *a)

        def rest(*a):  # branches 1 and 2
            return torch.cond(choice == 1, run(1), run(2), a)

        return torch.cond(choice == 0, run(0), rest, args)


class TaskRouter(nn.Module):
    def __init__(self, config: RoutingConfig):
        super().__init__()
        c = self.config = config
        if c.routing not in ("soft", "select", "cond"):
            raise ValueError(f"routing must be soft, select or cond, not {c.routing!r}")
        self.queries = nn.Parameter(torch.randn(c.num_queries, c.dim) * 0.02)
        self.controller = nn.Sequential(
            nn.Linear(c.task_dim + c.vision_dim, c.dim), nn.GELU(),
            nn.Linear(c.dim, c.layers * len(BRANCHES)),
        )
        self.layers = nn.ModuleList(RoutedLayer(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)

    def routing_logits(self, task_embedding, pooled) -> torch.Tensor:
        logits = self.controller(torch.cat([task_embedding, pooled], dim=-1))
        return logits.view(-1, self.config.layers, len(BRANCHES))  # [B, layers, branches]

    def forward(
        self, image_features: torch.Tensor, image_mask: torch.Tensor, task_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        b = image_features.shape[0]
        pooled = masked_mean(image_features, image_mask)  # [B, Dv]
        logits = self.routing_logits(task_embedding, pooled)
        if c.routing == "soft":
            weights = logits.softmax(dim=-1)
        else:
            weights = nn.functional.one_hot(logits.argmax(dim=-1), len(BRANCHES)).to(logits.dtype)
        x = self.queries.expand(b, -1, -1)  # [B, Q, D]
        global_mask = key_padding_mask(image_mask, c.num_queries)  # [B, 1, Q, N]
        local_mask = local_window_mask(c.num_queries, image_mask)  # [B, 1, Q, N]
        for i, layer in enumerate(self.layers):
            x = layer(x, image_features, global_mask, local_mask, pooled, weights[:, i], c.routing)
        return self.norm(x), weights


def make_inputs(c: RoutingConfig, *, seed=0, batch=1, tokens=49, pad=False, task=0):
    g = generator(seed)
    # The task embedding depends on ``task`` only, so a case names a task and the image varies.
    tg = generator(10_000 + task)
    return {
        "image_features": features(g, batch, tokens, c.vision_dim),
        "image_mask": token_mask(batch, tokens, pad),
        "task_embedding": 3.0 * features(tg, 1, c.task_dim).expand(batch, -1).clone(),
    }


def branch_coverage(module: TaskRouter, cases) -> list[str]:
    """Every branch of every layer must be chosen by some golden case (hard routing)."""
    chosen = [set() for _ in range(module.config.layers)]
    for _case, _inputs, outputs in cases:
        weights = outputs["routing_weights"]  # [B, layers, branches]
        for layer, picks in enumerate(weights.argmax(-1).T):
            chosen[layer].update(int(p) for p in picks)
    return [
        f"layer {layer}: branch {BRANCHES[b]} is never chosen"
        for layer, seen in enumerate(chosen) for b in range(len(BRANCHES)) if b not in seen
    ]


def text_inputs(c: RoutingConfig, text: str, feed) -> dict[str, np.ndarray]:
    """The task query: an embedding seeded by the text, at the scale of the task cases."""
    return {"task_embedding": text_embedding(text, c.task_dim, scale=3.0)}


# --- attention maps: the branches run inside torch.cond, where no hook may reach ------------


def _routed_inputs(branch: int, mask_name: str):
    """Read a branch's attention inputs at its layer, outside the If, with a gate that is 0
    where the branch did not run."""

    def inputs(layer: RoutedLayer, args: Mapping[str, Any]) -> tuple:
        weights, routing = args["weights"], args["routing"]  # weights: [B, branches]
        if routing == "cond":  # what the If runs: one branch for the whole batch
            gate = (weights.sum(dim=0).argmax() == branch).to(weights.dtype)
        elif routing == "select":  # every branch runs; the sample keeps its own choice
            gate = weights[:, branch, None, None, None]  # [B, 1, 1, 1]
        else:  # soft: every branch contributes
            gate = None
        return layer.norm_q(args["x"]), layer.norm_kv(args["image"]), args[mask_name], gate

    return inputs


def map_sites(module: TaskRouter) -> list[MapSite]:
    sites = []
    for i in range(len(module.layers)):
        sites.append(MapSite(f"layers.{i}.global_attn", i, "global branch", hook=f"layers.{i}",
                             inputs=_routed_inputs(0, "global_mask")))
        sites.append(MapSite(f"layers.{i}.local_attn", i, "local branch", hook=f"layers.{i}",
                             inputs=_routed_inputs(1, "local_mask")))
    return sites


def describe_maps(module: TaskRouter) -> dict[str, Any]:
    return {"routing": {"output": "routing_weights", "branches": list(BRANCHES),
                        "mode": module.config.routing,
                        "map_branch": {MAP_PREFIX + s.core: s.label.split()[0]
                                       for s in map_sites(module)}}}


register(
    MechanismSpec(
        name="routing",
        summary="task-aware dynamic routing: a controller picks the attention branch per layer",
        source="after TADT (task-aware dynamic transformer); branches: global, local, MLP",
        config_cls=RoutingConfig,
        presets={
            "tiny": {},
            # A ViT-L/14 feature width (1024), 64 queries of width 768 (BERT-base), 6 routed
            # layers, 12 heads, task embedding of a sentence encoder (384, MiniLM).
            "base": {"vision_dim": 1024, "dim": 768, "task_dim": 384, "num_queries": 64,
                     "layers": 6, "heads": 12, "ff_mult": 4},
        },
        builder=TaskRouter,
        make_inputs=make_inputs,
        input_names=("image_features", "image_mask", "task_embedding"),
        context_inputs=("image_features", "image_mask"),
        output_names=("query_outputs", "routing_weights"),
        dynamic_axes={
            "image_features": {0: "batch", 1: "tokens"},
            "image_mask": {0: "batch", 1: "tokens"},
            "task_embedding": {0: "batch"},
            "query_outputs": {0: "batch"},
            "routing_weights": {0: "batch"},
        },
        golden_cases=tuple(
            Case(f"task{t}_t{n}", {"batch": 1, "tokens": n, "task": t, "pad": t % 2 == 1},
                 f"task {t}")
            for t, n in ((0, 49), (1, 17), (2, 65), (3, 49), (4, 33), (5, 49), (6, 81), (7, 25))
        ),
        export_case=Case("export", {"batch": 2, "tokens": 37, "task": 0}),
        verify_case=Case("verify", {"batch": 1, "tokens": 101, "task": 1, "pad": True}),
        golden_check=branch_coverage,
        # int8 logits can flip a near-tie argmax and send a request down another branch.
        quantize_exclude=("controller",),
        # int8-static: hard routing as a masked select, not If. ORT's static quantizer does not
        # enter If branches (their MatMuls would stay fp32), and OpenVINO 2026.4 returns NaN on
        # the first inference of the QDQ model with If for some branch choices. Same outputs.
        # int8-nncf: NNCF 3.4 cannot build its graph of a model with If (a body op it
        # cannot find), so the same masked select.
        precision_overrides={"int8-static": {"routing": "select"},
                             "int8-nncf": {"routing": "select"}},
        maps=MapPlan(map_sites, "image_features", 1, "queries", "query_outputs",
                     describe=describe_maps),
        inspect_all_cases=True,  # the cases differ by task: compare them all
        text_inputs=text_inputs,
    )
)

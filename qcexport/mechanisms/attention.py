"""The attention core shared by every mechanism.

One module, two paths behind one switch (as in timm): the fused path calls
``F.scaled_dot_product_attention`` with 4-D q/k/v, which the dynamo exporter lowers to one
opset-23 ``Attention`` node; the math path spells out softmax(QK^T/sqrt(d))V and can return
the attention weights (for attention maps). Both take the same boolean mask (True = may
attend) and both give zeros for a query row that may attend to nothing, as opset-23
``Attention`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_mask(key_valid: torch.Tensor, num_queries: int | torch.SymInt) -> torch.Tensor:
    """[B, Lk] validity -> [B, 1, Lq, Lk] boolean attention mask.

    The mask is expanded over the query axis inside the model because onnxruntime's opset-23
    ``Attention`` CPU kernel rejects a mask broadcast over queries ([B, 1, 1, Lk]).
    """
    batch, keys = key_valid.shape
    return key_valid[:, None, None, :].expand(batch, 1, num_queries, keys)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    fused: bool,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention on [B, H, L, Dh] tensors with a boolean mask.

    Returns (output [B, H, Lq, Dh], weights [B, H, Lq, Lk] or None).
    """
    if fused and not return_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if mask is not None:
        # A finite large negative keeps fp16 exports free of -inf arithmetic.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    if mask is not None:
        # Rows with no visible key: zeros, as SDPA and opset-23 Attention give.
        weights = weights * mask.any(dim=-1, keepdim=True).to(weights.dtype)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention from ``x`` (queries) to ``context`` (keys and values).

    ``context=None`` is self-attention. ``mask`` is boolean, broadcastable to
    [B, H, Lq, Lk], True where a query may attend to a key.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int | None = None,
        head_dim: int | None = None,
        fused: bool = True,
    ):
        super().__init__()
        head_dim = head_dim or dim // heads
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.fused = fused
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(context_dim or dim, inner)
        self.to_v = nn.Linear(context_dim or dim, inner)
        self.to_out = nn.Linear(inner, dim)
        self.last_weights: torch.Tensor | None = None
        self.record_weights = False

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, Dh]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        q = self._split(self.to_q(x))
        k = self._split(self.to_k(context))
        v = self._split(self.to_v(context))
        out, weights = attend(q, k, v, mask, fused=self.fused, return_weights=self.record_weights)
        if self.record_weights:  # no module mutation otherwise: torch.cond branches forbid it
            self.last_weights = weights
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)  # [B, Lq, H*Dh]
        return self.to_out(out)


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear -> GELU -> Linear (pre-norm MLP)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult),
            nn.GELU(),
            nn.Linear(dim * mult, dim),
        )


def set_fused(module: nn.Module, fused: bool) -> nn.Module:
    """Switch every attention core in ``module`` to the fused or the math path."""
    for m in module.modules():
        if isinstance(m, MultiHeadAttention):
            m.fused = fused
    return module


def record_attention(module: nn.Module, enabled: bool = True) -> list[MultiHeadAttention]:
    """Make every attention core keep its weights (math path) after each forward.

    Returns the cores in module order; read ``core.last_weights`` after a forward.
    """
    cores = [m for m in module.modules() if isinstance(m, MultiHeadAttention)]
    for core in cores:
        core.record_weights = enabled
        core.last_weights = None
    return cores

"""Small pieces shared by the mechanism files: seeded example inputs and masks."""

from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def features(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Visual or text features: unit-variance float32."""
    return torch.randn(*shape, generator=g)


def token_mask(batch: int, tokens: int, pad: bool) -> torch.Tensor:
    """[B, N] validity; with ``pad`` the second sample (or the only one) loses its last quarter.

    Padding the tail of one sample and not the other is what a batch of differently sized
    images looks like, and it makes masks that really mask.
    """
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    if pad:
        row = 1 if batch > 1 else 0
        mask[row, tokens - max(1, tokens // 4) :] = False
    return mask


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over axis 1 of [B, N, D] counting only valid tokens ([B, N] boolean)."""
    w = valid.to(x.dtype).unsqueeze(-1)  # [B, N, 1]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)

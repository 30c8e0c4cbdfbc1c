"""Small pieces shared by the mechanism files: seeded example inputs and masks, and the
deterministic stand-ins for a text that `inspect --text` feeds (hashed words, a seeded
embedding), so the same text always gives the same input."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from qcrun.errors import UserError


@dataclass
class VisualConfig:
    """The two widths of a module over visual features: the features' (``vision_dim``, a
    ViT's width) and its own (``dim``). A mechanism's config extends it; a field redeclared
    there keeps its place (first), so configs read and serialise in the same order."""

    vision_dim: int = 48
    dim: int = 64


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


def text_token_ids(text: str, vocab_size: int, max_len: int) -> np.ndarray:
    """[1, T] int64 ids from words by crc32 (ids 1..vocab-1; 0 is left for padding)."""
    words = text.split()
    if not words:
        raise UserError("--text is empty", stage="inspect", hint="pass some words with --text")
    ids = [zlib.crc32(w.lower().encode()) % (vocab_size - 1) + 1 for w in words[:max_len]]
    return np.asarray([ids], dtype=np.int64)


def text_embedding(text: str, dim: int, scale: float = 1.0) -> np.ndarray:
    """[1, dim] float32 embedding seeded by the text, standard normal times ``scale``."""
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return (scale * rng.standard_normal((1, dim))).astype(np.float32)

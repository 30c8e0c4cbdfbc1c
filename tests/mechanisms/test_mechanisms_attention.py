"""The attention core: fused and math paths agree, and empty rows give zeros on both."""

from __future__ import annotations

import pytest
import torch

from qcexport.mechanisms.attention import (
    MultiHeadAttention,
    attend,
    key_padding_mask,
    record_attention,
    set_fused,
)

B, H, LQ, LK, DH = 2, 3, 5, 7, 8
EMPTY_ROW = (1, 2, 3)  # (batch, head, query) that may attend to nothing


@pytest.fixture
def qkv_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, DH, generator=g) for n in (LQ, LK, LK))
    mask = torch.rand(B, H, LQ, LK, generator=g) > 0.5
    mask[..., 0] = True  # every other row sees at least one key
    mask[EMPTY_ROW] = False
    assert not mask.all()  # the mask really masks
    return q, k, v, mask


def test_fused_and_math_agree_with_an_empty_row(qkv_mask):
    q, k, v, mask = qkv_mask
    fused, none = attend(q, k, v, mask, fused=True)
    math, _ = attend(q, k, v, mask, fused=False)
    assert none is None
    assert fused.shape == math.shape == (B, H, LQ, DH)
    assert torch.equal(fused[EMPTY_ROW], torch.zeros(DH))
    assert torch.equal(math[EMPTY_ROW], torch.zeros(DH))
    torch.testing.assert_close(fused, math, atol=1e-5, rtol=0)
    # Not trivially zero elsewhere.
    assert fused.abs().sum(-1).gt(0).sum() == B * H * LQ - 1


def test_math_path_matches_a_reference(qkv_mask):
    q, k, v, mask = qkv_mask
    out, _ = attend(q, k, v, mask, fused=False)
    scores = (q @ k.transpose(-2, -1) / DH**0.5).masked_fill(~mask, float("-inf"))
    ref = torch.nan_to_num(scores.softmax(-1)) @ v
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_mask_none_agrees():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, DH, generator=g) for n in (LQ, LK, LK))
    fused, _ = attend(q, k, v, None, fused=True)
    math, weights = attend(q, k, v, None, fused=False, return_weights=True)
    torch.testing.assert_close(fused, math, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, LQ), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
def test_return_weights(qkv_mask, fused):
    q, k, v, mask = qkv_mask
    out, weights = attend(q, k, v, mask, fused=fused, return_weights=True)
    assert weights.shape == (B, H, LQ, LK)
    expected_sums = torch.ones(B, H, LQ)
    expected_sums[EMPTY_ROW] = 0.0
    torch.testing.assert_close(weights.sum(-1), expected_sums, atol=1e-6, rtol=0)
    assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))
    torch.testing.assert_close(out, weights @ v, atol=1e-6, rtol=0)


def test_key_padding_mask():
    valid = torch.tensor([[True, True, False], [True, False, False]])
    mask = key_padding_mask(valid, 4)
    assert mask.shape == (2, 1, 4, 3)
    for b in range(2):
        for i in range(4):
            assert torch.equal(mask[b, 0, i], valid[b])


def test_set_fused_and_record_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, context_dim=12)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 12)
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    mask = key_padding_mask(valid, 3)
    with torch.no_grad():
        fused = set_fused(mha, True)(x, ctx, mask)
        assert mha.last_weights is None  # a plain forward keeps nothing
        (core,) = record_attention(mha)
        math = set_fused(mha, False)(x, ctx, mask)
    assert core is mha and mha.fused is False
    torch.testing.assert_close(fused, math, atol=1e-5, rtol=0)
    weights = mha.last_weights
    assert weights.shape == (2, 2, 3, 5)
    assert torch.equal(weights[1, :, :, 2:], torch.zeros(2, 3, 3))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 3), atol=1e-6, rtol=0)

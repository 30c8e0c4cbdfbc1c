"""Perceiver-style latents (Perceiver, Perceiver IO, Flamingo's resampler) summarise a *set*.

Any number of visual tokens gives the same output shape, and, with no positional encoding on
the visual tokens, a permutation of them (mask included) leaves the output unchanged.
"""

from __future__ import annotations

import pytest
import torch

from qcexport import mechanisms
from qcexport.mechanisms.attention import set_fused
from qcexport.mechanisms.registry import Case

TOKEN_SETS = ("perceiver", "perceiver-io", "flamingo-resampler")
TOKEN_COUNTS = (16, 257, 1024)


def token_axis(spec, name: str = "image_features") -> int:
    (axis,) = [a for a, n in spec.dynamic_axes[name].items() if n == "tokens"]
    return axis


def expected_shape(name: str, c, batch: int) -> tuple[int, ...]:
    if name == "perceiver":
        return (batch, c.num_latents, c.dim)
    if name == "perceiver-io":
        return (batch, c.num_outputs, c.output_dim)
    return (batch, 1, c.num_latents, c.dim)  # flamingo-resampler, one media item


@pytest.mark.parametrize("name", TOKEN_SETS)
def test_output_shape_does_not_depend_on_token_count(name, forward):
    spec = mechanisms.get(name)
    module = mechanisms.create(name)
    outputs = []
    for tokens in TOKEN_COUNTS:
        feed = spec.inputs(module.config, Case("n", {"batch": 2, "tokens": tokens, "pad": True}))
        assert feed["image_features"].shape[token_axis(spec)] == tokens
        (out,) = forward(module, feed)
        assert out.shape == expected_shape(name, module.config, 2)
        assert torch.isfinite(out).all()
        outputs.append(out)
    # Different images give different summaries (the shape test is not about a constant).
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("tokens", [17, 257])
@pytest.mark.parametrize("name", TOKEN_SETS)
def test_permuting_visual_tokens_changes_nothing(name, tokens, fused, forward):
    spec = mechanisms.get(name)
    module = set_fused(mechanisms.create(name), fused)
    feed = spec.inputs(module.config, Case("n", {"batch": 2, "tokens": tokens, "pad": True}), 3)
    axis = token_axis(spec)
    perm = torch.randperm(tokens, generator=torch.Generator().manual_seed(tokens))
    assert not torch.equal(perm, torch.arange(tokens))
    permuted = {k: v.index_select(axis, perm) for k, v in feed.items()}
    assert not torch.equal(permuted["image_mask"], feed["image_mask"])  # padding moved too
    (ref,) = forward(module, feed)
    (out,) = forward(module, permuted)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_resampler_media_items_are_resampled_apart(forward):
    """Each media item gets its own latents: changing item 2 leaves item 1's latents alone."""
    spec = mechanisms.get("flamingo-resampler")
    module = mechanisms.create("flamingo-resampler")
    feed = spec.inputs(module.config, Case("m2", {"batch": 2, "media": 2, "tokens": 9}), 0)
    edited = dict(feed, image_features=feed["image_features"].clone())
    g = torch.Generator().manual_seed(1)
    edited["image_features"][:, 1] += torch.randn(edited["image_features"][:, 1].shape, generator=g)
    (ref,) = forward(module, feed)
    (out,) = forward(module, edited)
    assert torch.equal(out[:, 0], ref[:, 0])
    assert (out[:, 1] - ref[:, 1]).abs().amax(dim=(-1, -2)).min() > 1e-3


def test_resampler_media_embedding_distinguishes_items(forward):
    """The same image as item 1 and as item 2 gives different latents (time embedding)."""
    module = mechanisms.create("flamingo-resampler")
    image = torch.randn(1, 1, 9, module.config.dim, generator=torch.Generator().manual_seed(0))
    feed = {
        "image_features": image.expand(1, 2, 9, -1).clone(),
        "image_mask": torch.ones(1, 2, 9, dtype=torch.bool),
    }
    (out,) = forward(module, feed)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-4

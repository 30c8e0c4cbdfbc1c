"""Q-Former: text conditions the queries; padding text and absent text do not."""

from __future__ import annotations

import pytest
import torch

from qcexport import mechanisms
from qcexport.mechanisms.attention import set_fused
from qcexport.mechanisms.registry import Case

NAME = "qformer"
SPEC = mechanisms.get(NAME)
CONDITIONING = ("joint", "modulate")
PADDED = Case("pad", {"batch": 2, "tokens": 17, "text": 8, "pad": True})


def build(conditioning: str, fused: bool = True):
    return set_fused(mechanisms.create(NAME, conditioning=conditioning), fused)


@pytest.mark.parametrize("conditioning", CONDITIONING)
def test_text_changes_the_queries(conditioning, forward):
    module = build(conditioning)
    feed = SPEC.inputs(module.config, PADDED, seed=0)
    other = SPEC.inputs(module.config, PADDED, seed=1)["text_ids"]
    assert (other != feed["text_ids"])[feed["text_mask"]].any()
    (ref,) = forward(module, feed)
    (out,) = forward(module, {**feed, "text_ids": other})
    # Every sample (the padded one included) has valid text, so every sample moves.
    assert (out - ref).abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("conditioning", CONDITIONING)
def test_padding_text_is_invisible(conditioning, fused, forward):
    module = build(conditioning, fused)
    feed = SPEC.inputs(module.config, PADDED, seed=0)
    pad = ~feed["text_mask"]
    assert pad.any()
    ids = feed["text_ids"].clone()
    ids[pad] = 1 + ids[pad] % 50  # a different id at every padding position
    assert not torch.equal(ids, feed["text_ids"])
    (ref,) = forward(module, feed)
    (out,) = forward(module, {**feed, "text_ids": ids})
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("conditioning", CONDITIONING)
def test_no_text_equals_all_padding(conditioning, fused, forward):
    module = build(conditioning, fused)
    (case,) = [c for c in SPEC.golden_cases if c.params.get("no_text")]
    feed = SPEC.inputs(module.config, case, seed=0)
    assert not feed["text_mask"].any()
    (padded,) = forward(module, feed)
    with torch.no_grad():
        absent = module(feed["image_features"])
    torch.testing.assert_close(absent, padded, atol=1e-6, rtol=0)
    # ...and text, once present, matters.
    (with_text,) = forward(module, {**feed, "text_mask": torch.ones_like(feed["text_mask"])})
    assert (with_text - padded).abs().max() > 1e-3


def test_image_changes_the_queries(forward):
    module = build("joint")
    feed = SPEC.inputs(module.config, PADDED, seed=0)
    image = SPEC.inputs(module.config, PADDED, seed=5)["image_features"]
    (ref,) = forward(module, feed)
    (out,) = forward(module, {**feed, "image_features": image})
    assert (out - ref).abs().amax(dim=(1, 2)).min() > 1e-3


def test_unknown_conditioning_is_rejected():
    with pytest.raises(ValueError, match="joint"):
        mechanisms.create(NAME, conditioning="concat")

"""Flamingo gated cross-attention: closed gates are the identity, and text sees only its image."""

from __future__ import annotations

import math

import pytest
import torch

from qcexport import mechanisms
from qcexport.mechanisms.attention import set_fused

NAME = "flamingo-xattn"
SPEC = mechanisms.get(NAME)
CASES = SPEC.golden_cases
CASE_IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_closed_gates_are_the_identity(case, forward):
    module = mechanisms.create(NAME, gate_init=0.0)
    assert module.gates() == [(0.0, 0.0)] * module.config.layers
    feed = SPEC.inputs(module.config, case, seed=0)
    for fused in (True, False):
        (out,) = forward(set_fused(module, fused), feed)
        assert torch.equal(out, feed["text_hidden"])


def test_tiny_preset_opens_the_gates():
    module = mechanisms.create(NAME)
    for attn, ff in module.gates():
        assert attn == pytest.approx(math.tanh(0.55), abs=1e-6)
        assert ff == pytest.approx(math.tanh(0.55), abs=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_only_text_after_an_image_changes(case, fused, forward):
    module = set_fused(mechanisms.create(NAME), fused)
    feed = SPEC.inputs(module.config, case, seed=0)
    ids, h = feed["media_ids"], feed["text_hidden"]
    assert (ids == 0).any() and (ids > 0).any()  # the case has text before and after images
    (out,) = forward(module, feed)
    assert torch.isfinite(out).all()
    before = ids == 0
    assert torch.equal(out[before], h[before])
    # Every token that follows an image is changed by it.
    assert (out[~before] - h[~before]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_text_attends_only_to_its_own_image(case, fused, forward):
    module = set_fused(mechanisms.create(NAME), fused)
    feed = SPEC.inputs(module.config, case, seed=0)
    ids = feed["media_ids"]
    (ref,) = forward(module, feed)
    g = torch.Generator().manual_seed(2)
    for item in range(1, feed["media_features"].shape[1] + 1):
        media = feed["media_features"].clone()
        media[:, item - 1] += torch.randn(media[:, item - 1].shape, generator=g)
        (out,) = forward(module, {**feed, "media_features": media})
        own = ids == item
        assert own.any()
        assert torch.equal(out[~own], ref[~own]), f"media item {item} leaked to other tokens"
        assert (out[own] - ref[own]).abs().amax(dim=-1).min() > 1e-4

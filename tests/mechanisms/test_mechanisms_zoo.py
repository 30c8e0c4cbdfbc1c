"""Checks every registered mechanism must pass: fused = math, and masks that really mask.

``MASK_CASES`` holds, per mechanism, inputs whose mask hides some positions and a way to
perturb the hidden or the visible ones. A mechanism registered without an entry fails
``test_every_mechanism_has_a_mask_case``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from qcexport import mechanisms
from qcexport.mechanisms.attention import MultiHeadAttention, set_fused
from qcexport.mechanisms.registry import Case

Feed = dict[str, torch.Tensor]
# edit(module, feed, hidden, generator) -> a feed (or module) changed only where the mask hides
# (hidden=True) or only where it shows (hidden=False)
Edit = Callable[[nn.Module, Feed, bool, torch.Generator], Feed]


@dataclass(frozen=True)
class MaskCase:
    case: Case
    edit: Edit
    # Rows of the first output that an edit of hidden positions must leave unchanged, as a
    # boolean over its leading axes; None: the whole output.
    kept: Callable[[Feed], torch.Tensor] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)


def golden(name: str, case_name: str) -> Case:
    (case,) = [c for c in mechanisms.get(name).golden_cases if c.name == case_name]
    return case


def edit_positions(input_name: str, hidden_where: Callable[[Feed], torch.Tensor]) -> Edit:
    """Perturb ``input_name`` where ``hidden_where(feed)`` is True (hidden) or False (visible)."""

    def edit(module, feed, hidden, g):
        where = hidden_where(feed)
        where = where if hidden else ~where
        assert where.any() and not where.all(), "the case must hide some positions, not all"
        x = feed[input_name].clone()
        if x.is_floating_point():
            x[where] += 3.0 * torch.randn(x[where].shape, generator=g)
        else:
            x[where] = 1 + x[where] % 50  # always a different id, inside the tiny vocabulary
        return {**feed, input_name: x}

    return edit


def invalid(mask_name: str) -> Callable[[Feed], torch.Tensor]:
    return lambda feed: ~feed[mask_name]


def media_item(k: int) -> Callable[[Feed], torch.Tensor]:
    """Every visual token of (1-based) media item k: [B, M, N]."""

    def where(feed):
        b, m, n, _ = feed["media_features"].shape
        sel = torch.zeros(b, m, n, dtype=torch.bool)
        sel[:, k - 1] = True
        return sel

    return where


def edit_late_queries(module, feed, hidden, g):
    """num_queries is the Matryoshka mask: queries m.. must not matter, queries ..m must."""
    m = int(feed["num_queries"])
    rows = slice(m, None) if hidden else slice(0, m)
    with torch.no_grad():
        queries = module.queries[rows]
        queries += torch.randn(queries.shape, generator=g)
    return feed


MASK_CASES: dict[str, MaskCase] = {
    "perceiver": MaskCase(
        golden("perceiver", "b2_t17_pad"), edit_positions("image_features", invalid("image_mask"))
    ),
    "perceiver-io": MaskCase(
        golden("perceiver-io", "b2_t17_pad"),
        edit_positions("image_features", invalid("image_mask")),
    ),
    "flamingo-resampler": MaskCase(
        golden("flamingo-resampler", "b2_m2_t17_pad"),
        edit_positions("image_features", invalid("image_mask")),
    ),
    # Text attends only to its own image: item 2 is hidden from every token not tied to it.
    "flamingo-xattn": MaskCase(
        golden("flamingo-xattn", "b2_t9_m3"),
        edit_positions("media_features", media_item(2)),
        kept=lambda feed: feed["media_ids"] != 2,
    ),
    "qformer": MaskCase(
        golden("qformer", "b2_t17_textpad"), edit_positions("text_ids", invalid("text_mask"))
    ),
    # Soft routing runs every branch, so the local windows (two of them wholly padded here) and
    # the global branch both see the mask.
    "routing": MaskCase(
        golden("routing", "task1_t17"),
        edit_positions("image_features", invalid("image_mask")),
        overrides={"routing": "soft"},
    ),
    "matryoshka": MaskCase(golden("matryoshka", "b2_t17_m9"), edit_late_queries),
}

CASES = [(n, c) for n in mechanisms.names() for c in mechanisms.get(n).golden_cases]


def test_every_mechanism_has_a_mask_case():
    assert sorted(MASK_CASES) == sorted(mechanisms.names())


def assert_fused_matches_math(module, feed, forward):
    assert any(isinstance(m, MultiHeadAttention) for m in module.modules())
    fused = forward(set_fused(module, True), feed)
    math = forward(set_fused(module, False), feed)
    assert len(fused) == len(math)
    for a, b in zip(fused, math, strict=True):
        assert a.shape == b.shape
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "case"), CASES, ids=[f"{n}-{c.name}" for n, c in CASES])
def test_fused_matches_math_on_golden_cases(name, case, forward):
    module = mechanisms.create(name)
    feed = mechanisms.get(name).inputs(module.config, case, seed=0)
    assert_fused_matches_math(module, feed, forward)


@pytest.mark.parametrize("name", mechanisms.names())
def test_fused_matches_math_with_masks(name, forward):
    mc = MASK_CASES[name]
    module = mechanisms.create(name, **mc.overrides)
    feed = mechanisms.get(name).inputs(module.config, mc.case, seed=1)
    assert_fused_matches_math(module, feed, forward)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "math"])
@pytest.mark.parametrize("name", mechanisms.names())
def test_mask_hides_what_it_should(name, fused, forward):
    mc = MASK_CASES[name]
    spec = mechanisms.get(name)
    g = torch.Generator().manual_seed(7)

    def run(edit_hidden: bool | None):
        module = set_fused(mechanisms.create(name, **mc.overrides), fused)
        feed = spec.inputs(module.config, mc.case, seed=1)
        if edit_hidden is not None:
            feed = mc.edit(module, feed, edit_hidden, g)
        return feed, forward(module, feed)

    feed, ref = run(None)
    _, hidden = run(True)
    _, visible = run(False)

    kept = mc.kept(feed) if mc.kept else torch.ones(ref[0].shape[:1], dtype=torch.bool)
    torch.testing.assert_close(hidden[0][kept], ref[0][kept], atol=1e-6, rtol=0)
    for a, b in zip(hidden[1:], ref[1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # ...while the same edit of visible positions moves the output.
    assert (visible[0] - ref[0]).abs().max() > 1e-3

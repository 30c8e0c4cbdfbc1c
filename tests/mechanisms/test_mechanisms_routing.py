"""Task-aware routing: hard routing is soft routing with one-hot weights, and every branch is
reachable from some task of the golden set."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from qcexport import mechanisms
from qcexport.mechanisms.attention import set_fused
from qcexport.mechanisms.registry import Case
from qcexport.mechanisms.routing import BRANCHES

NAME = "routing"
SPEC = mechanisms.get(NAME)
MODES = ("soft", "select", "cond")
LAYERS = SPEC.config("tiny").layers
CHOICES = list(itertools.product(range(len(BRANCHES)), repeat=LAYERS))
# Two samples, one padded; a forced choice is the same for both, so `cond` (one branch per
# batch) must equal `select` (one branch per sample).
BATCH = Case("b2_pad", {"batch": 2, "tokens": 17, "pad": True, "task": 1})


@pytest.fixture(scope="module")
def routers():
    """One module per routing mode; `create` seeds, so all three share their weights."""
    return {mode: mechanisms.create(NAME, routing=mode) for mode in MODES}


def force(module, monkeypatch, choice: tuple[int, ...]) -> None:
    """Make the controller pick ``choice`` (a branch per layer) for every sample.

    Logits of 1e4 * one_hot make the softmax exactly one-hot in float32 (exp(-1e4) == 0).
    """

    def routing_logits(task_embedding, pooled):
        onehot = F.one_hot(torch.tensor(choice), len(BRANCHES)).to(pooled.dtype)
        return 1e4 * onehot.expand(pooled.shape[0], -1, -1)  # [B, layers, branches]

    monkeypatch.setattr(module, "routing_logits", routing_logits)


def test_variants_share_weights(routers):
    soft = routers["soft"].state_dict()
    for mode in ("select", "cond"):
        other = routers[mode].state_dict()
        assert all(torch.equal(soft[k], other[k]) for k in soft)


@pytest.mark.parametrize("choice", CHOICES, ids=["-".join(map(str, c)) for c in CHOICES])
def test_hard_routing_equals_soft_with_one_hot_weights(choice, routers, monkeypatch, forward):
    feed = SPEC.inputs(routers["soft"].config, BATCH, seed=0)
    expected = F.one_hot(torch.tensor(choice), len(BRANCHES)).float().expand(2, -1, -1)
    outputs = {}
    for mode, module in routers.items():
        force(module, monkeypatch, choice)
        outputs[mode], weights = forward(module, feed)
        assert torch.equal(weights, expected), mode
        assert torch.isfinite(outputs[mode]).all()
    torch.testing.assert_close(outputs["select"], outputs["soft"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs["cond"], outputs["soft"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", range(LAYERS))
def test_branches_differ(layer, routers, monkeypatch, forward):
    """The forced choice matters: each branch of a layer gives a different output."""
    module = routers["select"]
    feed = SPEC.inputs(module.config, BATCH, seed=0)
    outs = []
    for branch in range(len(BRANCHES)):
        choice = [0] * LAYERS
        choice[layer] = branch
        force(module, monkeypatch, tuple(choice))
        outs.append(forward(module, feed)[0])
    for a, b in itertools.combinations(outs, 2):
        assert (a - b).abs().max() > 1e-3


def golden_weights(module, forward) -> torch.Tensor:
    """Routing weights over the golden cases: [cases, layers, branches] (batch 1 each)."""
    rows = []
    for case in SPEC.golden_cases:
        feed = SPEC.inputs(module.config, case, seed=0)
        _, weights = forward(module, feed)
        assert weights.shape == (1, LAYERS, len(BRANCHES))
        rows.append(weights[0])
    return torch.stack(rows)


def test_every_branch_is_reachable_from_a_golden_task(routers, forward):
    chosen = golden_weights(routers["select"], forward).argmax(dim=-1)  # [cases, layers]
    missing = {
        layer: [BRANCHES[b] for b in range(len(BRANCHES)) if not (chosen[:, layer] == b).any()]
        for layer in range(LAYERS)
    }
    assert not any(missing.values()), f"branches no golden case routes to, per layer: {missing}"


def test_routing_weights(routers, forward):
    soft = golden_weights(routers["soft"], forward)
    assert (soft > 0).all()
    torch.testing.assert_close(soft.sum(-1), torch.ones(soft.shape[:2]), atol=1e-6, rtol=0)
    expected = F.one_hot(soft.argmax(-1), len(BRANCHES)).float()
    for mode in ("select", "cond"):
        assert torch.equal(golden_weights(routers[mode], forward), expected), mode


@pytest.mark.parametrize("case", SPEC.golden_cases, ids=[c.name for c in SPEC.golden_cases])
def test_cond_equals_select_for_one_sample(case, routers, forward):
    feed = SPEC.inputs(routers["cond"].config, case, seed=0)
    cond_out, cond_w = forward(routers["cond"], feed)
    select_out, select_w = forward(routers["select"], feed)
    assert torch.equal(cond_w, select_w)
    torch.testing.assert_close(cond_out, select_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_fused_matches_math_in_every_mode(mode, forward):
    module = mechanisms.create(NAME, routing=mode)
    feed = SPEC.inputs(module.config, BATCH, seed=0)
    fused = forward(set_fused(module, True), feed)
    math = forward(set_fused(module, False), feed)
    for a, b in zip(fused, math, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_unknown_routing_is_rejected():
    with pytest.raises(ValueError, match="soft, select or cond"):
        mechanisms.create(NAME, routing="sample")

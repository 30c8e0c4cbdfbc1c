"""Attention maps as extra outputs, in PyTorch eager: values, regular outputs, routing, gates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qcrun.diagnostics import Run, analyse, token_grid

from qcexport import mechanisms
from qcexport.diagnostics.render import heatmap
from qcexport.export.maps import MAP_PREFIX, with_attention_maps
from qcexport.mechanisms.attention import record_attention, set_fused


@pytest.mark.slow
@pytest.mark.parametrize("name", mechanisms.names())
def test_regular_outputs_unchanged_and_maps_are_distributions(name, golden_feed, eager_maps):
    spec = mechanisms.get(name)
    feed = golden_feed(name)
    module = mechanisms.create(name, "tiny")
    with torch.no_grad():
        plain = module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    plain = plain if isinstance(plain, tuple) else (plain,)
    wrapped, outs = eager_maps(name, feed, module=module)

    for out_name, ref in zip(spec.output_names, plain, strict=True):
        np.testing.assert_array_equal(outs[out_name], ref.numpy())  # bit for bit
    maps = [n for n in wrapped.output_names if n.startswith(MAP_PREFIX)]
    assert maps, f"{name} has no attention map"
    for map_name in maps:
        sums = outs[map_name].sum(axis=-1)
        assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0)), map_name  # distributions or empty
        assert np.all(outs[map_name] >= 0)
    # No hook is left behind on the shared submodules, and the wrapper kept the weights' names.
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in module.modules())
    assert list(wrapped.state_dict()) == list(module.state_dict())


def test_maps_are_the_math_path_weights(golden_feed, eager_maps):
    """The map equals the weights the core itself computes on its math path."""
    feed = golden_feed("qformer", 1)  # two images, padded text
    module = mechanisms.create("qformer", "tiny")
    _, outs = eager_maps("qformer", feed, module=module)
    cores = record_attention(set_fused(module, False))
    with torch.no_grad():
        module(**{k: torch.from_numpy(v) for k, v in feed.items()})
    recorded = module.layers[0].cross_attn.last_weights.mean(dim=1).numpy()
    record_attention(set_fused(module, True), enabled=False)
    assert cores
    np.testing.assert_allclose(outs["attn_map.layers.0.cross_attn"], recorded, atol=1e-7)


def test_per_head_maps_average_to_the_mean_map(golden_feed, eager_maps):
    feed = golden_feed("perceiver-io")
    _, mean = eager_maps("perceiver-io", feed)
    wrapped, each = eager_maps("perceiver-io", feed, heads="each")
    config = mechanisms.get("perceiver-io").config("tiny")
    assert each["attn_map.encode.attn"].shape == (1, config.cross_heads, 16, 49)
    for name in ("attn_map.encode.attn", "attn_map.decode.attn"):
        np.testing.assert_allclose(each[name].mean(axis=1), mean[name], atol=1e-7)
    assert wrapped.maps_descriptor()["heads"] == "each"


def _one_token_perceiver(query: int, token: int, tokens: int):
    """A Perceiver whose latent ``query`` equals visual token ``token``, with identity key and
    (scaled) query projections: that query must put nearly all its weight on that token."""
    module = mechanisms.create("perceiver", "tiny")
    g = torch.Generator().manual_seed(5)
    attn = module.encode.attn
    dim = attn.to_q.in_features
    with torch.no_grad():
        attn.to_q.weight.copy_(3.0 * torch.eye(dim))
        attn.to_q.bias.zero_()
        attn.to_k.weight.copy_(torch.eye(dim))
        attn.to_k.bias.zero_()
        shared = torch.randn(dim, generator=g)
        module.latents[query] = shared
    features = torch.randn(1, tokens, dim, generator=g)
    features[0, token] = shared  # LayerNorm makes both the same unit-variance vector
    feed = {"image_features": features.numpy(), "image_mask": np.ones((1, tokens), dtype=bool)}
    return module, feed


@pytest.mark.parametrize(("tokens", "token", "cell"), [(49, 23, (3, 2)), (50, 24, (3, 2))])
def test_one_token_case_peaks_at_that_token(tokens, token, cell, eager_maps):
    query = 5
    module, feed = _one_token_perceiver(query, token, tokens)
    wrapped, outs = eager_maps("perceiver", feed, module=module)
    analysis = analyse(wrapped.maps_descriptor(), [Run("one-token", feed, outs)])
    m = analysis["cases"][0]["maps"][0]

    assert m["peak_token"][query] == token
    assert m["peak_weight"][query] > 0.99
    assert m["peak_cell"][query] == list(cell)
    assert m["normalized_entropy"][query] < 0.05  # one token: almost no entropy
    on_token = outs["attn_map.encode.attn"][0, :, token]
    assert np.delete(on_token, query).max() < 0.5  # the other latents look elsewhere
    if tokens == 50:  # 7x7 + CLS: the CLS token (index 0) is not drawn on the grid
        assert analysis["cases"][0]["grid"]["layout"] == "grid+cls"

    # The rendered heatmap's brightest cell is that token's cell.
    grid = token_grid(tokens)
    picture = np.asarray(heatmap(outs["attn_map.encode.attn"][0, query], grid, peak=False),
                         dtype=float)
    size = picture.shape[0] // grid.rows
    r, c = np.unravel_index(picture.sum(axis=2).argmax(), picture.shape[:2])
    assert (r // size, c // size) == cell


@pytest.mark.slow
def test_routing_returns_maps_only_for_the_branch_that_ran(golden_feed, eager_maps):
    spec = mechanisms.get("routing")
    seen = set()
    for index in range(len(spec.golden_cases)):
        feed = golden_feed("routing", index)
        _, outs = eager_maps("routing", feed)
        choice = outs["routing_weights"][0].argmax(axis=-1)  # [layers], batch 1
        for layer, branch in enumerate(choice):
            global_ran = np.any(outs[f"attn_map.layers.{layer}.global_attn"] > 0)
            local_ran = np.any(outs[f"attn_map.layers.{layer}.local_attn"] > 0)
            assert (global_ran, local_ran) == (branch == 0, branch == 1)
            seen.add(int(branch))
    assert seen == {0, 1, 2}  # the golden cases make every branch run


def test_routing_select_mode_keeps_each_samples_choice(golden_feed, eager_maps):
    first, second = golden_feed("routing", 0), golden_feed("routing", 5)  # both 49 tokens
    two = {k: np.concatenate([first[k], second[k]]) for k in first}
    _, outs = eager_maps("routing", two, routing="select")
    choice = outs["routing_weights"].argmax(axis=-1)  # [B, layers]
    assert choice[0].tolist() != choice[1].tolist()  # the two tasks route differently
    for b in range(2):
        for layer in range(choice.shape[1]):
            ran = np.any(outs[f"attn_map.layers.{layer}.global_attn"][b] > 0)
            assert ran == (choice[b, layer] == 0)


@pytest.mark.parametrize("gate_init", [0.0, 0.55])
def test_flamingo_gate_share_is_zero_at_alpha_zero(gate_init, golden_feed, eager_maps):
    feed = golden_feed("flamingo-xattn", gate_init=gate_init)
    wrapped, outs = eager_maps("flamingo-xattn", feed, gate_init=gate_init)
    gates = outs["xattn_gates"]
    np.testing.assert_allclose(gates, np.tanh(gate_init), atol=1e-7)
    analysis = analyse(wrapped.maps_descriptor(), [Run("gates", feed, outs)])
    result = analysis["cases"][0]["gates"]
    shares = [layer["visual_share"] for layer in result["layers"]]
    if gate_init == 0.0:
        assert np.all(outs["xattn_visual_share"] == 0)
        assert shares == [0.0, 0.0]
        assert result["overall_visual_share"] == 0.0
        np.testing.assert_array_equal(outs["text_hidden_out"], feed["text_hidden"])
    else:
        assert all(0.05 < s < 0.95 for s in shares)
        assert result["overall_visual_share"] > 0.05
    # Text before any image never sees vision: its share is 0 whatever the gate.
    blind = feed["media_ids"][0] == 0
    assert blind.any() and np.all(outs["xattn_visual_share"][0][:, blind] == 0)


def test_two_identical_queries_are_flagged_as_duplicates(golden_feed, eager_maps):
    module = mechanisms.create("qformer", "tiny")
    with torch.no_grad():
        module.query_tokens[6] = module.query_tokens[2]
    feed = golden_feed("qformer", 0)
    wrapped, outs = eager_maps("qformer", feed, module=module)
    analysis = analyse(wrapped.maps_descriptor(), [Run("dup", feed, outs)])
    spec = analysis["cases"][0]["specialisation"]
    pairs = {(d["i"], d["j"]): d for d in spec["near_duplicates"]}
    assert (2, 6) in pairs
    assert pairs[(2, 6)]["output_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert pairs[(2, 6)]["attention_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(pairs) == 1  # the other, distinct queries are not flagged


def test_wrapping_twice_and_unknown_mechanism_are_refused():
    from qcrun.errors import UserError

    module = mechanisms.create("qformer", "tiny")
    wrapped = with_attention_maps(module, "qformer", ["query_outputs"])
    with pytest.raises(RuntimeError, match="already"):
        with_attention_maps(wrapped, "qformer", ["query_outputs"])
    with pytest.raises(UserError, match="built-in mechanisms"):
        with_attention_maps(module, "mine", ["query_outputs"])

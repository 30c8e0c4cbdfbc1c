"""Matryoshka queries: m of M queries, chosen at run time."""

from __future__ import annotations

import pytest
import torch

from qcexport import mechanisms
from qcexport.mechanisms.registry import Case

NAME = "matryoshka"
SPEC = mechanisms.get(NAME)
M = SPEC.config("tiny").max_queries
IMAGE = Case("b2_t17", {"batch": 2, "tokens": 17})


def feed_for(module, m: int | None, seed: int = 0):
    params = dict(IMAGE.params) if m is None else {**IMAGE.params, "m": m}
    return SPEC.inputs(module.config, Case("m", params), seed=seed)


@pytest.fixture(scope="module")
def module():
    return mechanisms.create(NAME)


@pytest.mark.parametrize("m", [1, 3, 8, M])
def test_m_queries_give_m_tokens(m, module, forward):
    (out,) = forward(module, feed_for(module, m))
    assert out.shape == (2, m, module.config.output_dim)
    assert torch.isfinite(out).all()
    (again,) = forward(module, feed_for(module, m))
    assert torch.equal(out, again)


def test_all_queries_is_the_default(module, forward):
    default = feed_for(module, None)
    assert int(default["num_queries"]) == M
    (full,) = forward(module, default)
    # independently: every learned query through the layers, with no num_queries at all
    with torch.no_grad():
        image = default["image_features"]
        x = module.queries.expand(image.shape[0], -1, -1)
        for layer in module.layers:
            x = layer(x, image)
        expected = module.proj(module.norm(x))
    assert full.shape == (2, M, module.config.output_dim)
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_prefix_depends_on_m(k, module, forward):
    """The queries self-attend among the m that run, so the first k of M are not the k-run.

    (Nesting here means queries after m never run, not that a prefix is frozen.)
    """
    (short,) = forward(module, feed_for(module, k))
    (full,) = forward(module, feed_for(module, M))
    assert (full[:, :k] - short).abs().max() > 1e-4


def test_outputs_depend_on_the_image(module, forward):
    (a,) = forward(module, feed_for(module, 4, seed=0))
    (b,) = forward(module, feed_for(module, 4, seed=1))
    assert (a - b).abs().amax(dim=(1, 2)).min() > 1e-3


@pytest.mark.parametrize("m", [0, -1, M + 1])
def test_m_out_of_range_raises(m, module):
    feed = feed_for(module, m)
    with pytest.raises(RuntimeError), torch.no_grad():
        module(*feed.values())

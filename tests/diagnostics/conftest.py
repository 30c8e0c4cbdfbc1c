"""Fixtures for the diagnostics tests.

Exports are the slow part, so the two models exported with attention maps (the Q-Former, and
a one-layer router whose branches run inside ONNX ``If``) are converted once per session
(``tiny_models``, shared with the other folders).
Helpers are fixtures: the test folders have no ``__init__.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcexport import mechanisms
from qcexport.export.maps import with_attention_maps


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def exported(tiny_models):
    """exported(name, **overrides) -> ConvertResult of the tiny preset with attention maps,
    exported once per session (testsupport.models): read it, never write it."""

    def get(name: str, **overrides):
        return tiny_models.get(name, "tiny", with_attention_maps=True, **overrides)

    return get


@pytest.fixture
def eager_maps():
    """eager_maps(name, feed, **overrides) -> (module with maps, {output name: array})."""

    def run(name: str, feed, heads: str = "mean", module=None, **overrides):
        spec = mechanisms.get(name)
        module = module if module is not None else mechanisms.create(name, "tiny", **overrides)
        wrapped = with_attention_maps(module, name, spec.output_names, heads=heads)
        with torch.no_grad():
            out = wrapped(**{k: torch.as_tensor(np.asarray(v)) for k, v in feed.items()})
        return wrapped, {n: o.numpy() for n, o in zip(wrapped.output_names, out, strict=True)}

    return run


@pytest.fixture
def golden_feed():
    """golden_feed(name, index=0, **overrides) -> numpy inputs of the spec's golden case."""
    from qcexport.golden import GOLDEN_SEED

    def make(name: str, index: int = 0, **overrides):
        spec = mechanisms.get(name)
        config = spec.config("tiny", **overrides)
        feed = spec.inputs(config, spec.golden_cases[index], seed=GOLDEN_SEED + index)
        return {k: v.numpy() for k, v in feed.items()}

    return make

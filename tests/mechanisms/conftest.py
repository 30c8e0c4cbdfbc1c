"""Fixtures shared by the mechanism tests.

Helpers are fixtures rather than importable functions: the test folders have no
``__init__.py``, so a ``from conftest import ...`` would depend on which conftest is found.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (inputs use their own generators)."""
    torch.manual_seed(0)


@pytest.fixture
def forward():
    """forward(module, feed) -> tuple of outputs, without autograd, whatever the module returns."""

    def run(module: torch.nn.Module, feed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = module(*feed.values())
        return out if isinstance(out, tuple) else (out,)

    return run

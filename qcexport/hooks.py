"""Every PyTorch module's output, from forward hooks: the eager reference of localisation (and
of the module outputs `qcexport golden --with-intermediates` stores).

A first pass records, per case, the order in which modules finish (execution order) and the
size of each output; later passes keep only the outputs of the modules asked for, so a base
model's intermediates are never all held at once. A module called more than once in a case has
no single output to compare and is left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn


def _python_cond(pred, true_fn, false_fn, operands=(), **_):
    """``torch.cond`` as the Python branch it means: in eager mode torch.cond traces its
    branches with dynamo, which cannot trace the hooks that record module outputs."""
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((o for o in map(_first_tensor, output) if o is not None), None)
    return None


class EagerReference:
    """``qcrun.localize.Reference`` over a PyTorch module and the cases' inputs."""

    name = "eager"

    def __init__(self, module: nn.Module, inputs: Mapping[str, Mapping[str, np.ndarray]],
                 constants: Mapping[str, Any] | None = None):
        self.module = module.eval()
        self.inputs = inputs
        # the non-tensor arguments convert fixed in the graph (a user's module)
        self.constants = dict(constants or {})
        self._order: dict[str, list[str]] = {}
        self._sizes: dict[str, dict[str, int]] = {}

    def _run(self, case: str, keep: set[str] | None) -> tuple[list[str], dict[str, np.ndarray],
                                                            dict[str, int]]:
        calls: dict[str, int] = {}
        order, sizes, kept = [], {}, {}

        def hook(name):
            def record(_module, _args, output):
                calls[name] = calls.get(name, 0) + 1
                tensor = _first_tensor(output)
                if tensor is None or not tensor.is_floating_point():
                    return
                if calls[name] == 1:
                    order.append(name)
                    sizes[name] = tensor.numel() * 4
                if keep is not None and name in keep:
                    kept[name] = tensor.detach().float().numpy().copy()
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in self.module.named_modules() if n]
        try:
            feed = {k: torch.from_numpy(np.array(v)) for k, v in self.inputs[case].items()}
            with torch.no_grad(), mock.patch.object(torch, "cond", _python_cond):
                self.module(**feed, **self.constants)
        finally:
            for h in handles:
                h.remove()
        once = [n for n in order if calls[n] == 1]
        return once, kept, sizes

    def _survey(self, case: str) -> None:
        if case not in self._order:
            self._order[case], _, self._sizes[case] = self._run(case, None)

    def order(self, case: str) -> list[str]:
        self._survey(case)
        return list(self._order[case])

    def nbytes(self, case: str, module: str) -> int:
        self._survey(case)
        return self._sizes[case].get(module, 0)

    def values(self, case: str, modules: Sequence[str]) -> dict[str, np.ndarray]:
        _, kept, _ = self._run(case, set(modules))
        return kept

"""Structured inputs and outputs: what a module takes and returns, as named flat tensors.

ONNX has flat, named inputs and outputs; PyTorch modules take keyword arguments that are not
all tensors and return ``ModelOutput``s, dicts, dataclasses, namedtuples and nested tuples.
This module is the one place that maps between the two.

Output names (the rule, documented in the README):

- A module's output is flattened with torch's pytree (``torch.utils._pytree``: tuples, lists,
  dicts, namedtuples and every type registered with it, such as transformers' ``ModelOutput``);
  dataclasses that are not registered are flattened by their fields.
- Each tensor leaf is named after its path, keys joined by ``.``: a dict key or field name as
  is, a sequence position as its number (``last_hidden_state``, ``hidden_states.3``).
- A position in a returned tuple or list is written ``output_<i>`` (``output_0``,
  ``output_1.2``), and a module that returns one tensor has one output, ``output``.
- ``None`` leaves are dropped (``ModelOutput`` already leaves unset fields out), and so are
  other non-tensor leaves (ints, strings): ONNX outputs are tensors.

Inputs: tensors become graph inputs; every other keyword argument (bools, ints, floats,
strings, ``None``) is a constant fixed at export and recorded in the manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import keyword
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from qcrun.errors import UserError
from torch import nn

#: The name of the single output of a module that returns one tensor.
SINGLE_OUTPUT = "output"
_CONSTANT_TYPES = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class OutputLeaf:
    """One tensor leaf of a module's output: its name and its path of keys."""

    name: str
    path: tuple[str | int, ...]


def _key(entry) -> str | int:
    for attr in ("key", "name", "idx"):  # MappingKey, GetAttrKey, SequenceKey
        if hasattr(entry, attr):
            value = getattr(entry, attr)
            return value if isinstance(value, int) else str(value)
    return str(entry)


def _unregistered_dataclass(x) -> bool:
    return (dataclasses.is_dataclass(x) and not isinstance(x, type)
            and type(x) not in pytree.SUPPORTED_NODES)


def _leaves(obj, path: tuple) -> list[tuple[tuple, Any]]:
    flat, _ = pytree.tree_flatten_with_path(obj, is_leaf=_unregistered_dataclass)
    out = []
    for keys, leaf in flat:
        full = path + tuple(_key(k) for k in keys)
        if _unregistered_dataclass(leaf):
            fields = {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)}
            out += _leaves(fields, full)
        else:
            out.append((full, leaf))
    return out


def path_name(path: tuple[str | int, ...], positional_root: bool) -> str:
    """The output name of a leaf at ``path`` (see the module docstring for the rule)."""
    if not path:
        return SINGLE_OUTPUT
    parts = [str(p) for p in path]
    if positional_root:
        parts[0] = f"output_{parts[0]}"
    return ".".join(parts)


def flatten_outputs(out: Any) -> list[tuple[OutputLeaf, torch.Tensor]]:
    """Every tensor leaf of a module's output, named, in pytree order; None and other
    non-tensor leaves dropped."""
    positional = isinstance(out, (tuple, list)) and not pytree.is_namedtuple_instance(out)
    return [(OutputLeaf(path_name(p, positional), p), leaf)
            for p, leaf in _leaves(out, ()) if isinstance(leaf, torch.Tensor)]


def named_outputs(module: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``module(**inputs)`` in eager mode, every tensor leaf by its output name.

    A module that returns no tensor at all is a UserError.
    """
    with torch.no_grad():
        out = module(**inputs)
    return {leaf.name: t for leaf, t in require_tensors(out)}


def require_tensors(out: Any) -> list[tuple[OutputLeaf, torch.Tensor]]:
    """:func:`flatten_outputs`, where a module output with no tensor is a UserError."""
    leaves = flatten_outputs(out)
    if not leaves:
        raise UserError(
            f"the module returned {type(out).__name__} with no tensor in it; there is nothing "
            "to export",
            stage="export",
            hint="return the tensors to export (a tensor, a tuple, a dict, a dataclass or a "
            "ModelOutput of tensors); check the non-tensor arguments (e.g. return_dict)",
        )
    return leaves


def bind_inputs(module: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """The example inputs as keyword arguments of ``module.forward``: a mapping as it is; a
    tensor, tuple or list bound positionally to the forward's parameters (as
    ``torch.onnx.export(module, args)`` takes them), so each input is named after its
    parameter."""
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise UserError(
            f"example inputs are a {type(example_inputs).__name__}; expected a dict of "
            "keyword arguments or a tuple of positional ones", stage="export",
            hint="pass {'name': tensor, ...} with the forward's parameter names")
    try:
        bound = inspect.signature(module.forward).bind(*example_inputs)
    except (TypeError, ValueError) as e:
        raise UserError(
            f"{len(example_inputs)} positional example inputs do not fit "
            f"{type(module).__name__}.forward: {e}", stage="export",
            hint="pass a dict of keyword arguments named after the forward's parameters") from None
    params = inspect.signature(module.forward).parameters
    variadic = [n for n in bound.arguments
                if params[n].kind in (inspect.Parameter.VAR_POSITIONAL,
                                      inspect.Parameter.VAR_KEYWORD)]
    if variadic:
        raise UserError(
            f"{type(module).__name__}.forward takes *{variadic[0]}: positional example inputs "
            "cannot be named", stage="export",
            hint="pass a dict of keyword arguments, or wrap the module in one with named "
                 "parameters")
    return dict(bound.arguments)


def split_inputs(
    example_inputs: Mapping[str, Any], constants: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor inputs, constant keyword arguments) of a call; constants must be plain values."""
    tensors: dict[str, torch.Tensor] = {}
    fixed: dict[str, Any] = dict(constants or {})
    for name, value in example_inputs.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        else:
            fixed[name] = value
    both = sorted(set(tensors) & set(constants or {}))
    if both:
        raise UserError(f"{both} given both as example inputs and as constants", stage="export",
                        hint="give each argument once")
    bad = {k: type(v).__name__ for k, v in fixed.items() if not _plain(v)}
    if bad:
        raise UserError(
            f"non-tensor arguments {bad} cannot be fixed in the graph: only bools, ints, "
            "floats, strings, None (and tuples/lists of them) can",
            stage="export",
            hint="pass tensors as tensors, and fix other arguments inside a small wrapper module",
        )
    odd = [k for k in tensors if not k.isidentifier() or keyword.iskeyword(k)]
    if odd:
        raise UserError(f"input names {odd} are not Python identifiers", stage="export",
                        hint="name the inputs after the module's forward arguments")
    if not tensors:
        raise UserError("the example inputs hold no tensor", stage="export",
                        hint="pass at least one tensor input")
    return tensors, fixed


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _CONSTANT_TYPES)


@dataclass
class OutputPlan:
    """Which tensor leaves become graph outputs, in order, under which names."""

    names: list[str]  # the graph's output names, in order
    leaves: list[str]  # the leaf (path name) each output takes, same order
    available: list[str]  # every tensor leaf's path name
    positional: bool  # the module's outputs have no names of their own

    def structure(self) -> dict[str, Any]:
        """The manifest's ``output_structure``: every graph output and the leaf it holds."""
        return {
            "rule": "pytree path, keys joined by '.', tuple positions as output_<i>, a lone "
                    "tensor as 'output'; None and non-tensor leaves dropped",
            "outputs": [{"name": n, "leaf": leaf} for n, leaf in zip(self.names, self.leaves,
                                                                     strict=True)],
            "available": self.available,
        }


def plan_outputs(flat: list[tuple[OutputLeaf, torch.Tensor]],
                 output_names: Sequence[str] | None) -> OutputPlan:
    """The outputs to export. ``output_names`` selects leaves by name (default: every one).

    For a module whose outputs have no names of their own (a tensor, or tuples of tensors),
    ``output_names`` may instead name its tensors, one name per tensor in order, as the
    mechanism registry does.
    """
    available = [leaf.name for leaf, _ in flat]
    positional = all(isinstance(leaf.path[0], int) for leaf, _ in flat if leaf.path) or \
        available == [SINGLE_OUTPUT]
    if not output_names:
        return OutputPlan(list(available), list(available), available, positional)
    names = list(output_names)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"output names {dupes} are given more than once", stage="export",
                        hint="name each output once")
    if all(n in available for n in names):
        return OutputPlan(names, names, available, positional)
    if positional and len(names) == len(available):
        return OutputPlan(names, list(available), available, positional)
    unknown = [n for n in names if n not in available]
    raise UserError(
        f"unknown outputs {unknown}; the module's outputs are: {', '.join(available)}",
        stage="export",
        hint="pass output names from that list (--outputs a,b)",
    )


class _FlatForward:
    """Mixin of :func:`flat_module`: the wrapped forward returns the planned leaves in order."""

    _qcx_base_forward: Any
    _qcx_constants: dict[str, Any]
    _qcx_leaves: list[str]

    def _qcx_flat(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = type(self)._qcx_base_forward(self, **tensors, **self._qcx_constants)
        leaves = {leaf.name: t for leaf, t in flatten_outputs(out)}
        return tuple(leaves[name] for name in self._qcx_leaves)


def flat_module(module: nn.Module, input_names: Sequence[str], constants: Mapping[str, Any],
                leaves: Sequence[str]) -> nn.Module:
    """``module`` as the exporter needs it: forward(<tensor inputs>) -> tuple of tensors.

    The constants are passed on every call and the planned leaves returned in order. The
    result shares ``module``'s parameters and submodules under the same names (so the graph's
    PyTorch module names are the user's), and ``module`` itself is unchanged.
    """
    base = type(module)
    args = ", ".join(input_names)
    call = ", ".join(f"{n}={n}" for n in input_names)
    namespace: dict[str, Any] = {}
    # The exporter binds example inputs by the forward's parameter names: generate a forward
    # with exactly the tensor inputs' names (a **kwargs forward cannot be bound).
    exec(f"def forward(self, {args}):\n    return self._qcx_flat(dict({call}))\n", namespace)
    cls = type(f"{base.__name__}Flat", (_FlatForward, base),
               {"forward": namespace["forward"], "_qcx_base_forward": base.forward,
                # The subclass carries the user's class name: libraries key per-class
                # registries on str(type(module)) (transformers records hidden states and
                # attentions only for classes registered under their own name).
                "__module__": base.__module__, "__qualname__": base.__qualname__})
    flat = copy.copy(module)  # a new object over the same parameter and module dicts
    flat.__class__ = cls
    flat._qcx_constants = dict(constants)
    flat._qcx_leaves = list(leaves)
    return flat

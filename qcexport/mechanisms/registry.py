"""The mechanism registry: one declarative spec per mechanism.

Everything the exporter, the golden-set writer, the diagnostics and the tests need to know
about a mechanism lives in its spec, in the mechanism's own file (as optimum's export configs
do): the builder, the presets, the example-input factory, input and output names, dynamic axes
and the roles of the axes, the golden cases, the attention-map plan and the builder of text
inputs. Generic code reads the spec and never branches on a mechanism's name or its inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from qcrun.errors import UserError, unknown_choice
from torch import nn

from qcexport.mechanisms.map_plan import MapPlan

PRESETS = ("tiny", "base")


@dataclass(frozen=True)
class AxisRoles:
    """Which symbolic axis is the batch, which the visual token count, and which the number
    of images per sample (None: no such axis). An example-input parameter of the same name
    sets the size of that axis (``Case({"batch": 1, "tokens": 49})``)."""

    batch: str = "batch"
    tokens: str = "tokens"
    media: str | None = None

    def one_image(self, params: Mapping[str, Any], tokens: int | None = None) -> dict[str, Any]:
        """``params`` for one sample of one image (of ``tokens`` visual tokens when given)."""
        out = {**params, self.batch: 1}
        if tokens is not None:
            out[self.tokens] = tokens
        if self.media is not None and self.media in out:
            out[self.media] = 1
        return out


@dataclass(frozen=True)
class Case:
    """A named set of example-input parameters (batch, tokens, text length, flags...)."""

    name: str
    params: Mapping[str, Any]
    description: str = ""


@dataclass(frozen=True)
class MechanismSpec:
    name: str
    summary: str
    source: str  # the paper the module follows
    config_cls: type
    presets: Mapping[str, Mapping[str, Any]]
    builder: Callable[[Any], nn.Module]
    # make_inputs(config, *, seed, **params) -> {input name: tensor}
    make_inputs: Callable[..., dict[str, torch.Tensor]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    # {input or output name: {axis index: symbolic axis name}}
    dynamic_axes: Mapping[str, Mapping[int, str]]
    golden_cases: tuple[Case, ...]
    # Shapes used by export (the traced shape) and by verification (a different one).
    export_case: Case = field(default_factory=lambda: Case("export", {"batch": 2}))
    verify_case: Case = field(default_factory=lambda: Case("verify", {"batch": 1}))
    # golden_check(module, [(case, inputs, outputs)]) -> problems: what the golden cases must
    # cover beyond running (e.g. every routing branch), checked when a golden set is written.
    golden_check: Callable[[nn.Module, list], list[str]] | None = None
    # PyTorch modules kept in float when quantizing (e.g. a router whose argmax must not flip).
    quantize_exclude: tuple[str, ...] = ()
    # Config overrides per precision, where a precision needs another export of the same math.
    precision_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # input_ranges(config) -> {input name: (min, max)}, both included: the values an integer
    # input may hold (token ids < vocab, a query count in [1, M]). Recorded in the manifest;
    # qcrun.load refuses others, as PyTorch would.
    input_ranges: Callable[[Any], Mapping[str, tuple[int, int]]] | None = None
    roles: AxisRoles = field(default_factory=AxisRoles)
    # The attention maps `inspect` and --with-attention-maps add: which submodules are
    # cross-attention cores and how to read them (None: the mechanism has no maps).
    maps: MapPlan | None = None
    # Whether `inspect` runs every golden case by default (cases that differ by a task, say),
    # rather than the first.
    inspect_all_cases: bool = False
    # text_inputs(config, text, feed) -> {input name: array}: the inputs that carry a text (a
    # prompt, a task query) for `inspect --text`, built deterministically from the words, for
    # the batch-1 ``feed`` they replace inputs of (None: the mechanism takes no text).
    text_inputs: Callable[[Any, str, Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    # The inputs that stay the same while the queries change (the image side): what
    # `convert --split context` computes once into a context (empty: every input is the image,
    # so there is nothing to split).
    context_inputs: tuple[str, ...] = ()
    # Inputs a caller may leave out, each defaulting to a parameter of the module (Perceiver
    # IO's output queries): {input name: parameter path}. They are not in ``input_names`` (the
    # example inputs and golden cases do without them); convert exports them as ONNX inputs
    # with an initializer of the same name holding the default, so a graph fed without them
    # computes what the module does. ``optional_axes`` are their dynamic axes and those they
    # add to outputs.
    optional_inputs: Mapping[str, str] = field(default_factory=dict)
    optional_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    def config(self, preset: str = "tiny", **overrides) -> Any:
        if preset not in self.presets:
            raise unknown_choice("preset", preset, self.presets, flag="--preset")
        values = {**self.presets[preset], **overrides}
        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise UserError(
                f"{self.name} has no config field(s) {', '.join(unknown)}; "
                f"fields: {', '.join(sorted(names))}"
            )
        return self.config_cls(**values)

    def saved_config(self, recorded: Mapping[str, Any] | None, preset: str | None = None) -> Any:
        """The config a manifest recorded (a model's or a golden set's), else ``preset``'s
        (default tiny) where it recorded none."""
        return self.config_cls(**recorded) if recorded else self.config(preset or "tiny")

    def inputs(self, config, case: Case | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        params = dict(case.params) if case else {}
        feed = self.make_inputs(config, seed=seed, **params)
        missing = [n for n in self.input_names if n not in feed]
        if missing or list(feed) != list(self.input_names):
            raise RuntimeError(f"{self.name}: example inputs {list(feed)} != spec {self.input_names}")
        return feed

    def example_sizes(self, config, case: Case | None = None) -> dict[str, int]:
        """{symbolic axis: size} of the example inputs of ``case`` (default: the first golden
        case): the default sizes wherever inputs are made without a size for an axis."""
        feed = self.inputs(config, case or self.golden_cases[0])
        sizes: dict[str, int] = {}
        for name, axes in self.dynamic_axes.items():
            if name in feed:
                for axis, label in axes.items():
                    sizes.setdefault(label, int(feed[name].shape[axis]))
        return sizes


_REGISTRY: dict[str, MechanismSpec] = {}


def register(spec: MechanismSpec) -> MechanismSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"mechanism {spec.name!r} registered twice")
    missing = [p for p in PRESETS if p not in spec.presets]
    if missing:
        raise RuntimeError(f"mechanism {spec.name!r} lacks presets {missing}")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> MechanismSpec:
    if name not in _REGISTRY:
        raise unknown_choice("mechanism", name, _REGISTRY)
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def create(name: str, preset: str = "tiny", **overrides) -> nn.Module:
    """Build mechanism ``name`` at ``preset`` in eval mode, with config ``overrides``."""
    spec = get(name)
    torch.manual_seed(0)
    return spec.builder(spec.config(preset, **overrides)).eval()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(name: str) -> dict[str, Any]:
    """Plain data about one mechanism, for `qcexport list`."""
    spec = get(name)
    presets = {}
    for preset in spec.presets:
        config = spec.config(preset)
        with torch.device("meta"):  # count parameters without allocating base weights
            module = spec.builder(config)
        presets[preset] = {
            "parameters": parameter_count(module),
            "config": dataclasses.asdict(config),
        }
    return {
        "name": spec.name,
        "summary": spec.summary,
        "source": spec.source,
        "inputs": list(spec.input_names),
        "outputs": list(spec.output_names),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes.items()},
        "golden_cases": [c.name for c in spec.golden_cases],
        "presets": presets,
    }

"""convert for a registered mechanism: the spec supplies inputs, names, axes and cases.

The one place a mechanism's module is built and exported: from a preset
(:func:`convert_mechanism`), or again from a golden set's weights (:func:`rebuild_from_golden`,
for parity on the form a target prefers, and for a bundle whose target reads another form).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from qcrun.errors import UserError
from qcrun.golden import GoldenSet
from torch import nn

from qcexport import mechanisms
from qcexport.export.capture import Owned
from qcexport.export.maps import with_attention_maps as wrap_with_maps
from qcexport.export.pipeline import ConvertResult, convert
from qcexport.mechanisms.registry import MechanismSpec
from qcexport.stages import StageCallback


def convert_mechanism(
    name: str,
    preset: str = "tiny",
    *,
    target: str = "ort-cpu",
    attention: str = "auto",
    opset: int | None = None,
    output_dir: str | Path | None = None,
    on_stage: StageCallback | None = None,
    with_attention_maps: bool = False,
    attention_map_heads: str = "mean",
    precision: str = "fp32",
    **overrides,
) -> ConvertResult:
    """Export mechanism ``name`` at ``preset``; verify at the spec's export and verify cases.

    ``with_attention_maps`` appends the cross-attention maps of every layer (heads averaged,
    or ``attention_map_heads="each"``) and the mechanism's diagnostic extras as outputs
    (``qcexport.export.maps``); the regular outputs keep their names and values, and the
    manifest's ``attention_maps`` says what every extra output holds.

    ``precision`` only selects the spec's config overrides for that precision (an export that
    quantizes better); the reduction itself is the optimize stage's.
    """
    spec = mechanisms.get(name)
    overrides = {**spec.precision_overrides.get(precision, {}), **overrides}
    config = spec.config(preset, **overrides)
    # built in the call, so that no name here keeps the module alive once convert drops it
    return export_spec_module(
        spec, config, mechanisms.create(name, preset, **overrides), preset=preset,
        maps_heads=attention_map_heads if with_attention_maps else None,
        target=target, attention=attention, opset=opset,
        output_dir=output_dir or Path("out") / f"{name}-{preset}", on_stage=on_stage)


def export_spec_module(spec: MechanismSpec, config: Any, module: nn.Module, *,
                       preset: str | None, maps_heads: str | None = None,
                       **options) -> ConvertResult:
    """Export ``module`` (mechanism ``spec`` built with ``config``) as convert does for the
    mechanism: the spec's example, its verification cases (the export shape and the verify
    case, seeds 1 and 2), names, axes and input ranges; ``maps_heads`` ("mean" or "each")
    adds the attention maps. The module is handed over (see :class:`Owned`): the caller must
    not use it afterwards. ``options`` go to :func:`convert` (target, attention, output_dir...).
    """
    output_names, dynamic_axes, extra_meta = spec.output_names, spec.dynamic_axes, {}
    if maps_heads is not None:
        module = wrap_with_maps(module, spec.name, spec.output_names, heads=maps_heads)
        output_names, dynamic_axes = module.output_names, module.maps_dynamic_axes(spec.dynamic_axes)
        extra_meta = {"attention_maps": module.maps_descriptor()}
    example = spec.inputs(config, spec.export_case, seed=0)
    verify = [
        ("export_shape", spec.inputs(config, spec.export_case, seed=1)),
        (spec.verify_case.name + "_shape", spec.inputs(config, spec.verify_case, seed=2)),
    ]
    defaults = {} if maps_heads is not None else optional_defaults(spec, module)
    if defaults:
        example, verify, dynamic_axes = _with_optional(spec, defaults, example, verify,
                                                       dynamic_axes)
    owned = Owned(module)
    del module  # convert owns it: its weights are freed once exported (peak memory)
    return convert(
        owned,
        example,
        dynamic_axes,
        output_names=output_names,
        verify_inputs=verify,
        metadata={"mechanism": spec.name, "preset": preset, "config": dataclasses.asdict(config),
                  "roles": {r: a for r, a in dataclasses.asdict(spec.roles).items() if a},
                  **extra_meta},
        input_ranges=spec.input_ranges(config) if spec.input_ranges else None,
        input_defaults=defaults,
        **options,
    )


def optional_defaults(spec: MechanismSpec, module: nn.Module) -> dict[str, np.ndarray]:
    """{optional input: its default}, the module's parameters the spec names."""
    return {name: module.get_parameter(path).detach().numpy().copy()
            for name, path in spec.optional_inputs.items()}


def _with_optional(spec: MechanismSpec, defaults, example, verify, dynamic_axes):
    """The export example and verification cases with the optional inputs given: the default
    at the export shape, and other values of another size in the second case (so the axes
    stay dynamic and a graph that ignored the input would fail verification)."""
    def values(default: np.ndarray, seed: int) -> torch.Tensor:
        rows = default.shape[0] + 3 * seed
        g = torch.Generator().manual_seed(seed)
        return torch.randn((rows, *default.shape[1:]), generator=g) * float(default.std() + 1)

    example = {**example, **{k: torch.from_numpy(v) for k, v in defaults.items()}}
    verify = [(case, {**feed, **{k: values(v, i) for k, v in defaults.items()}})
              for i, (case, feed) in enumerate(verify)]
    axes = {k: dict(v) for k, v in dynamic_axes.items()}
    for name, extra in spec.optional_axes.items():
        axes[name] = {**axes.get(name, {}), **extra}
    return example, verify, axes


def load_weights(module: nn.Module, golden: GoldenSet) -> nn.Module:
    """Load the golden set's weights (already hash-verified by load_golden) into ``module``."""
    path = golden.weights_path
    with np.load(path, allow_pickle=False) as data:
        state = {k.removesuffix(".npy"): torch.from_numpy(data[k].copy()) for k in data.files}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"golden weights at {path} do not fit the module (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})",
            stage="golden",
            hint=f"the reference module changed; regenerate with `qcexport golden "
            f"{golden.mechanism} --preset {golden.preset} --update`",
        )
    return module


def module_from_golden(golden: GoldenSet, config: Any = None) -> nn.Module:
    """The reference module with the golden set's weights, and its config (default: the one
    the golden set recorded)."""
    spec = mechanisms.get(golden.mechanism)
    if config is None:
        config = spec.config_cls(**golden.manifest.config)
    torch.manual_seed(0)
    return load_weights(spec.builder(config).eval(), golden)


def rebuild_from_golden(gset: GoldenSet, form: str, target: str, out: Path) -> ConvertResult:
    """Export the golden set's module (its config and weights) again in attention ``form``
    for ``target`` into ``out``; verification included."""
    spec = mechanisms.get(gset.mechanism)
    config = spec.config_cls(**(gset.manifest.config or {}))
    return export_spec_module(spec, config, module_from_golden(gset, config), preset=gset.preset,
                              target=target, attention=form, output_dir=out)

"""convert for a registered mechanism: the spec supplies inputs, names, axes and cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qcexport import mechanisms
from qcexport.export.capture import Owned
from qcexport.export.maps import with_attention_maps as wrap_with_maps
from qcexport.export.pipeline import ConvertResult, convert
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
    module = mechanisms.create(name, preset, **overrides)
    output_names, dynamic_axes, extra_meta = spec.output_names, spec.dynamic_axes, {}
    if with_attention_maps:
        module = wrap_with_maps(module, name, spec.output_names, heads=attention_map_heads)
        output_names, dynamic_axes = module.output_names, module.maps_dynamic_axes(spec.dynamic_axes)
        extra_meta = {"attention_maps": module.maps_descriptor()}
    example = spec.inputs(config, spec.export_case, seed=0)
    verify = [
        ("export_shape", spec.inputs(config, spec.export_case, seed=1)),
        (spec.verify_case.name + "_shape", spec.inputs(config, spec.verify_case, seed=2)),
    ]
    owned = Owned(module)
    del module  # convert owns it: its weights are freed once exported (peak memory)
    return convert(
        owned,
        example,
        dynamic_axes,
        output_names=output_names,
        target=target,
        attention=attention,
        opset=opset,
        output_dir=output_dir or Path("out") / f"{name}-{preset}",
        verify_inputs=verify,
        metadata={"mechanism": name, "preset": preset, "config": dataclasses.asdict(config),
                  **extra_meta},
        on_stage=on_stage,
        input_ranges=spec.input_ranges(config) if spec.input_ranges else None,
    )

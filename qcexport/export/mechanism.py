"""convert for a registered mechanism: the spec supplies inputs, names, axes and cases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qcexport import mechanisms
from qcexport.export.pipeline import ConvertResult, StageCallback, convert


def convert_mechanism(
    name: str,
    preset: str = "tiny",
    *,
    target: str = "ort-cpu",
    attention: str = "auto",
    opset: int | None = None,
    output_dir: str | Path | None = None,
    on_stage: StageCallback | None = None,
    **overrides,
) -> ConvertResult:
    """Export mechanism ``name`` at ``preset``; verify at the spec's export and verify cases."""
    spec = mechanisms.get(name)
    config = spec.config(preset, **overrides)
    module = mechanisms.create(name, preset, **overrides)
    example = spec.inputs(config, spec.export_case, seed=0)
    verify = [
        ("export_shape", spec.inputs(config, spec.export_case, seed=1)),
        (spec.verify_case.name + "_shape", spec.inputs(config, spec.verify_case, seed=2)),
    ]
    return convert(
        module,
        example,
        spec.dynamic_axes,
        output_names=spec.output_names,
        target=target,
        attention=attention,
        opset=opset,
        output_dir=output_dir or Path("out") / f"{name}-{preset}",
        verify_inputs=verify,
        metadata={"mechanism": name, "preset": preset, "config": dataclasses.asdict(config)},
        on_stage=on_stage,
    )

"""convert and golden for a Hugging Face component, in one call each.

    from qcexport import hf
    hf.convert("out/tiny-hf/blip2", "qformer", output_dir="out/blip2")
    hf.write_golden("out/tiny-hf/blip2", "qformer", "out/golden-blip2")

They are the generic stages fed from the component's spec (example inputs from the config,
dynamic axes, default outputs, verification shapes, golden cases), as ``qcexport convert
--hf`` and ``qcexport golden --hf`` run them. ``component`` may also be an already loaded
:class:`~qcexport.hf.load.HFComponent`, so one load serves both stages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qcexport.hf.load import HFComponent, load_component


def _component(path_or_id, component: str | HFComponent) -> HFComponent:
    return component if isinstance(component, HFComponent) else load_component(path_or_id,
                                                                                component)


def convert(path_or_id: str | os.PathLike | None, component: str | HFComponent, *,
            output_dir: str | Path, output_names: list[str] | None = None, **options: Any):
    """Export the component (see ``qcexport.export.convert`` for ``options``: target,
    attention, opset, on_stage). ``output_names`` overrides the spec's default outputs."""
    from qcexport.export.pipeline import convert as convert_module

    comp = _component(path_or_id, component)
    return convert_module(comp.module, comp.example_inputs, comp.dynamic_axes,
                          output_names=output_names or comp.output_names,
                          verify_inputs=comp.verify_inputs, metadata=comp.metadata,
                          output_dir=output_dir, **options)


def write_golden(path_or_id: str | os.PathLike | None, component: str | HFComponent,
                 out_dir: str | Path, *, output_names: list[str] | None = None, seed: int = 0,
                 update: bool = False, with_intermediates: bool = False):
    """The component's golden set: its spec's cases (case i drawn with seed
    ``GOLDEN_SEED + seed + i``), outputs named as :func:`convert` names them."""
    from qcexport.golden import GOLDEN_SEED, write_module_golden

    comp = _component(path_or_id, component)
    return write_module_golden(comp.module, comp.example_inputs, out_dir,
                               dynamic_axes=comp.dynamic_axes, cases=comp.cases(GOLDEN_SEED + seed),
                               output_names=output_names or comp.output_names,
                               source=comp.metadata["source"], seed=seed, update=update,
                               with_intermediates=with_intermediates)

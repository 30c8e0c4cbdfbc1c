"""Run the cases of an inspection and compute its numbers: the stage behind ``qcexport inspect``.

Two sources, one result:

- a mechanism NAME: the reference module (``--preset``) wrapped by ``with_attention_maps`` runs
  in PyTorch eager; its maps come from the math path of the cross-attention cores;
- an exported MODEL_DIR (``qcexport convert ... --with-attention-maps``): the ONNX model runs
  on a qcrun target, exactly as ``qcrun inspect`` runs it on a device.

The numbers come from ``qcrun.diagnostics`` in both cases, so host and device agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qcrun.diagnostics import (
    DEFAULT_THRESHOLD,
    Run,
    analyse,
    parse_grid,
    require_maps,
    run_all,
    sweep_base_first,
)
from qcrun.errors import UserError

from qcexport.diagnostics import inputs as inputs_mod

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
DEFAULT_IMAGE_GRID = (7, 7)  # the tiny cases' 49 tokens; pass --grid for an encoder's grid


@dataclass
class Inspection:
    analysis: dict[str, Any]
    runs: list[Run]
    descriptor: dict[str, Any]
    image: Any = None  # PIL image to overlay, when one was given
    grid: tuple[int, int] | None = None
    title: str = ""
    context: dict[str, Any] = field(default_factory=dict)


def inspect_source(
    source: str,
    *,
    preset: str = "tiny",
    cases: tuple[str, ...] = (),
    image: str | Path | None = None,
    features: str | Path | None = None,
    texts: tuple[str, ...] = (),
    grid: str | None = None,
    heads: str = "mean",
    target: str = "ort-cpu",
    sample: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
) -> Inspection:
    """Run ``source`` (a mechanism name or an exported model directory) and analyse it."""
    grid_size = parse_grid(grid)
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"--threshold {threshold} is not in (0, 1]", stage="inspect",
                        hint="a cosine threshold such as 0.95")
    picture = inputs_mod.read_image(image) if image is not None else None
    path = Path(source)
    if path.is_dir():
        return _inspect_model_dir(path, target=target, cases=cases, picture=picture,
                                  image=image, features=features, texts=texts, grid=grid_size,
                                  sample=sample, threshold=threshold)
    if path.suffix == ".onnx" or path.exists():
        raise UserError(f"{source} is not a model directory", stage="inspect",
                        hint="pass the output directory of `qcexport convert ... "
                        "--with-attention-maps`, or a mechanism name")
    from qcexport import mechanisms
    from qcexport.export.maps import with_attention_maps

    spec = mechanisms.get(source)
    config = spec.config(preset)
    module = with_attention_maps(mechanisms.create(source, preset), source, spec.output_names,
                                 heads=heads)
    descriptor = module.maps_descriptor()

    def run(feed):
        import torch

        with torch.no_grad():
            out = module(**{k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()})
        return {n: o.numpy() for n, o in zip(module.output_names, out, strict=True)}

    feeds, grid_size = _feeds(spec, config, descriptor, cases, picture, features, texts,
                              grid_size)
    runs, sweep = run_all(descriptor, feeds, run)
    analysis = analyse(descriptor, runs, sweep=sweep, sample=sample, threshold=threshold,
                       grid=grid_size, source=f"{source} ({preset}, PyTorch eager)")
    context = {"source": f"mechanism {source}, preset {preset}",
               "maps from": "PyTorch eager, math path of the attention cores"}
    _describe_inputs(context, image, features, texts)
    return Inspection(analysis, runs, descriptor, picture, grid_size, f"{source} ({preset})",
                      context)


def _inspect_model_dir(path: Path, *, target, cases, picture, image, features, texts, grid,
                       sample, threshold) -> Inspection:
    from qcrun.engines import model_file, open_adapter

    from qcexport import mechanisms

    model = _read_manifest(path)
    manifest, name = model.manifest, model.manifest.mechanism
    with open_adapter(model_file(model.model_files(), target), target) as session:
        descriptor = require_maps(manifest, [o.name for o in session.outputs], str(path))
        if name not in mechanisms.names():
            raise UserError(f"{path} holds mechanism {name!r}, which is not built in",
                            stage="inspect", hint="inspect a built-in mechanism's model")
        spec = mechanisms.get(name)
        config = spec.saved_config(manifest.config, manifest.preset)
        feeds, grid = _feeds(spec, config, descriptor, cases, picture, features, texts, grid)
        runs, sweep = run_all(descriptor, feeds, session.run)
    analysis = analyse(descriptor, runs, sweep=sweep, sample=sample, threshold=threshold,
                       grid=grid, source=f"{path} on {target}")
    context = {"source": str(path), "mechanism preset": manifest.preset,
               "maps from": f"the exported model on {target} ({manifest.attention} "
               "attention)"}
    _describe_inputs(context, image, features, texts)
    return Inspection(analysis, runs, descriptor, picture, grid,
                      f"{name} ({manifest.preset}) from {path.name}", context)


def _feeds(spec, config, descriptor, cases, picture, features, texts, grid):
    """The feeds to run, and the grid to draw them on."""
    if picture is None and features is None and not texts:
        # a sweep (of a query count, say) starts from the case that shows every query
        feeds = inputs_mod.golden_case_feeds(
            spec, config, cases, default_all=spec.inspect_all_cases or bool(descriptor.get("sweep")))
        if descriptor.get("sweep") and not cases:
            feeds = sweep_base_first(descriptor, feeds)[:1]
        return feeds, grid
    if len(cases) > 1 or "all" in cases:
        raise UserError("--image, --features and --text build one case on top of one --case",
                        stage="inspect", hint="pass a single --case (or none)")
    base = inputs_mod.golden_case_feeds(spec, config, cases[:1] or None)[0][1]
    dim = inputs_mod.visual_dim(descriptor, base)
    tokens = None
    if features is not None:
        tokens = inputs_mod.read_features(features, dim)
    elif picture is not None:
        grid = grid or DEFAULT_IMAGE_GRID
        tokens = inputs_mod.pixel_features(picture, grid, dim)
    feeds = inputs_mod.custom_feeds(spec, config, descriptor, features=tokens, texts=texts,
                                    case=cases[0] if cases else None)
    return feeds, grid


def _describe_inputs(context, image, features, texts) -> None:
    if image is not None:
        context["image"] = str(image)
    if features is not None:
        context["features"] = str(features)
    elif image is not None:
        context["features"] = ("stand-in from the image's pixels (14x14 patches, fixed random "
                               "projection); pass --features for a real encoder's tokens")
    if texts:
        context["text"] = " | ".join(texts)


def _read_manifest(path: Path):
    """The checked model directory (``qcrun.files.ModelDir``) at ``path``."""
    from qcrun.files import read_model_dir

    if not (path / MANIFEST_FILE).is_file():
        raise UserError(f"{path} is not an exported model directory (it needs {MODEL_FILE} and "
                        f"{MANIFEST_FILE})", stage="inspect",
                        hint="pass the output directory of `qcexport convert ... "
                        "--with-attention-maps`, or a mechanism name")
    return read_model_dir(path, stage="inspect")

"""One factory of synthetic inputs from input specs, for every place that needs inputs nobody
gave: verification at another shape, latency sweeps, ``inspect --random`` and calibration
without a calibration file.

An input spec is the manifest's JSON form (``{"name", "dtype", "shape", "range"}``, shape
entries ints or symbolic axis names). One rule everywhere:

- sizes: a symbolic axis takes ``sizes[axis]``, else its size in ``template`` (an example such
  as a golden case or the spec's example inputs: the default sizes are the example's), else
  ``FALLBACK_SIZE``;
- floats: standard normal;
- integers: uniform within the values the template holds, else within the input's recorded
  ``range`` (token ids below the vocabulary, a query count in [1, M]), else 0 or 1; a 0-d
  integer in a template keeps the template's value (a run-time count stays realistic);
- booleans (masks): random, with the first position of the last axis always kept, so no row
  is masked out entirely.

numpy only: qcrun never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

InputSpec = Mapping[str, Any]

#: Size of a symbolic axis that neither ``sizes`` nor a template sets.
FALLBACK_SIZE = 1
#: Integer values when neither a template nor a recorded range says which are valid.
UNRANGED = (0, 1)


def axis_sizes(specs: Sequence[InputSpec], feed: Mapping[str, Any]) -> dict[str, int]:
    """{symbolic axis: size} as ``feed`` (concrete arrays) has them: the sizes of an example."""
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec["name"] not in feed:
            continue
        shape = np.shape(feed[spec["name"]])
        for dim, size in zip(spec["shape"], shape, strict=False):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(size))
    return sizes


def shape_of(spec: InputSpec, sizes: Mapping[str, int], template: Any = None) -> tuple[int, ...]:
    """The concrete shape of one input: static dims, then ``sizes``, the template, fallback."""
    return fill_shape(spec, sizes, None if template is None else np.shape(template))


def fill_shape(spec: InputSpec, sizes: Mapping[str, int],
               example_shape: Sequence[int] | None) -> tuple[int, ...]:
    """:func:`shape_of` given the template's shape only (no array at hand)."""
    shape = []
    for index, dim in enumerate(spec["shape"]):
        if isinstance(dim, int):
            shape.append(dim)
        elif isinstance(dim, str) and dim in sizes:
            shape.append(int(sizes[dim]))
        elif example_shape is not None and index < len(example_shape):
            shape.append(int(example_shape[index]))
        else:
            shape.append(FALLBACK_SIZE)
    return tuple(shape)


def value_range(spec: InputSpec, template: Any = None) -> tuple[int, int]:
    """The integer values an input is drawn from, both ends included."""
    if template is not None and np.size(template):
        return int(np.min(template)), int(np.max(template))
    recorded = spec.get("range")
    if recorded:
        return int(recorded["min"]), int(recorded["max"])
    return UNRANGED


def make_inputs(
    specs: Sequence[InputSpec],
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    *,
    template: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded inputs for ``specs`` at ``sizes`` by the module's rule (see above)."""
    rng = np.random.default_rng(seed)
    sizes = dict(sizes or {})
    template = template or {}
    feed = {}
    for spec in specs:
        name = spec["name"]
        ref = template.get(name)
        shape = shape_of(spec, sizes, ref)
        dtype = np.dtype(spec.get("dtype") or "float32")
        if dtype.kind == "f":
            feed[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[name] = _mask(rng, shape)
        elif not shape and ref is not None:
            feed[name] = np.array(np.asarray(ref).item(), dtype=dtype)
        else:
            low, high = value_range(spec, ref)
            feed[name] = rng.integers(low, high + 1, size=shape).astype(dtype)
    return feed


def _mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random validity with the first position of the last axis kept: every row sees
    something (a fully masked row is a different computation, not a sample of this one)."""
    mask = rng.random(shape) < 0.75
    if mask.ndim:
        mask[..., :1] = True
    else:
        mask = np.asarray(True)
    return mask

"""Inputs for an exported model of a built-in mechanism, made by the mechanism spec's own
example-input factory (masks, text, media as the mechanism expects them) at the sizes a
caller asks for: the realistic counterpart of qcrun's synthetic inputs
(``qcrun.inputs.make_inputs``), used by ``qcexport profile`` and ``qcexport.profile``.
"""

from __future__ import annotations

import inspect

import numpy as np
from qcrun.errors import UserError

from qcexport.mechanisms import registry


def spec_feeds(manifest):
    """feeds(manifest, point) from the mechanism spec's ``make_inputs``, or None when the model
    (``manifest``: a ``qcrun.files.ModelManifest``) is not a built-in mechanism (then qcrun's
    synthetic inputs are used)."""
    name = manifest.mechanism
    if name not in registry.names():
        return None
    spec = registry.get(name)
    config = spec.saved_config(manifest.config, manifest.preset)
    accepted = set(inspect.signature(spec.make_inputs).parameters) - {"seed"}
    positions = {
        (spec_input.name, index): dim
        for spec_input in manifest.inputs
        for index, dim in enumerate(spec_input.shape)
        if isinstance(dim, str)
    }

    def feeds(manifest, point):
        sizes = point.as_dict()
        unknown = sorted(set(sizes) - accepted)
        if unknown:
            raise UserError(
                f"{name}'s inputs cannot be built with {', '.join(unknown)} "
                f"(its input factory takes {', '.join(sorted(accepted))})",
                stage="profile",
                hint="sweep only axes the mechanism has, e.g. --batch and --tokens",
            )
        feed = {k: v.numpy() for k, v in spec.make_inputs(config, seed=0, **sizes).items()}
        for (input_name, index), axis in positions.items():
            if axis in sizes and np.shape(feed[input_name])[index] != sizes[axis]:
                raise UserError(
                    f"{name}'s input factory made {input_name} with {axis}="
                    f"{np.shape(feed[input_name])[index]}, not the {sizes[axis]} asked for",
                    stage="profile",
                )
        return feed

    return feeds

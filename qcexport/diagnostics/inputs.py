"""Inputs for ``qcexport inspect``: the spec's golden cases, or the user's image, features, text.

The mechanisms take visual *features* (a ViT's tokens), not pixels. ``--features FILE.npy``
feeds real encoder features. With only ``--image``, the features are a stand-in computed from
the pixels: the image is cut into the patch grid and every patch (14 x 14 RGB pixels) is mapped
to the feature width by a fixed random projection, so the maps follow the image's content and
the overlay is drawn on the same grid; the numbers describe that stand-in, not a trained
encoder. ``--text`` becomes the inputs the mechanism's spec builds from a text
(``MechanismSpec.text_inputs``: hashed words as token ids, an embedding seeded by the text...),
deterministic stand-ins, so the same text always gives the same input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qcrun.errors import UserError, unknown_choice

PATCH = 14  # ViT-L/14 and EVA ViT-g/14 patch size, for the pixel stand-in


def require_pillow():
    try:
        from PIL import Image
    except ImportError as exc:  # optional heavy import: say how to get it
        raise UserError("rendering needs Pillow, which is not installed", stage="inspect",
                        hint="pip install pillow") from exc
    return Image


def read_image(path: str | Path):
    """The image at ``path`` as RGB, or a UserError naming the file."""
    image_mod = require_pillow()
    path = Path(path)
    try:
        with image_mod.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, image_mod.DecompressionBombError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"cannot read image {path}: {reason}", stage="inspect",
                        hint="pass a PNG, JPEG or other image file Pillow can read with --image")\
            from None


def read_features(path: str | Path, dim: int) -> np.ndarray:
    """[tokens, dim] float32 features from an .npy file holding [tokens, dim] or [1, tokens, dim]."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read features {path}: {exc}", stage="inspect",
                        hint="pass an .npy file of shape [tokens, dim] with --features") from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or array.shape[1] != dim or not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"features in {path} have shape {list(array.shape)} and dtype "
                        f"{array.dtype}; the model takes float [tokens, {dim}]", stage="inspect",
                        hint=f"save the encoder's tokens of one image as [tokens, {dim}]")
    return array.astype(np.float32)


def pixel_features(image, grid: tuple[int, int], dim: int, seed: int = 0) -> np.ndarray:
    """[rows*cols, dim] stand-in features: standardised 14x14 RGB patches, fixed projection."""
    rows, cols = grid
    pixels = np.asarray(image.resize((cols * PATCH, rows * PATCH)), dtype=np.float64) / 255.0
    patches = pixels.reshape(rows, PATCH, cols, PATCH, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(rows * cols, PATCH * PATCH * 3)  # [tokens, 588], row-major grid
    patches = (patches - patches.mean()) / (patches.std() + 1e-6)
    projection = np.random.default_rng(seed).standard_normal((patches.shape[1], dim))
    features = patches @ projection / np.sqrt(patches.shape[1])
    features = (features - features.mean(axis=0)) / (features.std(axis=0) + 1e-6)
    return features.astype(np.float32)


def golden_case_feeds(spec, config, names: Sequence[str] | None, *, default_all: bool = False):
    """[(case name, numpy feed)] of the spec's golden cases, with the golden inputs' seeds.

    ``names`` None: the first case (every case when ``default_all``); "all": every case.
    """
    from qcexport.golden import GOLDEN_SEED

    known = {c.name: i for i, c in enumerate(spec.golden_cases)}
    if not names:
        chosen = list(known) if default_all else [spec.golden_cases[0].name]
    elif "all" in names:
        chosen = list(known)
    else:
        chosen = list(dict.fromkeys(names))
        for name in chosen:
            if name not in known:
                raise unknown_choice("case", name, [*known, "all"], flag="--case")
    feeds = []
    for name in chosen:
        index = known[name]
        inputs = spec.inputs(config, spec.golden_cases[index], seed=GOLDEN_SEED + index)
        feeds.append((name, {k: v.numpy() for k, v in inputs.items()}))
    return feeds


def custom_feeds(
    spec,
    config,
    descriptor: Mapping[str, Any],
    *,
    features: np.ndarray | None = None,
    texts: Sequence[str] = (),
    case: str | None = None,
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """Feeds of batch 1 built on golden case ``case`` (default the first), with the visual
    input replaced by ``features`` [tokens, dim] and one feed per text in ``texts``."""
    from qcexport.golden import GOLDEN_SEED
    from qcexport.mechanisms import Case

    known = {c.name: (i, c) for i, c in enumerate(spec.golden_cases)}
    if case is not None and case not in known:
        raise unknown_choice("case", case, known, flag="--case")
    index, base = known[case] if case else (0, spec.golden_cases[0])
    if features is None:
        params = {**base.params, spec.roles.batch: 1}
    else:  # one image: every text token after the first ones sees it
        params = spec.roles.one_image(base.params, int(features.shape[0]))
    feed = {k: v.numpy() for k, v in
            spec.inputs(config, Case("custom", params), seed=GOLDEN_SEED + index).items()}
    visual = descriptor["visual_input"]
    if features is not None:
        feed[visual] = features.reshape((1,) * (feed[visual].ndim - 2) + features.shape)
    if not texts:
        return [("image" if features is not None else base.name, feed)]
    if spec.text_inputs is None:
        from qcexport import mechanisms

        takers = [n for n in mechanisms.names() if mechanisms.get(n).text_inputs is not None]
        raise UserError(f"{spec.name} has no text input (inputs: {', '.join(feed)}); --text "
                        f"conditions {', '.join(takers)}", stage="inspect", hint="drop --text")
    feeds = []
    for number, text in enumerate(texts):
        fed = {**feed, **spec.text_inputs(config, text, feed)}
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24] or "text"
        feeds.append((f"t{number}-{slug}", fed))
    return feeds


def visual_dim(descriptor: Mapping[str, Any], feed: Mapping[str, np.ndarray]) -> int:
    return int(np.shape(feed[descriptor["visual_input"]])[-1])

"""``qcexport profile``: latency of an exported model on several targets, from the host.

The measuring is qcrun's (``qcrun.profile``), so the host and the device time the same way;
what the host adds is realistic inputs: for a built-in mechanism, every sweep point is made by
the mechanism spec's ``make_inputs`` with the exported config (masks, text, media as the
mechanism expects them), instead of qcrun's generic synthetic inputs.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import numpy as np
from qcrun.clikit import execute_profile, profile_options, targets_option
from qcrun.errors import UserError


def _read_model_dir(model_dir: Path):
    """The checked model directory (``qcrun.files.ModelDir``): hashes, paths, precision."""
    from qcrun.files import read_model_dir

    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not an exported model directory", stage="profile",
                        hint="pass the output directory of `qcexport convert`, e.g. "
                        "out/qformer-base")
    return read_model_dir(model_dir, stage="profile")


def spec_feeds(manifest):
    """feeds(manifest, point) from the mechanism spec's ``make_inputs``, or None when the model
    (``manifest``: a ``qcrun.files.ModelManifest``) is not a built-in mechanism (then qcrun's
    synthetic inputs are used)."""
    from qcexport import mechanisms

    name = manifest.mechanism
    if name not in mechanisms.names():
        return None
    spec = mechanisms.get(name)
    config = spec.config_cls(**manifest.config) if manifest.config else spec.config(
        manifest.preset or "tiny")
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


@click.command("profile")
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@targets_option("Targets (repeatable, or comma-separated); an unavailable one is skipped "
                "with the reason.", default=("ort-cpu",), show_default=True)
@profile_options
def profile(model_dir: Path, target_names, **settings):
    """Latency profile of an exported model: p50/p90/p99, per-op time, memory, FLOP/s.

    MODEL_DIR is the output of `qcexport convert`. For each target: session creation timed on
    its own, untimed warm-up, then --runs timed runs or a --budget of seconds per shape of the
    --batch / --tokens sweep; a per-op breakdown folded to op types and PyTorch modules; the
    achieved FLOP/s against the engine's measured GEMM peak. Prints Markdown tables; --json,
    --markdown and --html write the report (with none of them: MODEL_DIR/profile.json and
    MODEL_DIR/profile.html).

    \b
    qcexport profile out/qformer-base --target ort-cpu,openvino-cpu --tokens 257,1025,4097 \\
        --json profile.json --html profile.html
    """
    from qcexport.export.save import write_bytes_atomic

    model = _read_model_dir(model_dir)
    if not any(settings[k] for k in ("json_path", "markdown_path", "html_path")):
        settings["json_path"] = model_dir / "profile.json"
        settings["html_path"] = model_dir / "profile.html"
    execute_profile(
        model,
        target_names,
        settings,
        feeds=spec_feeds(model.manifest),
        write=lambda path, text: write_bytes_atomic(path, text.encode()),
    )

"""``qcexport profile``: latency of an exported model on several targets, from the host.

The measuring is qcrun's (``qcrun.profile``), so the host and the device time the same way;
what the host adds is realistic inputs: for a built-in mechanism, every sweep point is made by
the mechanism spec's ``make_inputs`` with the exported config (masks, text, media as the
mechanism expects them), instead of qcrun's generic synthetic inputs.
"""

from __future__ import annotations

from pathlib import Path

import click
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
    from qcexport.mechanisms.feeds import spec_feeds

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

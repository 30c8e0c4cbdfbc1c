"""``qcrun profile``: latency of a model directory or a bundle on each target, on this device."""

from __future__ import annotations

from pathlib import Path

import click

from qcrun.clikit import cell_option, execute_profile, profile_options, targets_option


@click.command("profile")
@click.argument("model_dir", type=click.Path(path_type=Path))
@targets_option("Target to profile on (repeatable, or comma-separated); an unavailable one "
                "is skipped with the reason.", required=True)
@profile_options
@cell_option("profile")
def profile_command(model_dir: Path, target_names, **settings):
    """Latency of MODEL_DIR/model.onnx on each --target: percentiles, per-op time, FLOP/s.

    MODEL_DIR may be a bundle (directory or .tar.gz): its file hashes are checked first.

    Untimed warm-up, then --runs timed runs or a --budget of seconds per shape; session
    creation is timed separately. Prints Markdown tables; --json, --markdown and --html write
    the report. Exit status 1 when a target fails or none can run.
    """
    from qcrun.bundle import is_bundle, resolve_model
    from qcrun.files import check_model_dir, read_model_dir

    if is_bundle(model_dir):  # a bundle (directory or .tar.gz): hashes checked first
        model_path, manifest = resolve_model(model_dir)
        model = check_model_dir(model_path.parent, manifest, where=f"bundle {model_dir}",
                                stage="profile")
    else:
        model = read_model_dir(model_dir, stage="profile")
    execute_profile(model, target_names, settings)

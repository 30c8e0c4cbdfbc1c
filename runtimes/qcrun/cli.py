"""The ``qcrun`` command: a thin click shell over targets, golden reading and parity.

Only this module prints or exits. A UserError becomes ``error: <message>`` on stderr and exit
status 1, without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from qcrun.errors import UserError
from qcrun.golden import load_golden
from qcrun.parity import TolerancePolicy, run_parity
from qcrun.targets import availability, list_targets

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


class UserErrorGroup(click.Group):
    """A click group that turns a UserError into `error: ...` and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="qcrun")
def main():
    """Run qcexport models on edge runtimes and check them against golden data."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the targets as JSON.")
def targets(as_json: bool):
    """List the targets, whether each can run here, and why."""
    rows = []
    for target in list_targets():
        ok, reason = availability(target)
        rows.append(
            {
                "name": target.name,
                "engine": target.engine,
                "available": ok,
                "reason": reason,
                "attention_forms": list(target.attention_forms),
                "max_opset": target.max_opset,
                "precisions": list(target.precisions),
                "description": target.description,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        state = "available  " if r["available"] else "unavailable"
        click.echo(f"{r['name'].ljust(width)}  {state}  {r['reason']}")


def _read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST_FILE
    if not (model_dir / MODEL_FILE).is_file() or not path.is_file():
        raise UserError(
            f"{model_dir} is not an exported model directory (it needs {MODEL_FILE} and "
            f"{MANIFEST_FILE})",
            hint="pass the output directory of `qcexport convert`",
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"model manifest {path} is not valid JSON: {e}") from None
    missing = [k for k in ("mechanism", "preset", "precision") if k not in manifest]
    if missing:
        raise UserError(
            f"model manifest {path} lacks {', '.join(missing)}",
            hint="re-export the model with `qcexport convert`",
        )
    return manifest


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--target",
    "target_names",
    multiple=True,
    required=True,
    help="Target to verify on (repeatable). Each one named must run: unavailable is a failure.",
)
@click.option(
    "--golden",
    "golden_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Golden set directory [default: manifest key 'golden', else MODEL_DIR/golden].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the full report as JSON to this file.",
)
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the report as JUnit XML to this file.",
)
def verify(model_dir: Path, target_names, golden_dir, json_path, junit_path):
    """Check MODEL_DIR/model.onnx against its golden set on each --target.

    Exit status 0 when every output of every case passes on every target, 1 otherwise.
    """
    manifest = _read_manifest(model_dir)
    if golden_dir is None:
        golden_dir = model_dir / manifest.get("golden", "golden")
    golden = load_golden(golden_dir, mechanism=manifest["mechanism"], preset=manifest["preset"])
    policy = TolerancePolicy.from_dict(manifest.get("tolerances") or {})
    names = list(dict.fromkeys(target_names))
    report = run_parity(
        model_dir / MODEL_FILE,
        golden,
        names,
        policy,
        manifest["precision"],
        require=names,  # asked for by name: not running there is not a pass
        attention_form=manifest.get("attention"),
    )
    if json_path:
        _write_atomic(json_path, report.to_json())
    if junit_path:
        _write_atomic(junit_path, report.to_junit_xml())
    click.echo(report.format_matrix())
    if not report.passed:
        failed = sorted({r.target for r in report.failures()})
        raise UserError(
            f"parity failed on {', '.join(failed)}: {len(report.failures())} failing checks "
            "(listed above)"
        )


if __name__ == "__main__":
    main()

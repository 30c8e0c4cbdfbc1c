"""What the ``qcrun`` and ``qcexport`` command lines share: the group that turns a UserError
into a clean exit, the options both spell the same way, report writing, and the body of their
``profile`` commands.

qcrun is the lower layer: qcexport's commands import this module, and nothing here imports
qcexport (or either CLI's command modules).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from qcrun.errors import UserError
from qcrun.files import MANIFEST_FILE


class UserErrorGroup(click.Group):
    """A click group that turns a UserError into `error: ...` and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


# --- shared options --------------------------------------------------------------------------


def targets_option(help: str, *, flag: str = "--target", dest: str = "target_names",
                   default=(), required: bool = False, show_default: bool = False):
    """A list of targets, spelled one way in both CLIs: ``--target T`` repeatable, each value
    also a comma-separated list, with the plural (``--targets a,b``) as an alias of the same
    option. The command receives the raw values; ``qcrun.parity.name_list`` splits them."""
    return click.option(flag, f"{flag}s", dest, multiple=True, default=default,
                        required=required, show_default=show_default, metavar="TARGETS",
                        help=help)


def optional_option(help: str = "Targets that may be absent here: skipped with the reason "
                    "instead of failing (repeatable or comma-separated)."):
    return click.option("--optional", "optional", multiple=True, metavar="TARGETS", help=help)


def policy_option(help: str = "Tolerance policy file (JSON, format 1) over qcrun's built-in "
                  "policy for the model's precision; a model directory's manifest never sets "
                  "its tolerances."):
    return click.option("--policy", "policy_file", default=None, help=help,
                        type=click.Path(path_type=Path, dir_okay=False))


def golden_option(help: str, *, dest: str = "golden_dir"):
    return click.option("--golden", dest, default=None, help=help,
                        type=click.Path(path_type=Path, file_okay=False))


def json_flag_option(help: str | None = "Print plain JSON."):
    """``--json`` that prints JSON instead of text (commands whose result is the output)."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def json_file_option(help: str | None = "Write the full report as JSON to this file."):
    """``--json PATH`` that writes the report file (commands whose output is a table)."""
    return click.option("--json", "json_path", help=help,
                        type=click.Path(path_type=Path, dir_okay=False))


def junit_option(help: str | None = "Write the report as JUnit XML to this file."):
    return click.option("--junit", "junit_path", help=help,
                        type=click.Path(path_type=Path, dir_okay=False))


def cell_option(check: str):
    """``--cell ID`` of ``qcrun verify`` / ``qcrun profile``: the ``--json`` file becomes the
    result of matrix cell ID (``qcrun.cell.CellResult``: the report with the cell id, the bundle
    digest, the device and the engine versions); a failure before the report is written as the
    cell's error, so the matrix says why instead of "no result"."""
    def decorate(command):
        @functools.wraps(command)
        def run(*args, cell=None, **kwargs):
            if cell is None:
                return command(*args, **kwargs)
            return _run_cell(command, check, cell, args, kwargs)

        return click.option("--cell", "cell", metavar="ID", help="The matrix cell this run is "
                            "(from `qcexport matrix plan`): --json then writes a cell result "
                            "for `qcexport matrix merge` (needs --json).")(run)
    return decorate


def _run_cell(command, check: str, cell: str, args, kwargs):
    from qcrun.cell import CellStamp, check_cell_id, stamping
    from qcrun.parity import name_list

    json_path = kwargs.get("json_path")
    if json_path is None:
        raise UserError(f"--cell {cell} stamps the --json result, and no --json was given",
                        stage="cell", hint="pass --json PATH")
    stamp = CellStamp(check_cell_id(cell), check, Path(kwargs["model_dir"]),
                      name_list(kwargs.get("target_names") or ()))
    with stamping(stamp):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            if not stamp.written:
                write_report(json_path, stamp.text(error=str(e)))
            raise


def output_option(help: str, *, file_okay: bool = True, dir_okay: bool = True,
                  required: bool = False, dest: str = "output"):
    return click.option("-o", "--output", dest, default=None, required=required, help=help,
                        type=click.Path(path_type=Path, file_okay=file_okay, dir_okay=dir_okay))


# --- report files ----------------------------------------------------------------------------


def write_report(path: Path, text: str,
                 write: Callable[[Path, str], None] | None = None) -> None:
    """Write a report file atomically; a full disk or an unwritable path is a clean error
    (the previous file, if any, is unchanged). ``write`` defaults to ``qcrun.files.write_atomic``
    (looked up at call time, so tests can simulate a full disk)."""
    from qcrun import files

    try:
        (write or files.write_atomic)(path, text)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror or exc}; {path} is unchanged",
                        stage="report", hint="free disk space or choose another path") from exc


# --- profile (`qcrun profile`, `qcexport profile`) ---------------------------------------------


def profile_options(command):
    """The options `qcrun profile` and `qcexport profile` share (one definition for both)."""
    options = [
        click.option("--batch", help="Sizes of the model's batch axis to sweep, comma-separated "
                     "[default: 1 when the model has one]."),
        click.option("--tokens", help="Sizes of the model's visual-token axis to sweep, e.g. "
                     "257,1025,4097 [default: 257 when the model has one]."),
        click.option("--axis", "axes", multiple=True, metavar="NAME=SIZES",
                     help="Sizes of another symbolic axis, e.g. text=32 (repeatable)."),
        click.option("--runs", type=int, help="Timed runs per shape and target."),
        click.option("--budget", type=float, metavar="SECONDS",
                     help="Time budget of the timed runs per shape and target "
                     "[default: 5 s when --runs is not given]."),
        click.option("--warmup", type=int, default=3, show_default=True,
                     help="Untimed warm-up runs per shape and target."),
        click.option("--op-runs", type=int, default=10, show_default=True,
                     help="Profiled runs for the per-op breakdown, at the last shape (0: none)."),
        click.option("--gemm-sizes", default="1024,1536,2048", show_default=True,
                     help="n of the n^3 fp32 GEMMs that measure each engine's peak, the fastest "
                     "winning (0: skip)."),
        click.option("--threads", type=int, help="Engine threads [default: the engine's own]."),
        click.option("--accuracy", is_flag=True,
                     help="OpenVINO: EXECUTION_MODE_HINT=ACCURACY (as parity runs) instead of "
                     "its performance defaults; the inference precision is the model's declared "
                     "one either way."),
        click.option("--top", type=int, default=8, show_default=True,
                     help="Entries of the per-op tables."),
        click.option("--module-depth", type=int, default=2, show_default=True,
                     help="Module nesting level the per-module table folds to."),
        json_file_option("Write the profile (the source of truth) as JSON to this file."),
        click.option("--markdown", "markdown_path",
                     type=click.Path(path_type=Path, dir_okay=False),
                     help="Write the Markdown tables to this file."),
        click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False),
                     help="Write the HTML report with plots (opens offline) to this file."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def execute_profile(model, target_names, settings: dict, feeds=None, write=None) -> None:
    """Run a profile for `qcrun profile` / `qcexport profile`: plan the sweep from the manifest,
    profile, print the tables, write the files; a UserError when nothing could be profiled.

    ``model`` is a checked ``qcrun.files.ModelDir``. ``feeds(manifest, point)`` builds the
    inputs of a point (default: seeded synthetic inputs shaped from the manifest, with a golden
    case as the template of the other axes).
    """
    from qcrun.latency import (
        check_input_memory,
        check_plan,
        check_sweep,
        parse_sizes,
        plan_sweep,
        sweep_points,
        synthetic_feeds,
    )
    from qcrun.profile import profile_model
    from qcrun.targets import get_target

    names = [n.strip() for raw in target_names for n in raw.split(",") if n.strip()]
    if not names:
        raise UserError("no targets given", hint="pass --targets ort-cpu,openvino-cpu")
    for name in names:
        get_target(name)  # unknown name: clean error listing the valid ones, before any work
    check_plan(settings["runs"], settings["budget"], settings["warmup"])
    model_dir, manifest = model.path, model.manifest
    inputs = manifest.input_specs()
    if not inputs:
        raise UserError(f"{model_dir / MANIFEST_FILE} lists no inputs", stage="profile",
                        hint="re-export the model with `qcexport convert`")
    sweep = plan_sweep(inputs, roles=manifest.roles,
                       batch=parse_sizes(settings["batch"], "--batch"),
                       tokens=parse_sizes(settings["tokens"], "--tokens"),
                       axes=settings["axes"])
    check_sweep(inputs, sweep, manifest.dynamic_axes)
    points = sweep_points(sweep)
    check_input_memory(inputs, points, manifest.roles)
    if feeds is None:
        feeds = synthetic_feeds(model)

    def say(text: str) -> None:
        click.echo(f"  {text}", err=True)

    click.echo(f"profiling {model_dir} on {', '.join(names)}: {len(points)} shape(s)", err=True)
    report = profile_model(
        model.model,
        names,
        points,
        lambda point: feeds(manifest, point),
        warmup=settings["warmup"],
        runs=settings["runs"],
        budget_s=settings["budget"],
        op_runs=settings["op_runs"],
        gemm_sizes=None if str(settings["gemm_sizes"]).strip() in ("0", "", "none")
        else parse_sizes(settings["gemm_sizes"], "--gemm-sizes"),
        threads=settings["threads"],
        accuracy=settings["accuracy"],
        model_info={k: getattr(manifest, k) for k in ("mechanism", "preset", "precision",
                                                      "attention", "opset", "target")
                    if getattr(manifest, k) is not None},
        progress=say,
        files=model.model_files(),
        split=model if model.manifest.split is not None else None,
    )
    markdown = report.to_markdown(top=settings["top"], module_depth=settings["module_depth"])
    click.echo(markdown)
    _write_profile(report, markdown, names, settings, write)


def _write_profile(report, markdown: str, names, settings: dict, write) -> None:
    """Reports are written only for a profile that succeeded, and only once every one of them
    is rendered: a failed run must not replace a previous good report."""
    from qcrun.cell import report_json
    from qcrun.report_html import render_html

    kept = "; the report files were not written (a previous report is kept)"
    if report.failed():
        raise UserError("profiling failed on " + "; ".join(
            f"{t.target}: {t.reason}" for t in report.failed()) + kept, stage="profile")
    if not report.ran():
        raise UserError(f"no target could run here ({', '.join(names)} skipped: reasons above)"
                        + kept, stage="profile",
                        hint="see `qcrun targets` for what runs on this machine")
    texts = [(Path(path), render()) for path, render in (
        (settings["json_path"], lambda: report_json(report.to_dict())),
        (settings["markdown_path"], lambda: markdown),
        (settings["html_path"], lambda: render_html(
            report, top=settings["top"], module_depth=settings["module_depth"]))) if path]
    write = write or write_report
    written: list[str] = []
    for path, text in texts:
        try:
            write(path, text)
        except OSError as exc:
            done = f" ({', '.join(written)} written)" if written else ""
            raise UserError(f"could not write {path}: {exc.strerror or exc}; {path} is "
                            f"unchanged{done}", stage="profile",
                            hint="free disk space or choose another path") from exc
        written.append(str(path))
        click.echo(f"wrote {path}", err=True)

"""``qcexport parity``: replay golden cases on every target; exit 1 on any mismatch."""

from __future__ import annotations

from pathlib import Path

import click
from qcrun.clikit import (
    golden_option,
    json_file_option,
    junit_option,
    optional_option,
    policy_option,
    targets_option,
    write_report,
)
from qcrun.errors import UserError

DEFAULT_PARITY_TARGETS = ("ort-cpu", "openvino-cpu", "onnx-reference")


@click.command("parity")
@click.argument("model")
@targets_option(
    "Targets (repeatable, or comma-separated); each one named must run here (a target that "
    "cannot run is a failure) unless --optional names it. [default: "
    f"{','.join(DEFAULT_PARITY_TARGETS)}, each optional]"
)
@click.option("--preset", default="tiny", show_default=True, help="With a mechanism NAME.")
@golden_option("Golden set directory (default: the built-in one).", dest="golden_path")
@optional_option(
    "Targets that may be absent here: skipped with the reason instead of failing "
    "(repeatable or comma-separated). The run still fails when no case ran at all."
)
@click.option("--require", multiple=True, hidden=True,
              help="Kept for old scripts: every target in --targets is required already.")
@policy_option()
@json_file_option()
@junit_option()
@click.option("--localize", is_flag=True,
              help="Also compare every PyTorch module's output on each target (a model "
                   "directory only): the first module that breaks the policy, per target.")
@click.option("--localize-report", "localize_reports", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="With --localize: write its report (.json, .md or .html; repeatable).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("out/parity"), show_default=True,
              help="Where models exported for a mechanism NAME go.")
def parity(model, target_names, preset, golden_path, optional, require, policy_file, json_path,
           junit_path, localize, localize_reports, work_dir):
    """Replay golden cases on every target; exit 1 on any mismatch.

    MODEL is an exported model directory or a mechanism name (exported here with the golden
    set's weights, in the attention form each target prefers). Exit 1 also when a target named
    in --target ran no case (unless --optional) and when no case ran at all.
    """
    from qcrun.parity import name_list, required_targets

    from qcexport.parity import parity_for_mechanism, parity_for_model_dir

    named = name_list(target_names)
    names = named or list(DEFAULT_PARITY_TARGETS)
    # The default list is "whatever of these runs here": each optional unless --require names it.
    optional = (name_list(optional) if named
                else [n for n in names if n not in name_list(require)])
    # unknown or contradictory names: a clean error listing the valid ones, before any work
    required_targets(names, optional, require)
    if Path(model).is_dir():
        run = parity_for_model_dir(Path(model), names, golden=golden_path, require=require,
                                   optional=optional, policy_file=policy_file)
    else:
        run = parity_for_mechanism(model, preset, names, work_dir=work_dir,
                                   golden=golden_path, require=require, optional=optional,
                                   policy_file=policy_file)
    _print_run(run)
    if localize:
        _localize(Path(model), names, golden_path, policy_file, localize_reports)
    if json_path:
        _write(json_path, run.report.to_json())
        if run.kernel is not None:
            _write(json_path.with_name(json_path.stem + ".kernel.json"), run.kernel.to_json())
    if junit_path:
        _write(junit_path, run.report.to_junit_xml())
    if not run.passed:
        raise _failure(run)


def _localize(model: Path, targets, golden_path, policy_file, reports) -> None:
    """Where each target diverges (``qcexport diff --against eager``); parity's verdict
    stays the exit status."""
    from qcexport.commands.diff import echo_localization
    from qcexport.localize.run import localize_model_dir, write_report

    if not model.is_dir():
        raise UserError("--localize needs an exported model directory", stage="localize",
                        hint=f"convert first: `qcexport convert {model} -o DIR`")
    click.echo("\nlocalisation (module outputs against PyTorch eager):")
    report = localize_model_dir(model, targets, golden=golden_path, policy_file=policy_file)
    echo_localization(report)
    for path in reports:
        write_report(report, path)


def _print_run(run) -> None:
    for form, path in run.models.items():
        click.echo(f"model ({form}): {path}")
    click.echo(f"golden: {run.report.golden}\n")
    click.echo(run.report.format_matrix())
    if run.kernel is not None:
        click.echo(f"\nkernel error ({run.report.precision}): each runtime vs onnx-reference on "
                   "the same model, so quantization error (above) and kernel error are apart")
        click.echo(run.kernel.format_matrix())
    if run.drift:
        click.echo("\nPyTorch eager no longer reproduces the golden outputs:")
        for line in run.drift:
            click.echo(f"  {line}")


def _failure(run) -> UserError:
    from qcrun.parity import NOT_RUN_CODES

    if not run.report.ran():
        return UserError(run.report.verdict_line(), stage="parity",
                         hint="see `qcrun targets` for what runs here; name a target that "
                         "runs here in --targets")
    kernel_failures = run.kernel.failures() if run.kernel else []
    failed = sorted({f"{r.target}/{r.output or 'all outputs'}"
                     for r in run.report.failures()}
                    | {f"{r.target}/{r.output} (kernel)" for r in kernel_failures})
    unavailable = [r for r in run.report.failures() if r.code in NOT_RUN_CODES]
    return UserError(f"parity failed: {', '.join(failed) or 'eager drift'}",
                     stage="parity",
                     hint="see the failures listed above" + (
                         "; a target that cannot run here is required unless you pass "
                         "--optional TARGET" if unavailable else ""))


def _write(path: Path, text: str) -> None:
    """A report file, atomically (``qcrun.files.write_atomic``, the one atomic writer)."""
    write_report(path, text)

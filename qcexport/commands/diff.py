"""``qcexport diff``: where a model diverges, module by module, on each target."""

from __future__ import annotations

from pathlib import Path

import click
from qcrun.clikit import golden_option, policy_option, targets_option
from qcrun.errors import UserError

DEFAULT_TARGETS = ("ort-cpu", "openvino-cpu", "onnx-reference")


def report_option(f):
    return click.option(
        "--report", "reports", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
        help="Write the localisation report: .json, .md or .html (repeatable).")(f)


def echo_localization(report) -> None:
    """The per-target tables, the first divergence of each target and the peak memory."""
    from qcrun.localize import format_table

    click.echo(format_table(report))


@click.command("diff")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--against", default="eager", show_default=True,
              help="eager (PyTorch forward hooks), a target name (two runtimes on the same "
                   "model) or fp32 (quantization against kernel error, per module: the model "
                   "against its fp32 model on onnx-reference, each runtime against "
                   "onnx-reference on the model).")
@targets_option(f"Targets to localise on [default: {','.join(DEFAULT_TARGETS)}].")
@click.option("--fp32", "fp32_model", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path),
              help="With --against fp32: the fp32 model directory [default: the source "
                   "model the manifest records].")
@golden_option("Golden set whose cases are run (default: the built-in one).", dest="golden_path")
@click.option("--case", "cases", multiple=True, help="Only these golden cases (repeatable).")
@click.option("--all-cases", is_flag=True,
              help="Localise every failing case, not only the first one per target.")
@click.option("--bisect", "bisect", multiple=True,
              help="Targets to localise by bisection even when observing does not change "
                   "their outputs (repeatable).")
@policy_option()
@report_option
def diff(model, against, target_names, fp32_model, golden_path, cases, all_cases, bisect,
         policy_file, reports):
    """Compare every PyTorch module's output of MODEL on each target with a reference, in
    execution order; exit 1 when some module breaks the policy."""
    from qcrun.parity import name_list

    from qcexport.localize.run import localize_model_dir, write_report

    targets = name_list(target_names) or list(DEFAULT_TARGETS)
    report = localize_model_dir(model, targets, against=against, golden=golden_path,
                                policy_file=policy_file, cases=cases, fp32_model=fp32_model,
                                force_bisection=name_list(bisect), all_cases=all_cases)
    echo_localization(report)
    for path in reports:
        write_report(report, path)
    if not report.ran():
        raise UserError("nothing ran: no target could localise here", stage="localize",
                        hint="see `qcrun targets`")
    if report.diverged:
        firsts = ", ".join(f"{t.target}: {t.first}" for t in report.targets if t.first)
        raise UserError(f"diverged ({firsts})", stage="localize",
                        hint="the first module listed per target is where to look")

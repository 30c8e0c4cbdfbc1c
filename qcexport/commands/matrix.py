"""``qcexport matrix``: plan a parity/latency matrix, build its bundles, run the cells this
machine can run, and merge device results into one report."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from qcrun.clikit import optional_option, output_option, targets_option, write_report
from qcrun.errors import UserError


@click.group("matrix")
def matrix():
    """A parity and latency matrix (model x precision x target) across many devices.

    `plan` writes the cells, the bundles they need and the commands a device runs (and a CI
    workflow with --workflow); `build` makes the bundles; `run` runs the cells this machine
    can run; `merge` joins every device's results into one report whose exit status is the
    gate.
    """


@matrix.command("plan")
@click.option("--models", "--mechanisms", "models", multiple=True, required=True,
              metavar="MODELS", help="Models, comma-separated or repeated: a built-in "
              "mechanism as NAME[:PRESET] (preset default tiny), or a model directory.")
@click.option("--precisions", multiple=True, default=("fp32",), show_default=True,
              metavar="PRECISIONS", help="Precisions, comma-separated or repeated.")
@targets_option("Targets, comma-separated or repeated.", flag="--target",
                default=("ort-cpu,openvino-cpu,onnx-reference",), show_default=True)
@optional_option("Targets whose cells may fail or be missing without failing the merge.")
@click.option("--checks", default="verify,profile", show_default=True,
              help="What a device runs per cell: verify (parity), profile (latency).")
@click.option("--runs", "profile_runs", type=int, default=50, show_default=True,
              help="Timed runs of each cell's profile.")
@click.option("--golden", "goldens", multiple=True, metavar="MODEL_DIR=GOLDEN_DIR",
              help="The golden set of a model directory in --models (your own model's, from "
              "`qcexport golden --hf/--module -o`); repeatable.")
@click.option("--runner", "runners", multiple=True, metavar="TARGET=LABELS",
              help="CI runner labels of a target, e.g. jetson-orin=self-hosted,jetson-agx "
              "(repeatable) [default: the table in qcexport.matrix.plan].")
@click.option("--qcrun-spec", default="qcrun", show_default=True,
              help="What a device pip-installs for qcrun (a name, or a path such as "
              "./runtimes); the target's engine extra is added.")
@click.option("--qcexport-spec", default="qcexport", show_default=True,
              help="What the build and merge jobs pip-install for qcexport.")
@output_option("The plan file to write.", dir_okay=False, required=True)
@click.option("--workflow", type=click.Choice(["github", "gitlab"]), default=None,
              help="Also write a CI workflow for the plan.")
@click.option("--workflow-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Where the workflow goes [default: .github/workflows/qcexport-matrix.yml, "
              "or .gitlab-ci.yml].")
def plan_command(models, precisions, target_names, optional, checks, profile_runs, goldens,
                 runners, qcrun_spec, qcexport_spec, output, workflow, workflow_file):
    """Plan the cells MODELS x PRECISIONS x TARGETS and write them to -o plan.json."""
    from qcexport.matrix.plan import (
        PlanOptions,
        make_plan,
        parse_goldens,
        parse_runners,
        write_plan,
    )
    from qcexport.matrix.workflow import DEFAULT_PATHS, render

    plan = make_plan(PlanOptions(
        models=models, goldens=parse_goldens(goldens), precisions=precisions, targets=target_names, optional=optional,
        checks=checks.split(","), runners=parse_runners(runners), profile_runs=profile_runs,
        qcrun_spec=qcrun_spec, qcexport_spec=qcexport_spec, argv=["qcexport", *sys.argv[1:]]))
    workflow_text = None
    if workflow:
        workflow_file = workflow_file or Path(DEFAULT_PATHS[workflow])
        workflow_text = render(workflow, plan, output.as_posix())
    write_plan(plan, output)
    click.echo(f"plan {output}: {len(plan.cells)} cells, {len(plan.bundles)} bundles")
    for cell in plan.cells:
        click.echo(f"  {cell.id:<48} bundle {cell.bundle}  runs-on {', '.join(cell.runs_on)}"
                   + ("" if cell.required else "  (optional)"))
    for line in plan.not_planned:
        click.echo(f"  not planned: {line}")
    if workflow_text is not None:
        write_report(workflow_file, workflow_text)
        click.echo(f"wrote {workflow_file} ({workflow} workflow)")


@matrix.command("build")
@click.argument("plan_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("."),
              show_default=True, help="Where bundles/ goes.")
@click.option("--rebuild", is_flag=True, help="Make bundles again even if they exist.")
def build_command(plan_path, workdir, rebuild):
    """Make every bundle PLAN needs under WORKDIR/bundles (the CI build job)."""
    from qcexport.matrix.build import build_bundles
    from qcexport.matrix.plan import read_plan

    plan = read_plan(plan_path)
    built = build_bundles(plan, workdir, rebuild=rebuild, say=click.echo)
    click.echo(f"{len(built)} bundles in {workdir / plan.bundles_dir}")


@matrix.command("run")
@click.argument("plan_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cells verified at the same time (profiles run one at a time).")
@click.option("--cells", "cell_ids", multiple=True, metavar="IDS",
              help="Only these cells (comma-separated or repeated) [default: all].")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=Path("."),
              show_default=True, help="Where bundles/ and results/ go.")
@click.option("--rebuild", is_flag=True, help="Make bundles again even if they exist.")
def run_command(plan_path, jobs, cell_ids, workdir, rebuild):
    """Run the cells of PLAN this machine can run: build their bundles if missing, then
    `qcrun verify` / `qcrun profile` each in child processes, results in WORKDIR/results.

    Exit status 1 when a cell's command failed or no cell can run here; cells whose target
    is not here are listed with the reason (the merge reports them as "no result").
    """
    from qcrun.parity import name_list

    from qcexport.matrix.build import build_bundles
    from qcexport.matrix.plan import read_plan
    from qcexport.matrix.run import run_cells, runnable

    plan = read_plan(plan_path)
    wanted = name_list(list(cell_ids))
    unknown = [c for c in wanted if plan.cell(c) is None]
    if unknown:
        raise UserError(f"--cells names {', '.join(unknown)}, not in {plan_path}",
                        stage="run", hint="pass ids from the plan (qcexport matrix plan lists them)")
    here, not_here = runnable(plan, wanted)
    for cell_id, why in not_here.items():
        click.echo(f"cannot run here: {cell_id}: {why}")
    if not here:
        raise UserError("no cell of the plan can run on this machine (reasons above)",
                        stage="run", hint="run the others on their devices (the CI workflow)")
    build_bundles(plan, workdir, only={c.bundle for c in here}, rebuild=rebuild,
                  say=click.echo)
    runs = run_cells(plan, here, workdir, jobs=jobs, say=click.echo)
    failed = [r for r in runs if r.returncode != 0]
    for r in failed:
        click.echo(f"\n{r.cell} {r.check} failed (exit {r.returncode}):\n  "
                   + r.output.replace("\n", "\n  "), err=True)
    click.echo(f"\nran {len(runs)} commands for {len(here)} cells; results in "
               f"{workdir / plan.results_dir}; {len(not_here)} cells cannot run here")
    if failed:
        raise UserError(f"{len(failed)} of {len(runs)} cell commands failed (listed above)",
                        stage="run", hint="`qcexport matrix merge` shows every cell's verdict")


@matrix.command("merge")
@click.argument("results", nargs=-1, type=click.Path(path_type=Path))
@click.option("--plan", "plan_path", required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="The plan the results are for.")
@click.option("--bundles", "bundles_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="The built bundles (or just their bundle.json files), whose "
              "digests the results must carry [default: WORKDIR bundles/ of the plan].")
@output_option("Report directory: matrix.md, junit.xml, matrix.json, matrix.html.",
               file_okay=False, required=True)
def merge_command(results, plan_path, bundles_dir, output):
    """Merge device RESULTS (files or directories of cell results) into one report.

    A planned cell without a result fails ("no result"), a result for another bundle digest
    is "stale", a repeated cell keeps the newest result. Exit status 1 unless every required
    cell passed.
    """
    from qcexport.matrix.merge import merge
    from qcexport.matrix.plan import read_plan
    from qcexport.matrix.render import to_html, to_json, to_junit, to_markdown

    plan = read_plan(plan_path)
    if not results:
        results = (Path(plan.results_dir),)
    report = merge(plan, results, bundles_dir or Path(plan.bundles_dir))
    markdown = to_markdown(report)
    texts = {"matrix.md": markdown, "junit.xml": to_junit(report),
             "matrix.json": to_json(report), "matrix.html": to_html(report)}
    for name, text in texts.items():
        write_report(output / name, text)
    click.echo(markdown)
    click.echo(f"wrote {', '.join(str(output / n) for n in texts)}")
    if not report.passed:
        raise UserError(report.verdict_line(), stage="merge",
                        hint=f"see {output / 'matrix.md'} for every cell that did not pass")

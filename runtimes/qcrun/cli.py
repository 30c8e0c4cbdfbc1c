"""The ``qcrun`` command: a thin click shell over targets, golden reading and parity.

Only this module prints or exits. A UserError becomes ``error: <message>`` on stderr and exit
status 1, without a traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
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
    from qcrun.files import read_model_dir

    return read_model_dir(model_dir, required=("mechanism", "preset", "precision"))


def _write_atomic(path: Path, text: str) -> None:
    from qcrun.files import write_atomic

    write_atomic(path, text)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--target",
    "target_names",
    multiple=True,
    help="Target to verify on (repeatable). Each one named must run: unavailable is a failure. "
    "[default for a bundle: the target it was made for; required for a model directory]",
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
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Bundles on TensorRT: where engine and timing caches go [default: $QCRUN_CACHE_DIR, "
    "else ~/.cache/qcrun].",
)
def verify(model_dir: Path, target_names, golden_dir, json_path, junit_path, cache_dir):
    """Check MODEL_DIR/model.onnx (or a bundle) against its golden set on each --target.

    MODEL_DIR may be a bundle directory or .tar.gz written by `qcexport bundle`: every file's
    sha256 is checked first (a missing or modified file fails, by name), then its golden
    subset runs under its own tolerance policy on the target it was made for, or on each
    --target that can read it. Exit status 0 when every output of every case passes on every
    target, 1 otherwise.
    """
    from qcrun.bundle import is_bundle

    if is_bundle(model_dir):
        _verify_bundle(model_dir, target_names, golden_dir, json_path, junit_path, cache_dir)
        return
    if not target_names:
        raise UserError(f"{model_dir} is a model directory: name the targets to verify on",
                        hint="pass --target T (repeatable), e.g. --target ort-cpu")
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is neither a model directory nor a bundle",
                        hint="pass the output of `qcexport convert` or `qcexport bundle`")
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
    _finish_verify(report, json_path, junit_path)


def _finish_verify(report, json_path, junit_path) -> None:
    if json_path:
        _write_atomic(json_path, report.to_json())
    if junit_path:
        _write_atomic(junit_path, report.to_junit_xml())
    click.echo(report.format_matrix())
    if not report.passed:
        failed = sorted({r.target for r in report.failures()})
        unavailable = all(r.code == "unavailable" for r in report.failures())
        raise UserError(
            f"parity failed on {', '.join(failed)}: {len(report.failures())} failing checks "
            "(listed above)",
            hint="run it where the target exists, or pass a --target that runs here (see "
            "`qcrun targets`)" if unavailable else None,
        )


def _verify_bundle(path: Path, target_names, golden_dir, json_path, junit_path, cache_dir):
    """verify for a bundle: hashes first, then its golden subset under its own policy."""
    from qcrun.bundle import open_bundle

    if golden_dir is not None:
        raise UserError("--golden does not apply to a bundle: it carries its own golden subset",
                        hint="drop --golden")
    with open_bundle(path) as bundle:  # bundle.json itself is checked here
        check = bundle.require_intact()
        click.echo(f"bundle {path}: {bundle.describe()}")
        click.echo(f"files: all {check.checked} match bundle.json (sha256)")
        for extra in check.extra:
            click.echo(f"note: {extra} is not part of the bundle (ignored)")
        names = list(dict.fromkeys(target_names)) or [bundle.target]
        for name in names:
            bundle.require_compatible(name)
            if name != bundle.target:
                click.echo(f"note: bundle made for {bundle.target}, verified on {name}, which "
                           f"reads its form ({bundle.attention!r}, opset {bundle.opset})")
        golden = load_golden(bundle.golden_path)
        report = run_parity(
            bundle.model_path,
            golden,
            names,
            bundle.policy,
            bundle.precision,
            require=names,  # asked for (or the bundle's own): not running there is not a pass
            attention_form=bundle.attention,
            options={n: bundle.adapter_options(n, cache_dir) for n in names},
        )
        report.model = f"{path} ({bundle.manifest['model']})"
        report.golden = f"{path} ({bundle.manifest.get('golden', 'golden')}, " \
            f"{len(golden.cases)} cases)"
        click.echo("")
        _finish_verify(report, json_path, junit_path)


@main.command("inspect")
@click.argument("model_dir", metavar="MODEL_DIR_OR_BUNDLE", type=click.Path(path_type=Path))
@click.option("--target", "target_name", default="ort-cpu", show_default=True,
              help="Target to run the model on.")
@click.option("--golden", "golden_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Golden set whose inputs to feed [default: manifest key 'golden', else "
              "MODEL_DIR/golden; random inputs when there is none].")
@click.option("--case", "cases", multiple=True, help="Golden case to run (repeatable; default all).")
@click.option("--random", "use_random", is_flag=True,
              help="Feed random inputs made from the manifest's input specs.")
@click.option("--size", "sizes", multiple=True, metavar="AXIS=N",
              help="Size of a symbolic axis for random inputs (e.g. tokens=257).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random inputs.")
@click.option("--sample", type=int, default=0, show_default=True, help="Row of the batch.")
@click.option("--grid", metavar="ROWSxCOLS", help="Patch grid of the visual tokens.")
@click.option("--threshold", type=float, default=0.95, show_default=True,
              help="Cosine at or above which two queries are near-duplicates.")
@click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write every number as JSON to this file.")
def inspect_command(model_dir: Path, target_name, golden_dir, cases, use_random, sizes, seed,
                    sample, grid, threshold, json_path):
    """Query-conditioning numbers of a model exported with attention maps, without torch.

    Attention entropy per query, pairwise cosine of query outputs and attention maps with the
    near-duplicate queries, Flamingo gate values and visual share, routing choices and the
    Matryoshka m sweep: the numbers `qcexport inspect` draws, from the model on this device.
    """
    from qcrun import diagnostics as diag
    from qcrun.adapters import open_adapter

    source = diag.open_source(model_dir)
    golden = None
    if not use_random:
        if golden_dir is None:
            named = source.manifest.get("golden")
            candidates = [Path(named), source.directory / named] if isinstance(named, str) else []
            candidates.append(source.directory / "golden")
            golden_dir = next((c for c in candidates if (c / "manifest.json").is_file()), None)
        if golden_dir is not None:
            golden = load_golden(golden_dir, mechanism=source.manifest.get("mechanism"),
                                 preset=source.manifest.get("preset"))
    if cases and golden is None:
        raise UserError("--case needs a golden set, and none was found",
                        hint="pass --golden DIR, or drop --case to feed random inputs")
    with open_adapter(source.model, target_name) as session:
        descriptor = diag.require_maps(source.manifest, [o.name for o in session.outputs],
                                       str(model_dir))
        if golden is not None:
            feeds = diag.golden_feeds(golden, cases)
            fed = f"golden set {golden.path} ({len(feeds)} cases)"
        else:
            specs = source.manifest.get("inputs") or [
                {"name": i.name, "dtype": i.dtype, "shape": list(i.shape or [])}
                for i in session.inputs]
            feeds = [("random", diag.random_feed(specs, descriptor,
                                                 sizes=diag.parse_sizes(sizes), seed=seed))]
            fed = f"random inputs (seed {seed})"
        runs, sweep = diag.run_all(descriptor, feeds, session.run)
    analysis = diag.analyse(descriptor, runs, sweep=sweep, sample=sample, threshold=threshold,
                            grid=diag.parse_grid(grid), source=f"{model_dir} on {target_name}")
    analysis["inputs"] = fed
    click.echo(f"{model_dir} on {target_name}, {fed}")
    click.echo(diag.format_summary(analysis))
    if json_path:
        _write_atomic(json_path, json.dumps(analysis, indent=1) + "\n")
        click.echo(f"wrote {json_path}")


# --- profile ---------------------------------------------------------------------------------


def profile_options(command):
    """The options `qcrun profile` and `qcexport profile` share (one definition for both)."""
    options = [
        click.option("--batch", help="Batch sizes to sweep, comma-separated [default: 1]."),
        click.option("--tokens", help="Visual token counts to sweep, e.g. 257,1025,4097 "
                     "[default: 257 when the model has a 'tokens' axis]."),
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
                     help="OpenVINO: EXECUTION_MODE_HINT=ACCURACY (fp32, as parity runs) instead "
                     "of its performance defaults."),
        click.option("--top", type=int, default=8, show_default=True,
                     help="Entries of the per-op tables."),
        click.option("--module-depth", type=int, default=2, show_default=True,
                     help="Module nesting level the per-module table folds to."),
        click.option("--json", "json_path", type=click.Path(path_type=Path, dir_okay=False),
                     help="Write the profile (the source of truth) as JSON to this file."),
        click.option("--markdown", "markdown_path",
                     type=click.Path(path_type=Path, dir_okay=False),
                     help="Write the Markdown tables to this file."),
        click.option("--html", "html_path", type=click.Path(path_type=Path, dir_okay=False),
                     help="Write the HTML report with plots (opens offline) to this file."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def execute_profile(model_dir: Path, manifest: dict, target_names, settings: dict,
                    feeds=None, write=None) -> None:
    """Run a profile for `qcrun profile` / `qcexport profile`: plan the sweep from the manifest,
    profile, print the tables, write the files; a UserError when nothing could be profiled.

    ``feeds(manifest, point)`` builds the inputs of a point (default: seeded synthetic inputs
    shaped from the manifest, with a golden case as the template of the other axes).
    """
    from qcrun.latency import check_plan, check_sweep, parse_sizes, plan_sweep, sweep_points
    from qcrun.profile import profile_model
    from qcrun.report_html import render_html
    from qcrun.targets import get_target

    names = [n.strip() for raw in target_names for n in raw.split(",") if n.strip()]
    if not names:
        raise UserError("no targets given", hint="pass --targets ort-cpu,openvino-cpu")
    for name in names:
        get_target(name)  # unknown name: clean error listing the valid ones, before any work
    check_plan(settings["runs"], settings["budget"], settings["warmup"])
    inputs = manifest.get("inputs")
    if not inputs:
        raise UserError(f"{model_dir / MANIFEST_FILE} lists no inputs",
                        hint="re-export the model with `qcexport convert`")
    sweep = plan_sweep(inputs, batch=parse_sizes(settings["batch"], "--batch"),
                       tokens=parse_sizes(settings["tokens"], "--tokens"),
                       axes=settings["axes"])
    check_sweep(inputs, sweep, manifest.get("dynamic_axes"))
    points = sweep_points(sweep)
    if feeds is None:
        feeds = _synthetic_feeds(model_dir, manifest)

    def say(text: str) -> None:
        click.echo(f"  {text}", err=True)

    click.echo(f"profiling {model_dir} on {', '.join(names)}: {len(points)} shape(s)", err=True)
    report = profile_model(
        model_dir / manifest.get("model", MODEL_FILE),
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
        model_info={k: manifest.get(k) for k in ("mechanism", "preset", "precision", "attention",
                                                 "opset", "target") if manifest.get(k)},
        progress=say,
    )
    markdown = report.to_markdown(top=settings["top"], module_depth=settings["module_depth"])
    click.echo(markdown)
    write = write or _write_atomic
    for path, text in ((settings["json_path"], lambda: report.to_json() + "\n"),
                       (settings["markdown_path"], lambda: markdown),
                       (settings["html_path"], lambda: render_html(
                           report, top=settings["top"], module_depth=settings["module_depth"]))):
        if path:
            write(Path(path), text())
            click.echo(f"wrote {path}", err=True)
    if report.failed():
        raise UserError("profiling failed on " + "; ".join(
            f"{t.target}: {t.reason}" for t in report.failed()), stage="profile")
    if not report.ran():
        raise UserError(f"no target could run here ({', '.join(names)} skipped: reasons above)",
                        stage="profile", hint="see `qcrun targets` for what runs on this machine")


def _synthetic_feeds(model_dir: Path, manifest: dict):
    from qcrun.latency import synthetic_feed

    template = _golden_template(model_dir, manifest)

    def feeds(manifest, point):
        return synthetic_feed(manifest["inputs"], point.as_dict(), seed=0, template=template)

    return feeds


def _golden_template(model_dir: Path, manifest: dict):
    """The first golden case's inputs, if the model has a readable golden set: they give the
    sizes of axes that are not swept and values such as Matryoshka's m."""
    named = manifest.get("golden")
    candidates = [model_dir / named] if isinstance(named, str) else []
    candidates.append(model_dir / "golden")
    for directory in candidates:
        if (directory / "manifest.json").is_file():
            try:
                golden = load_golden(directory)
            except UserError:
                return None
            return golden.cases[0].inputs if golden.cases else None
    return None


@main.command("profile")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--target", "target_names", multiple=True, required=True,
              help="Target to profile on (repeatable, or comma-separated); an unavailable one "
              "is skipped with the reason.")
@profile_options
def profile_command(model_dir: Path, target_names, **settings):
    """Latency of MODEL_DIR/model.onnx on each --target: percentiles, per-op time, FLOP/s.

    MODEL_DIR may be a bundle (directory or .tar.gz): its file hashes are checked first.

    Untimed warm-up, then --runs timed runs or a --budget of seconds per shape; session
    creation is timed separately. Prints Markdown tables; --json, --markdown and --html write
    the report. Exit status 1 when a target fails or none can run.
    """
    from qcrun.bundle import is_bundle, resolve_model

    if is_bundle(model_dir):  # a bundle (directory or .tar.gz): hashes checked first
        model_path, manifest = resolve_model(model_dir)
        model_dir = model_path.parent
    else:
        manifest = _read_manifest(model_dir)
    execute_profile(model_dir, manifest, target_names, settings)



if __name__ == "__main__":
    main()

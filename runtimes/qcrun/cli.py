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
from qcrun.parity import NOT_RUN_CODES, name_list, policy_for, required_targets, run_parity
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


def _read_manifest(model_dir: Path, stage: str = "verify"):
    from qcrun.files import read_model_dir

    return read_model_dir(model_dir, stage=stage, required=("mechanism",))


def _write_atomic(path: Path, text: str) -> None:
    """Write a report file atomically; a full disk or an unwritable path is a clean error
    (the previous file, if any, is unchanged)."""
    from qcrun.files import write_atomic

    try:
        write_atomic(path, text)
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror or exc}; {path} is unchanged",
                        stage="report", hint="free disk space or choose another path") from exc


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
    "--optional",
    "optional",
    multiple=True,
    metavar="TARGETS",
    help="Targets (among --target) that may be absent here: skipped with the reason instead of "
    "failing (repeatable or comma-separated). Verify still fails when no case ran at all.",
)
@click.option(
    "--golden",
    "golden_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Golden set directory [default: manifest key 'golden', else MODEL_DIR/golden].",
)
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Tolerance policy file (JSON, format 1) over qcrun's built-in policy for the model's "
    "precision. A model directory's own manifest never sets its tolerances.",
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
@click.option(
    "--trust",
    "trusted_keys",
    multiple=True,
    metavar="PUBKEY",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Bundles: an Ed25519 public key (PEM, from `qcexport keygen`) whose signature makes "
    "a bundle authentic (repeatable). The bundle must be signed by one of them; its recorded "
    "tolerance policy is then used. Needs `pip install 'qcrun[sign]'`.",
)
@click.option(
    "--expect-sha256",
    "expect_sha256",
    metavar="DIGEST",
    help="Bundles: the manifest sha256 `qcexport bundle` printed; any other bundle.json fails "
    "(pins a bundle without keys).",
)
def verify(model_dir: Path, target_names, optional, golden_dir, policy_file, json_path,
           junit_path, cache_dir, trusted_keys, expect_sha256):
    """Check MODEL_DIR/model.onnx (or a bundle) against its golden set on each --target.

    MODEL_DIR may be a bundle directory or .tar.gz written by `qcexport bundle`: every file's
    sha256 is checked first (a missing or modified file fails, by name), then its golden
    subset runs on the target it was made for, or on each --target that can read it, under
    qcrun's tolerance policy for the precision of its graph (the host's policy recorded in the
    bundle only when it is signed by a key given with --trust). Exit status 0 when every output of every case passes on every
    target, 1 otherwise: a target that cannot run here fails unless --optional names it, and a
    run in which no case ran fails.
    """
    from qcrun.bundle import is_bundle

    if is_bundle(model_dir):
        _verify_bundle(model_dir, target_names, golden_dir, json_path, junit_path, cache_dir,
                       optional=optional, policy_file=policy_file, trusted_keys=trusted_keys,
                       expect_sha256=expect_sha256)
        return
    if trusted_keys or expect_sha256:
        raise UserError(f"{model_dir} is not a bundle: --trust and --expect-sha256 check "
                        "bundles", stage="trust",
                        hint="make a signed bundle with `qcexport bundle MODEL_DIR --target T "
                        "--sign KEY`, or drop --trust / --expect-sha256")
    if not target_names:
        raise UserError(f"{model_dir} is a model directory: name the targets to verify on",
                        hint="pass --target T (repeatable), e.g. --target ort-cpu")
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is neither a model directory nor a bundle",
                        hint="pass the output of `qcexport convert` or `qcexport bundle`")
    model = _read_manifest(model_dir)  # hashes, paths, precision of the graph: checked here
    manifest = model.manifest
    if golden_dir is None:
        golden_dir = model.golden_dir() or model_dir / "golden"
    golden = load_golden(golden_dir, mechanism=manifest.mechanism if manifest.builtin else None,
                         preset=manifest.preset)
    model.check_weights(golden)
    # The verdict's tolerances are qcrun's (or the file the user named), never the manifest's.
    policy = policy_for(model.precision, policy_file=policy_file)
    names = name_list(target_names)
    report = run_parity(
        model.model,
        golden,
        names,
        policy,
        model.precision,
        # asked for by name: not running there is not a pass, unless marked optional
        require=required_targets(names, optional),
        optional=optional,
        attention_form=model.attention,  # the graph's form (the manifest's was checked)
    )
    _finish_verify(report, json_path, junit_path)


def _finish_verify(report, json_path, junit_path) -> None:
    if json_path:
        _write_atomic(json_path, report.to_json())
    if junit_path:
        _write_atomic(junit_path, report.to_junit_xml())
    click.echo(report.format_matrix())
    if not report.passed:
        unavailable = all(r.code in NOT_RUN_CODES for r in report.failures())
        raise UserError(
            report.verdict_line() + (" (listed above)" if report.failures() else ""),
            stage="verify",
            hint="run it where the target exists, pass a --target that runs here (see "
            "`qcrun targets`), or mark one that may be absent with --optional"
            if unavailable else None,
        )


def _verify_bundle(path: Path, target_names, golden_dir, json_path, junit_path, cache_dir,
                   optional=(), policy_file=None, trusted_keys=(), expect_sha256=None):
    """verify for a bundle: who wrote it (--trust, --expect-sha256), hashes, the precision of
    its graph, then its golden subset under qcrun's policy (or --policy, or the host's
    recorded one when a trusted key signed the bundle)."""
    from qcrun.bundle import open_bundle

    if golden_dir is not None:
        raise UserError("--golden does not apply to a bundle: it carries its own golden subset",
                        hint="drop --golden")
    with open_bundle(path) as bundle:  # bundle.json itself is checked here
        authenticity = bundle.authenticate(trusted_keys=list(trusted_keys) or None,
                                           expect_sha256=expect_sha256)
        check = bundle.require_intact()
        click.echo(f"bundle {path}: {bundle.describe()}")
        click.echo(f"files: all {check.checked} match bundle.json (sha256)")
        for line in authenticity.lines():
            click.echo(line)
        click.echo(bundle.policy_line(policy_file))
        for extra in check.extra:
            click.echo(f"note: {extra} is not part of the bundle (ignored)")
        names = name_list(target_names) or [bundle.target]
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
            bundle.judging_policy(policy_file),
            bundle.precision,
            # asked for (or the bundle's own): not running there is not a pass, unless optional
            require=required_targets(names, optional),
            optional=optional,
            attention_form=bundle.attention,
            options={n: bundle.adapter_options(n, cache_dir) for n in names},
        )
        report.model = f"{path} ({bundle.spec.model})"
        report.golden = f"{path} ({bundle.spec.golden}, {len(golden.cases)} cases)"
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
            golden_dir = source.golden_dir
        if golden_dir is not None:
            manifest = source.manifest
            golden = load_golden(golden_dir,
                                 mechanism=manifest.mechanism if manifest.builtin else None,
                                 preset=manifest.preset)
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
            specs = source.manifest.input_specs()
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


def execute_profile(model, target_names, settings: dict, feeds=None, write=None) -> None:
    """Run a profile for `qcrun profile` / `qcexport profile`: plan the sweep from the manifest,
    profile, print the tables, write the files; a UserError when nothing could be profiled.

    ``model`` is a checked ``qcrun.files.ModelDir``. ``feeds(manifest, point)`` builds the
    inputs of a point (default: seeded synthetic inputs shaped from the manifest, with a golden
    case as the template of the other axes).
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
    model_dir, manifest = model.path, model.manifest
    inputs = manifest.input_specs()
    if not inputs:
        raise UserError(f"{model_dir / MANIFEST_FILE} lists no inputs", stage="profile",
                        hint="re-export the model with `qcexport convert`")
    sweep = plan_sweep(inputs, batch=parse_sizes(settings["batch"], "--batch"),
                       tokens=parse_sizes(settings["tokens"], "--tokens"),
                       axes=settings["axes"])
    check_sweep(inputs, sweep, manifest.dynamic_axes)
    points = sweep_points(sweep)
    _check_input_memory(inputs, points)
    if feeds is None:
        feeds = _synthetic_feeds(model)

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
    )
    markdown = report.to_markdown(top=settings["top"], module_depth=settings["module_depth"])
    click.echo(markdown)
    # Reports are written only for a profile that succeeded, and only once every one of them
    # is rendered: a failed run must not replace a previous good report.
    kept = "; the report files were not written (a previous report is kept)"
    if report.failed():
        raise UserError("profiling failed on " + "; ".join(
            f"{t.target}: {t.reason}" for t in report.failed()) + kept, stage="profile")
    if not report.ran():
        raise UserError(f"no target could run here ({', '.join(names)} skipped: reasons above)"
                        + kept, stage="profile",
                        hint="see `qcrun targets` for what runs on this machine")
    write = write or _write_atomic
    texts = [(Path(path), render()) for path, render in (
        (settings["json_path"], lambda: report.to_json() + "\n"),
        (settings["markdown_path"], lambda: markdown),
        (settings["html_path"], lambda: render_html(
            report, top=settings["top"], module_depth=settings["module_depth"]))) if path]
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


def input_memory_bound() -> int:
    """The most bytes one profiled shape's inputs may take: an eighth of this machine's memory
    (the model's activations and the engine's buffers are several times the inputs), at most
    4 GiB."""
    import os

    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return min(total // 8, 4 << 30)


def _check_input_memory(inputs, points) -> None:
    """Refuse a sweep point whose inputs alone exceed ``input_memory_bound``, naming the flag
    that asked for it, before any array is allocated."""
    import numpy as np

    from qcrun.latency import input_shapes

    bound = input_memory_bound()
    for point in points:
        shapes = input_shapes(inputs, point.as_dict())
        size = 0
        for spec in inputs:
            count = 1
            for dim in shapes[spec["name"]]:
                count *= dim
            size += count * np.dtype(spec.get("dtype") or "float32").itemsize
        if size > bound:
            flags = ", ".join(f"--{k}" if k in ("batch", "tokens") else f"--axis {k}=..."
                              for k, v in point.sizes if v > 1)
            raise UserError(
                f"the inputs at {point.label()} would take {size / 2**30:.3g} GiB, over the "
                f"bound of {bound / 2**30:.3g} GiB per shape (1/8 of this machine's memory, at "
                "most 4 GiB)",
                stage="profile",
                hint=f"lower {flags or 'the swept sizes'}",
            )


def _synthetic_feeds(model):
    from qcrun.latency import synthetic_feed

    template = _golden_template(model)

    def feeds(manifest, point):
        return synthetic_feed(manifest.input_specs(), point.as_dict(), seed=0,
                              template=template)

    return feeds


def _golden_template(model):
    """The first golden case's inputs, if the model has a readable golden set: they give the
    sizes of axes that are not swept and values such as Matryoshka's m."""
    directory = model.golden_dir()
    if directory is None or not (directory / MANIFEST_FILE).is_file():
        return None
    try:
        golden = load_golden(directory)
    except UserError:
        return None
    return golden.cases[0].inputs if golden.cases else None


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
    from qcrun.files import check_model_dir, read_model_dir

    if is_bundle(model_dir):  # a bundle (directory or .tar.gz): hashes checked first
        model_path, manifest = resolve_model(model_dir)
        model = check_model_dir(model_path.parent, manifest, where=f"bundle {model_dir}",
                                stage="profile")
    else:
        model = read_model_dir(model_dir, stage="profile")
    execute_profile(model, target_names, settings)



if __name__ == "__main__":
    main()

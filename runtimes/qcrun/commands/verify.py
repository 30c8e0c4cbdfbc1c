"""``qcrun verify``: a model directory or a bundle against its golden set, on each target."""

from __future__ import annotations

from pathlib import Path

import click

from qcrun.clikit import (
    cell_option,
    golden_option,
    json_file_option,
    junit_option,
    optional_option,
    policy_option,
    targets_option,
    write_report,
)
from qcrun.errors import UserError
from qcrun.golden import load_golden
from qcrun.parity import NOT_RUN_CODES, name_list, policy_for, required_targets, run_parity


@click.command("verify")
@click.argument("model_dir", type=click.Path(path_type=Path))
@targets_option(
    "Target to verify on (repeatable, or comma-separated). Each one named must run: "
    "unavailable is a failure. [default for a bundle: the target it was made for; required "
    "for a model directory]"
)
@optional_option(
    "Targets (among --target) that may be absent here: skipped with the reason instead of "
    "failing (repeatable or comma-separated). Verify still fails when no case ran at all."
)
@golden_option("Golden set directory [default: manifest key 'golden', else MODEL_DIR/golden].")
@policy_option(
    "Tolerance policy file (JSON, format 1) over qcrun's built-in policy for the model's "
    "precision. A model directory's own manifest never sets its tolerances."
)
@json_file_option()
@cell_option("verify")
@junit_option()
@click.option("--localize", is_flag=True,
              help="Model directories: also name the first PyTorch module whose output breaks "
              "the policy on each target, against the module outputs stored with the golden "
              "set (`qcexport golden --with-intermediates`); no torch needed.")
@click.option("--against", "against", metavar="TARGET",
              help="With --localize: compare with this target's module outputs instead (two "
              "runtimes on the same model, the kernel tolerances).")
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
           junit_path, localize, against, cache_dir, trusted_keys, expect_sha256):
    """Check MODEL_DIR/model.onnx (or a bundle) against its golden set on each --target.

    MODEL_DIR may be a bundle directory or .tar.gz written by `qcexport bundle`: every file's
    sha256 is checked first (a missing or modified file fails, by name), then its golden
    subset runs on the target it was made for, or on each --target that can read it, under
    qcrun's tolerance policy for the precision of its graph (the host's policy recorded in the
    bundle only when it is signed by a key given with --trust). Exit status 0 when every
    output of every case passes on every target, 1 otherwise: a target that cannot run here
    fails unless --optional names it, and a run in which no case ran fails.
    """
    from qcrun.bundle import is_bundle

    if is_bundle(model_dir) and (localize or against):
        raise UserError("--localize works on a model directory, not a bundle", stage="localize",
                        hint="run it on the model directory the bundle was made from")
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
    model = _read_model_dir(model_dir)  # hashes, paths, precision of the graph: checked here
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
        model.model_files(),  # OpenVINO targets read the IR when the directory has one
        golden,
        names,
        policy,
        model.precision,
        # asked for by name: not running there is not a pass, unless marked optional
        require=required_targets(names, optional),
        optional=optional,
        attention_form=model.attention,  # the graph's form (the manifest's was checked)
    )
    if localize or against:
        _localize(model, golden, names, policy, against)
    _finish_verify(report, json_path, junit_path)


def _localize(model, golden, names, policy, against) -> None:
    """Where each target diverges, module by module; parity's verdict stays the exit
    status."""
    from qcrun.localize import Case, StoredReference, format_table, localize_with

    cases = [Case(c.name, c.inputs, c.outputs) for c in golden.cases]
    reference = against or StoredReference(golden)
    click.echo(f"localisation (module outputs against {against or StoredReference.name}):")
    report = localize_with(model.model, names, cases, reference, policy, model.precision)
    click.echo(format_table(report) + "\n")


def _read_model_dir(model_dir: Path, stage: str = "verify"):
    from qcrun.files import read_model_dir

    return read_model_dir(model_dir, stage=stage, required=("mechanism",))


def _openvino_lines(bundle, check) -> list[str]:
    """What the bundle carries for OpenVINO: IR, fixed axes, the compiled-model cache (whose
    damage is a note, not a failure: the IR is compiled instead, which only takes longer)."""
    lines = []
    ov = bundle.spec.openvino
    if ov is not None:
        times = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in ov.host_load_s.items())
        lines.append(f"openvino: IR {ov.xml}; compiled-model cache: {bundle.cache_state()}"
                     + (f" (load on the host: {times})" if times else ""))
        lines += [f"note: compiled-model cache {p.describe()}: the IR is compiled instead "
                  "(slower load, same results)" for p in check.cache_problems]
    if bundle.fixed_axes:
        skipped = bundle.spec.fixed_axes.skipped_cases
        lines.append("fixed axes: " + ", ".join(f"{a}={v}" for a, v in bundle.fixed_axes.items())
                     + "".join(f"; left out {n}: {w}" for n, w in skipped.items()))
    return lines


def _time_uncached_loads(report, bundle, cache_dir) -> None:
    """For each target that loaded from the bundle's compiled-model cache, one load without
    it (compiling the IR), so the report says what the cache saves on this device."""
    from dataclasses import replace

    from qcrun.engines import adapter_for, model_file

    for name, load in list(report.loads.items()):
        if load.cache != "used":
            continue
        options = {k: v for k, v in bundle.adapter_options(name, cache_dir).items()
                   if k not in ("compiled_blob", "compiled_config")}
        path = model_file(bundle.model_files(), name)
        with adapter_for(path, name, precision=bundle.precision, **options) as adapter:
            report.loads[name] = replace(load, uncached_s=round(adapter.load_seconds, 4))


def _finish_verify(report, json_path, junit_path) -> None:
    from qcrun.cell import report_json

    if json_path:
        write_report(json_path, report_json(report.to_dict()))
    if junit_path:
        write_report(junit_path, report.to_junit_xml())
    click.echo(report.format_matrix())
    for name, load in report.loads.items():
        click.echo(f"load on {name}: {load.describe()}")
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
        for line in _openvino_lines(bundle, check):
            click.echo(line)
        names = name_list(target_names) or [bundle.target]
        for name in names:
            bundle.require_compatible(name)
            if name != bundle.target:
                click.echo(f"note: bundle made for {bundle.target}, verified on {name}, which "
                           f"reads its form ({bundle.attention!r}, opset {bundle.opset})")
        golden = load_golden(bundle.golden_path)
        report = run_parity(
            bundle.model_files(),  # OpenVINO targets read the IR the bundle carries
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
        _time_uncached_loads(report, bundle, cache_dir)
        click.echo("")
        _finish_verify(report, json_path, junit_path)

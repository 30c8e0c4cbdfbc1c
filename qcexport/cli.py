"""The ``qcexport`` command: a thin click shell over the stages.

Only this module prints or exits. A UserError ends the program with ``error: <message>`` and
exit status 1, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click
from qcrun.cli import UserErrorGroup
from qcrun.errors import UserError
from qcrun.targets import target_names

ATTENTION_CHOICES = ("auto", "onnx", "ort", "decomposed")


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="qcexport")
def main():
    """Export query-conditioned visual attention modules to ONNX and prove them on edge runtimes."""


# --- list ------------------------------------------------------------------------------------


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print plain JSON.")
def list_command(as_json: bool):
    """The mechanisms, their presets, parameter counts, inputs and dynamic axes."""
    from qcexport import mechanisms

    rows = [mechanisms.describe(name) for name in mechanisms.names()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        params = ", ".join(f"{p} {_count(v['parameters'])}" for p, v in row["presets"].items())
        click.echo(f"{row['name']:<20} {row['summary']}")
        click.echo(f"{'':<20} presets: {params}")
        axes = "; ".join(
            f"{name}[{', '.join(f'{a}:{n}' for a, n in ax.items())}]"
            for name, ax in row["dynamic_axes"].items() if name in row["inputs"]
        )
        click.echo(f"{'':<20} inputs: {', '.join(row['inputs'])}  dynamic: {axes}")
        click.echo(f"{'':<20} outputs: {', '.join(row['outputs'])}  ({row['source']})")


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


# --- convert ---------------------------------------------------------------------------------


@main.command()
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Convert every registered mechanism.")
@click.option("--module", "factory", metavar="PKG.MOD:FACTORY",
              help="Convert your own module: FACTORY() returns (module, example_inputs, dynamic_axes).")
@click.option("--preset", default="tiny", show_default=True, help="tiny or base.")
@click.option("--target", default="ort-cpu", show_default=True,
              help=f"Where the model will run: {', '.join(target_names())}.")
@click.option("--attention", default="auto", show_default=True,
              help="Attention form: auto (from the target), onnx, ort or decomposed.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: 23, or 17 decomposed).")
@click.option("--precision", default="fp32", show_default=True,
              help="fp32, fp16, int8-dynamic or int8-static (the fp32 model is kept in DIR/fp32).")
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Output directory (with --all: one subdirectory per mechanism).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON only.")
@click.option("--with-attention-maps", "with_maps", is_flag=True,
              help="Also output every layer's cross-attention maps (and gate diagnostics), for "
              "`qcexport inspect` and `qcrun inspect`; the regular outputs are unchanged.")
@click.option("--map-heads", type=click.Choice(["mean", "each"]), default="mean",
              show_default=True, help="With --with-attention-maps: averaged over heads or per head.")
def convert(name, all_, factory, preset, target, attention, opset, precision, output, as_json,
            with_maps, map_heads):
    """Export NAME (or --all, or --module) to ONNX, lowered, simplified, checked and verified."""
    from qcexport import mechanisms
    from qcexport.export import convert as convert_module
    from qcexport.export import convert_mechanism

    chosen = sum(bool(x) for x in (name, all_, factory))
    if chosen != 1:
        raise UserError("give exactly one of NAME, --all or --module",
                        hint=f"e.g. `qcexport convert qformer`; mechanisms: {', '.join(mechanisms.names())}")
    from qcrun.errors import unknown_choice

    from qcexport.optimize import PRECISIONS, check_target_precision

    if attention not in ATTENTION_CHOICES:
        raise unknown_choice("attention form", attention, ATTENTION_CHOICES, flag="--attention")
    if precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS, flag="--precision")
    check_target_precision(target, precision)
    reduced = precision != "fp32"

    progress = None if as_json else _progress
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    if factory and with_maps:
        raise UserError("--with-attention-maps works with the built-in mechanisms, not --module",
                        hint="drop --with-attention-maps, or return maps as outputs of your module")
    if factory:
        module, example, axes = load_factory(factory)
        out = Path(output or "out/custom")
        _header(f"{factory} -> {out}", as_json)
        result = convert_module(module, example, axes, target=target, attention=attention,
                                opset=opset, output_dir=out / "fp32" if reduced else out,
                                on_stage=progress,
                                metadata={"mechanism": "custom", "factory": factory})
        results.append(_summary(result, as_json))
        if reduced:
            results[-1]["precision"] = _reduce(result.path.parent, precision, out, as_json)
    else:
        names = mechanisms.names() if all_ else [name]
        mechanisms.get(names[0])  # unknown name: clean error before any work
        for mech in names:
            out = (Path(output) / f"{mech}-{preset}" if all_ and output else
                   Path(output) if output else Path("out") / f"{mech}-{preset}")
            _header(f"{mech} ({preset}) -> {out}", as_json)
            try:
                result = convert_mechanism(mech, preset, target=target, attention=attention,
                                           opset=opset, on_stage=progress, precision=precision,
                                           with_attention_maps=with_maps,
                                           attention_map_heads=map_heads,
                                           output_dir=out / "fp32" if reduced else out)
                summary = _summary(result, as_json)
                if reduced:
                    summary["precision"] = _reduce(result.path.parent, precision, out, as_json)
            except UserError as exc:
                if not all_:
                    raise
                failures.append(f"{mech}: {exc}")
                click.echo(f"error: {mech}: {exc}", err=True)
                continue
            results.append(summary)
    if as_json:
        click.echo(json.dumps(results if all_ else results[0] if results else {}, indent=2))
    if failures:
        click.echo(f"\n{len(failures)} of {len(failures) + len(results)} conversions failed:", err=True)
        for f in failures:
            click.echo(f"  {f.splitlines()[0]}", err=True)
        sys.exit(1)
    if all_ and not as_json:
        click.echo(f"\nall {len(results)} mechanisms converted and verified")


def _reduce(fp32_dir: Path, precision: str, out: Path, as_json: bool, **options) -> dict[str, Any]:
    """The optimize stage after a convert, or on its own (`quantize`): prints the loss."""
    from qcexport.optimize import quantize_model_dir

    result = quantize_model_dir(fp32_dir, precision, out, **options)
    q = result.manifest["quantization"]
    data = {"path": str(result.path), "precision": precision, "quantization": q,
            "calibration": result.manifest.get("calibration"),
            "accuracy_loss": result.manifest["accuracy_loss"]}
    if as_json:
        return data
    click.echo(f"  {precision:<9} {result.seconds:7.2f} s  {result.path}")
    details = ", ".join(f"{k}={v}" for k, v in q.items() if k in
                        ("weight_type", "activation_type", "reduce_range", "method", "reason"))
    click.echo(f"  settings  {details}")
    if q.get("counts"):
        c = q["counts"]
        click.echo(f"  matmuls   quantized {c['quantized']['top']} (+{c['quantized']['branches']} in "
                   f"branches), float {c['float']['top']} (+{c['float']['branches']} in branches)")
    if result.manifest.get("calibration"):
        cal = result.manifest["calibration"]
        click.echo(f"  calib     {cal['count']} samples from {cal['source']} "
                   f"(sha256 {cal['sha256'][:12]})")
    worst = max(result.loss, key=lambda r: r.max_abs)
    click.echo(f"  vs fp32   {len(result.loss)} outputs within policy; worst {worst.case}/"
               f"{worst.output}: max abs {worst.max_abs:.3g}, min cosine "
               f"{min(r.cosine for r in result.loss):.6f}")
    return data


def _header(text: str, as_json: bool) -> None:
    if not as_json:
        click.echo(f"\n== {text}")


def _progress(stage: str, seconds: float, detail: str) -> None:
    click.echo(f"  {stage:<9} {seconds:7.2f} s  {detail}".rstrip())


def _summary(result, as_json: bool) -> dict[str, Any]:
    data = {
        "path": str(result.path),
        "attention": result.attention,
        "opset": result.opset,
        "fused_attention": {"expected": result.fused_expected, "found": result.fused_found},
        "verification": [dataclasses.asdict(r) for r in result.verification],
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "warnings": result.warnings,
        "passed": result.passed,
    }
    if as_json:
        return data
    fused = (f"{result.fused_found} of {result.fused_expected} fused {result.attention!r} "
             "attention nodes" if result.attention != "decomposed"
             else "attention decomposed to MatMul/Softmax")
    click.echo(f"  model     {result.path}  (opset {result.opset}, {fused})")
    for r in result.verification:
        verdict = "ok" if r.passed else "FAIL"
        click.echo(f"  verify    {r.case:<16} {r.output:<16} {str(r.shape):<14} "
                   f"max abs {r.max_abs:.2e}  cosine {r.cosine:.7f}  {verdict}")
    for w in result.warnings:
        click.echo(f"  warning   {w}")
    return data


def load_factory(spec: str):
    """Import ``package.module:factory`` and call it: (module, example_inputs, dynamic_axes)."""
    if ":" not in spec:
        raise UserError(f"--module {spec!r} is not of the form package.module:factory",
                        stage="load", hint="e.g. --module mypkg.models:make_resampler")
    mod_name, _, attr = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # any import failure is the user's module failing to import
        raise UserError(f"cannot import {mod_name!r}: {type(exc).__name__}: {exc}", stage="load",
                        hint="check the module path and that it imports on its own "
                        f"(python -c 'import {mod_name}')") from exc
    finally:
        sys.path.pop(0)
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise UserError(f"{mod_name} has no callable {attr!r}", stage="load",
                        hint="name a function that returns (module, example_inputs, dynamic_axes)")
    try:
        made = factory()
    except Exception as exc:  # the user's factory: report, do not crash
        raise UserError(f"{spec}() raised {type(exc).__name__}: {exc}", stage="load",
                        hint="fix the factory; it is called with no arguments") from exc
    import torch

    if not (isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], torch.nn.Module)
            and isinstance(made[1], dict)):
        raise UserError(f"{spec}() must return (nn.Module, {{input name: tensor}}, dynamic_axes)",
                        stage="load", hint="return a 3-tuple")
    return made



# --- quantize -------------------------------------------------------------------------------


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", required=True, help="fp16, int8-dynamic or int8-static.")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False, path_type=Path),
              help="int8-static: .npz with one array per input, samples on axis 0.")
@click.option("--calibration-cases", default=16, show_default=True,
              help="int8-static without a file: seeded cases from the mechanism's input factory.")
@click.option("--method", default="minmax", show_default=True,
              help="int8-static calibration: minmax, percentile or entropy.")
@click.option("--exclude-nodes", default="", help="Comma-separated node names kept in float.")
@click.option("--exclude-modules", default="",
              help="Comma-separated PyTorch module names (e.g. layers.0.ff) kept in float.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory (default: MODEL_DIR-PRECISION).")
@click.option("--json", "as_json", is_flag=True)
def quantize(model_dir, precision, calibration_file, calibration_cases, method, exclude_nodes,
             exclude_modules, output, as_json):
    """Make a reduced-precision copy of an exported fp32 model, measured against it."""
    if calibration_cases < 1:
        raise UserError(f"--calibration-cases must be at least 1, not {calibration_cases}")
    out = output or model_dir.parent / f"{model_dir.name}-{precision}"
    data = _reduce(model_dir, precision, out, as_json, calibration_file=calibration_file,
                   calibration_cases=calibration_cases, method=method,
                   exclude_nodes=[n for n in exclude_nodes.split(",") if n],
                   exclude_modules=[m for m in exclude_modules.split(",") if m])
    if as_json:
        click.echo(json.dumps(data, indent=2))


# --- golden ----------------------------------------------------------------------------------


@main.command()
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Every registered mechanism.")
@click.option("--preset", default="tiny", show_default=True)
@click.option("--update", is_flag=True, help="Allow changing stored golden outputs.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Golden root directory (default: the repository's golden/).")
def golden(name, all_, preset, update, root):
    """Write or refresh the golden set of NAME from PyTorch eager."""
    from qcexport import mechanisms
    from qcexport.golden import write_golden

    if bool(name) == bool(all_):
        raise UserError("give NAME or --all", hint=f"mechanisms: {', '.join(mechanisms.names())}")
    for mech in mechanisms.names() if all_ else [name]:
        result = write_golden(mech, preset, root=root, update=update)
        state = "written" if result.written else "unchanged"
        click.echo(f"{mech} ({preset}): {len(result.cases)} cases {state} in {result.path}")
        for change in result.changes:
            click.echo(f"  {change.describe()}")


# --- parity ----------------------------------------------------------------------------------


@main.command()
@click.argument("model")
@click.option("--targets", default="ort-cpu,openvino-cpu,onnx-reference", show_default=True,
              help="Comma-separated targets.")
@click.option("--preset", default="tiny", show_default=True, help="With a mechanism NAME.")
@click.option("--golden", "golden_path", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Golden set directory (default: the built-in one).")
@click.option("--require", multiple=True, help="A target whose skip counts as a failure.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("out/parity"), show_default=True,
              help="Where models exported for a mechanism NAME go.")
def parity(model, targets, preset, golden_path, require, json_path, junit_path, work_dir):
    """Replay golden cases on every target; exit 1 on any mismatch.

    MODEL is an exported model directory or a mechanism name (exported here with the golden
    set's weights, in the attention form each target prefers).
    """
    from qcexport.export.save import write_bytes_atomic
    from qcexport.parity import parity_for_mechanism, parity_for_model_dir

    names = [t.strip() for t in targets.split(",") if t.strip()]
    from qcrun.targets import get_target

    for t in [*names, *require]:
        get_target(t)  # unknown target: clean error listing the valid ones, before any work
    if Path(model).is_dir():
        run = parity_for_model_dir(Path(model), names, golden=golden_path, require=require)
    else:
        run = parity_for_mechanism(model, preset, names, work_dir=work_dir,
                                   golden=golden_path, require=require)
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
    if json_path:
        write_bytes_atomic(json_path, run.report.to_json().encode())
        if run.kernel is not None:
            kernel_path = json_path.with_name(json_path.stem + ".kernel.json")
            write_bytes_atomic(kernel_path, run.kernel.to_json().encode())
    if junit_path:
        write_bytes_atomic(junit_path, run.report.to_junit_xml().encode())
    if not run.passed:
        kernel_failures = run.kernel.failures() if run.kernel else []
        failed = sorted({f"{r.target}/{r.output}" for r in run.report.failures()}
                        | {f"{r.target}/{r.output} (kernel)" for r in kernel_failures})
        raise UserError(f"parity failed: {', '.join(failed) or 'eager drift'}",
                        stage="parity", hint="see the failures listed above")


from qcexport.commands.inspect import inspect as _inspect  # noqa: E402

main.add_command(_inspect)

from qcexport.commands.profile import profile as _profile  # noqa: E402

main.add_command(_profile)

from qcexport.commands.bundle import bundle as _bundle  # noqa: E402

main.add_command(_bundle)


if __name__ == "__main__":
    main()

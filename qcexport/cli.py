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
@click.option("-o", "--output", "output", type=click.Path(), default=None,
              help="Output directory (with --all: one subdirectory per mechanism).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON only.")
def convert(name, all_, factory, preset, target, attention, opset, output, as_json):
    """Export NAME (or --all, or --module) to ONNX, lowered, simplified, checked and verified."""
    from qcexport import mechanisms
    from qcexport.export import convert as convert_module
    from qcexport.export import convert_mechanism

    chosen = sum(bool(x) for x in (name, all_, factory))
    if chosen != 1:
        raise UserError("give exactly one of NAME, --all or --module",
                        hint=f"e.g. `qcexport convert qformer`; mechanisms: {', '.join(mechanisms.names())}")
    if attention not in ATTENTION_CHOICES:
        from qcrun.errors import unknown_choice

        raise unknown_choice("attention form", attention, ATTENTION_CHOICES, flag="--attention")

    progress = None if as_json else _progress
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    if factory:
        module, example, axes = load_factory(factory)
        out = Path(output or "out/custom")
        _header(f"{factory} -> {out}", as_json)
        result = convert_module(module, example, axes, target=target, attention=attention,
                                opset=opset, output_dir=out, on_stage=progress,
                                metadata={"mechanism": "custom", "factory": factory})
        results.append(_summary(result, as_json))
    else:
        names = mechanisms.names() if all_ else [name]
        mechanisms.get(names[0])  # unknown name: clean error before any work
        for mech in names:
            out = (Path(output) / f"{mech}-{preset}" if all_ and output else
                   Path(output) if output else Path("out") / f"{mech}-{preset}")
            _header(f"{mech} ({preset}) -> {out}", as_json)
            try:
                result = convert_mechanism(mech, preset, target=target, attention=attention,
                                           opset=opset, output_dir=out, on_stage=progress)
            except UserError as exc:
                if not all_:
                    raise
                failures.append(f"{mech}: {exc}")
                click.echo(f"error: {mech}: {exc}", err=True)
                continue
            results.append(_summary(result, as_json))
    if as_json:
        click.echo(json.dumps(results if all_ else results[0] if results else {}, indent=2))
    if failures:
        click.echo(f"\n{len(failures)} of {len(failures) + len(results)} conversions failed:", err=True)
        for f in failures:
            click.echo(f"  {f.splitlines()[0]}", err=True)
        sys.exit(1)
    if all_ and not as_json:
        click.echo(f"\nall {len(results)} mechanisms converted and verified")


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
    if run.drift:
        click.echo("\nPyTorch eager no longer reproduces the golden outputs:")
        for line in run.drift:
            click.echo(f"  {line}")
    if json_path:
        write_bytes_atomic(json_path, run.report.to_json().encode())
    if junit_path:
        write_bytes_atomic(junit_path, run.report.to_junit_xml().encode())
    if not run.passed:
        failed = sorted({f"{r.target}/{r.output}" for r in run.report.failures()})
        raise UserError(f"parity failed: {', '.join(failed) or 'eager drift'}",
                        stage="parity", hint="see the failures listed above")


if __name__ == "__main__":
    main()

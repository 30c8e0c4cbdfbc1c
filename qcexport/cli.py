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
DEFAULT_PARITY_TARGETS = ("ort-cpu", "openvino-cpu", "onnx-reference")


@click.group(cls=UserErrorGroup)
@click.version_option(package_name="qcexport")
def main():
    """Export query-conditioned visual attention modules to ONNX and prove them on edge runtimes."""


# --- list ------------------------------------------------------------------------------------


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print plain JSON.")
@click.option("--hf", "hf", is_flag=True,
              help="List the Hugging Face components (convert --hf PATH --component NAME).")
def list_command(as_json: bool, hf: bool):
    """The mechanisms, their presets, parameter counts, inputs and dynamic axes."""
    from qcexport import mechanisms

    if hf:
        _list_hf(as_json)
        return

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


def _list_hf(as_json: bool) -> None:
    from qcexport.hf import describe

    rows = describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<22} {row['class']} (from {'/'.join(row['model_types'])} "
                   "models)")
        click.echo(f"{'':<22} {row['summary']}")
        axes = "; ".join(f"{name}[{', '.join(f'{a}:{n}' for a, n in ax.items())}]"
                         for name, ax in row["dynamic_axes"].items())
        click.echo(f"{'':<22} inputs: {', '.join(row['inputs'])}  dynamic: {axes}")
        click.echo(f"{'':<22} outputs: {', '.join(row['outputs'])}")
    click.echo("\nqcexport convert --hf PATH_OR_ID --component NAME  (needs pip install "
               "'qcexport[hf]')")


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
@click.option("--outputs", "outputs", default=None, metavar="A,B",
              help="With --module: keep only these outputs (by path name, e.g. "
              "last_hidden_state,hidden_states.3; default: every tensor the module returns).")
@click.option("--hf", "hf_path", metavar="PATH_OR_ID",
              help="Convert a Hugging Face component (with --component) from a save_pretrained "
              "directory or hub id.")
@click.option("--component", default=None,
              help="With --hf: the component to take (qcexport list --hf).")
def convert(name, all_, factory, preset, target, attention, opset, precision, output, as_json,
            with_maps, map_heads, outputs, hf_path, component):
    """Export NAME (or --all, --module, --hf) to ONNX, lowered, simplified, checked, verified."""
    from qcexport import mechanisms
    from qcexport.export import convert as convert_module
    from qcexport.export import convert_mechanism

    chosen = sum(bool(x) for x in (name, all_, factory, hf_path))
    if chosen != 1:
        raise UserError("give exactly one of NAME, --all, --module or --hf",
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
    custom = factory or hf_path
    if component and not hf_path:
        raise UserError("--component goes with --hf", hint="e.g. --hf DIR --component qformer")
    if custom and with_maps:
        raise UserError("--with-attention-maps works with the built-in mechanisms, not --module",
                        hint="drop --with-attention-maps, or return maps as outputs of your module")
    if outputs and not custom:
        raise UserError("--outputs selects outputs of your own module (--module)",
                        hint="drop --outputs; a mechanism's outputs come from its spec")
    if custom:
        out = Path(output or (f"out/{component}" if hf_path else "out/custom"))
        options = dict(target=target, attention=attention, opset=opset, on_stage=progress,
                       output_dir=out / "fp32" if reduced else out,
                       output_names=_name_list(outputs))
        if hf_path:
            from qcexport import hf

            comp = load_hf(hf_path, component)
            _header(f"{hf_path} ({component}) -> {out}", as_json)
            result = hf.convert(None, comp, **options)
        else:
            module, example, axes = load_factory(factory)
            _header(f"{factory} -> {out}", as_json)
            result = convert_module(module, example, axes, **options,
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
        "fused_attention": {"expected": result.fused_expected, "found": result.fused_found,
                            "sdpa_calls": result.sdpa_calls},
        "attention_report": result.describe_attention(),
        "outputs": result.output_names,
        "constants": result.constants,
        "verification": [dataclasses.asdict(r) for r in result.verification],
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "warnings": result.warnings,
        "passed": result.passed,
    }
    if as_json:
        return data
    click.echo(f"  model     {result.path}  (opset {result.opset})")
    click.echo(f"  attention {result.describe_attention()}")
    click.echo(f"  outputs   {', '.join(result.output_names)}")
    if result.constants:
        click.echo("  fixed     " + ", ".join(f"{k}={v!r}" for k, v in result.constants.items()))
    for r in result.verification:
        verdict = "ok" if r.passed else "FAIL"
        click.echo(f"  verify    {r.case:<16} {r.output:<16} {str(r.shape):<14} "
                   f"max abs {r.max_abs:.2e}  cosine {r.cosine:.7f}  {verdict}")
    for w in result.warnings:
        click.echo(f"  warning   {w}")
    return data


def load_factory(spec: str, *, with_cases: bool = False):
    """Import ``package.module:factory`` and call it: (module, example_inputs, dynamic_axes).

    The factory may return a fourth item, its golden cases (``{name: inputs}``, ``[(name,
    inputs)]`` or a callable giving either); ``with_cases`` returns it too (None if absent).
    """
    if ":" not in spec:
        raise UserError(f"--module {spec!r} is not of the form package.module:factory",
                        stage="load", hint="e.g. --module mypkg.models:make_resampler")
    mod_name, _, attr = spec.partition(":")
    sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except (Exception, SystemExit) as exc:  # the user's module failing to import, or exiting
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
    except SystemExit as exc:  # sys.exit() in a factory must not end qcexport silently
        raise UserError(f"{spec}() called sys.exit({exc.code!r}) instead of returning",
                        stage="load", hint="return (module, example_inputs, dynamic_axes) from "
                        "the factory; raise an exception to report a problem") from exc
    except Exception as exc:  # the user's factory: report, do not crash
        raise UserError(f"{spec}() raised {type(exc).__name__}: {exc}", stage="load",
                        hint="fix the factory; it is called with no arguments") from exc
    import torch

    cases = None
    if isinstance(made, tuple) and len(made) == 4:
        made, cases = made[:3], made[3]
    if not (isinstance(made, tuple) and len(made) == 3 and isinstance(made[0], torch.nn.Module)
            and isinstance(made[1], dict)):
        # non-tensor values in the inputs are constants fixed at export (e.g. return_dict=True)
        raise UserError(f"{spec}() must return (nn.Module, {{input name: tensor}}, dynamic_axes)",
                        stage="load", hint="return a 3-tuple (or a 4-tuple with golden cases)")
    axes = made[2]
    if axes is not None and not (
        isinstance(axes, dict)
        and all(isinstance(k, str) and isinstance(v, dict) for k, v in axes.items())
        and all(isinstance(a, int) and not isinstance(a, bool) and isinstance(n, str)
                for v in axes.values() for a, n in v.items())
    ):
        raise UserError(f"{spec}() returned dynamic_axes of type {type(axes).__name__}: "
                        f"{str(axes)[:200]}", stage="load",
                        hint="return dynamic_axes as {input or output name: {axis index: "
                        "symbolic name}}, e.g. {'x': {0: 'batch', 1: 'tokens'}}, or None")
    return (*made, cases) if with_cases else made



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
@click.option("--module", "factory", metavar="PKG.MOD:FACTORY",
              help="Your own module, as for convert; a 4th item FACTORY() returns are its cases.")
@click.option("--hf", "hf_path", metavar="PATH_OR_ID",
              help="A Hugging Face save_pretrained directory (or hub id), with --component.")
@click.option("--component", default=None, help="With --hf: which component (qcexport list --hf).")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), default=None,
              help="With --module or --hf: the golden set's directory (new, empty or a set).")
@click.option("--outputs", "outputs", default=None, metavar="A,B",
              help="With --module or --hf: the outputs to keep, as given to convert.")
@click.option("--seed", default=0, show_default=True,
              help="With --module or --hf: offset of the seeds the cases are drawn with.")
def golden(name, all_, preset, update, root, factory, hf_path, component, output, outputs, seed):
    """Write or refresh the golden set of NAME (or --module, or --hf) from PyTorch eager."""
    from qcexport import mechanisms
    from qcexport.golden import golden_dir, write_golden

    if factory or hf_path or component:
        if name or all_:
            raise UserError("give NAME, --all, --module or --hf, not several",
                            hint="e.g. `qcexport golden --hf DIR --component qformer -o OUT`")
        _user_golden(factory, hf_path, component, output, outputs, seed, update)
        return
    if output or outputs:
        raise UserError("-o and --outputs are for --module and --hf",
                        hint="a mechanism's golden set goes to --root/NAME/PRESET")
    if bool(name) == bool(all_):
        raise UserError("give NAME or --all", hint=f"mechanisms: {', '.join(mechanisms.names())}")
    for mech in mechanisms.names() if all_ else [name]:
        try:
            result = write_golden(mech, preset, root=root, update=update)
        except OSError as exc:
            where = golden_dir(mech, preset, root)
            raise UserError(
                f"could not write the golden set {where}: {exc.strerror or exc}; "
                + _golden_state(where, mech, preset), stage="golden",
                hint=f"free disk space or choose another --root, then rerun `qcexport golden "
                f"{mech}`") from exc
        state = "written" if result.written else "unchanged"
        click.echo(f"{mech} ({preset}): {len(result.cases)} cases {state} in {result.path}")
        for change in result.changes:
            click.echo(f"  {change.describe()}")


def _golden_state(directory: Path, mech: str, preset: str) -> str:
    """What a golden directory holds after a failed write, found by reading it back."""
    from qcrun.golden import load_golden

    try:
        load_golden(directory, mechanism=mech, preset=preset)
    except (UserError, OSError):
        return f"{directory} does not hold a complete golden set now (its hashes reject it)"
    return f"{directory} holds a complete golden set (its hashes check out)"


def _user_golden(factory, hf_path, component, output, outputs, seed, update) -> None:
    """`qcexport golden --module F -o DIR` / `--hf PATH --component NAME -o DIR`."""
    from qcexport.golden import write_module_golden

    if bool(factory) == bool(hf_path):
        raise UserError("give one of --module or --hf", stage="golden",
                        hint="e.g. `qcexport golden --module mypkg.models:make -o out/golden`")
    if output is None:
        raise UserError("-o DIR is needed: where the golden set goes", stage="golden",
                        hint="e.g. -o out/golden-mymodel")
    names = _name_list(outputs)
    if hf_path:
        from qcexport import hf

        label = f"{hf_path} ({component})"
        result = hf.write_golden(None, load_hf(hf_path, component), output, output_names=names,
                                 seed=seed, update=update)
    else:
        module, example, axes, cases = load_factory(factory, with_cases=True)
        label = factory
        result = write_module_golden(module, example, output, dynamic_axes=axes, cases=cases,
                                     output_names=names, seed=seed, update=update,
                                     source={"kind": "factory", "factory": factory})
    state = "written" if result.written else "unchanged"
    click.echo(f"{label}: {len(result.cases)} cases {state} in {result.path}")
    for change in result.changes:
        click.echo(f"  {change.describe()}")


def _name_list(text: str | None) -> list[str] | None:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    return names or None


def load_hf(path_or_id: str, component: str | None):
    """`--hf PATH_OR_ID --component NAME`: the component, or a UserError listing them."""
    from qcexport.hf import components, load_component

    if not component:
        raise UserError("--hf needs --component NAME", stage="load",
                        hint=f"components: {', '.join(components.names())} "
                        "(see `qcexport list --hf`)")
    return load_component(path_or_id, component)


# --- parity ----------------------------------------------------------------------------------


@main.command()
@click.argument("model")
@click.option("--targets", default=None,
              help="Comma-separated targets; each one named must run here (a target that cannot "
              "run is a failure) unless --optional names it. [default: "
              f"{','.join(DEFAULT_PARITY_TARGETS)}, each optional]")
@click.option("--preset", default="tiny", show_default=True, help="With a mechanism NAME.")
@click.option("--golden", "golden_path", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Golden set directory (default: the built-in one).")
@click.option("--optional", "optional", multiple=True, metavar="TARGETS",
              help="Targets that may be absent here: skipped with the reason instead of failing "
              "(repeatable or comma-separated). The run still fails when no case ran at all.")
@click.option("--require", multiple=True, hidden=True,
              help="Kept for old scripts: every target in --targets is required already.")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Tolerance policy file (JSON, format 1) over qcrun's built-in policy for the "
              "model's precision; a model directory's manifest never sets its tolerances.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("out/parity"), show_default=True,
              help="Where models exported for a mechanism NAME go.")
def parity(model, targets, preset, golden_path, optional, require, policy_file, json_path,
           junit_path, work_dir):
    """Replay golden cases on every target; exit 1 on any mismatch.

    MODEL is an exported model directory or a mechanism name (exported here with the golden
    set's weights, in the attention form each target prefers). Exit 1 also when a target named
    in --targets ran no case (unless --optional) and when no case ran at all.
    """
    from qcrun.parity import NOT_RUN_CODES, name_list, required_targets

    from qcexport.parity import parity_for_mechanism, parity_for_model_dir

    named = name_list(targets)
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
        _write_report(json_path, run.report.to_json())
        if run.kernel is not None:
            _write_report(json_path.with_name(json_path.stem + ".kernel.json"),
                          run.kernel.to_json())
    if junit_path:
        _write_report(junit_path, run.report.to_junit_xml())
    if not run.passed:
        if not run.report.ran():
            raise UserError(run.report.verdict_line(), stage="parity",
                            hint="see `qcrun targets` for what runs here; name a target that "
                            "runs here in --targets")
        kernel_failures = run.kernel.failures() if run.kernel else []
        failed = sorted({f"{r.target}/{r.output or 'all outputs'}"
                         for r in run.report.failures()}
                        | {f"{r.target}/{r.output} (kernel)" for r in kernel_failures})
        unavailable = [r for r in run.report.failures() if r.code in NOT_RUN_CODES]
        raise UserError(f"parity failed: {', '.join(failed) or 'eager drift'}",
                        stage="parity",
                        hint="see the failures listed above" + (
                            "; a target that cannot run here is required unless you pass "
                            "--optional TARGET" if unavailable else ""))


def _write_report(path: Path, text: str) -> None:
    """A report file, atomically; a full disk is a clean error that leaves the old file."""
    from qcexport.export.save import write_bytes_atomic

    try:
        write_bytes_atomic(path, text.encode())
    except OSError as exc:
        raise UserError(f"could not write {path}: {exc.strerror or exc}; {path} is unchanged",
                        stage="report", hint="free disk space or choose another path") from exc


from qcexport.commands.inspect import inspect as _inspect  # noqa: E402

main.add_command(_inspect)

from qcexport.commands.profile import profile as _profile  # noqa: E402

main.add_command(_profile)

from qcexport.commands.bundle import bundle as _bundle  # noqa: E402
from qcexport.commands.bundle import keygen as _keygen  # noqa: E402

main.add_command(_bundle)
main.add_command(_keygen)


if __name__ == "__main__":
    main()

"""``qcexport convert``: export a mechanism, your own module or a Hugging Face component to
ONNX, lowered, simplified, checked and verified (then quantized with --precision)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click
from qcrun.clikit import json_flag_option
from qcrun.errors import UserError
from qcrun.targets import target_names

from qcexport.commands.ir import check_ir_flag, ir_flag, write_ir_reported
from qcexport.commands.quantize import report_quantized
from qcexport.commands.sources import load_factory, load_hf, output_names

ATTENTION_CHOICES = ("auto", "onnx", "ort", "decomposed")


@click.command("convert")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Convert every registered mechanism.")
@click.option("--module", "factory", metavar="PKG.MOD:FACTORY",
              help="Convert your own module: FACTORY() returns (module, example_inputs, "
              "dynamic_axes).")
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
@json_flag_option("Print the result as JSON only.")
@click.option("--with-attention-maps", "with_maps", is_flag=True,
              help="Also output every layer's cross-attention maps (and gate diagnostics), for "
              "`qcexport inspect` and `qcrun inspect`; the regular outputs are unchanged.")
@click.option("--map-heads", type=click.Choice(["mean", "each"]), default="mean",
              show_default=True,
              help="With --with-attention-maps: averaged over heads or per head.")
@click.option("--outputs", "outputs", default=None, metavar="A,B",
              help="With --module: keep only these outputs (by path name, e.g. "
              "last_hidden_state,hidden_states.3; default: every tensor the module returns).")
@click.option("--hf", "hf_path", metavar="PATH_OR_ID",
              help="Convert a Hugging Face component (with --component) from a save_pretrained "
              "directory or hub id.")
@click.option("--component", default=None,
              help="With --hf: the component to take (qcexport list --hf).")
@click.option("--split", "split", type=click.Choice(["context"]), default=None,
              help="Also write context.onnx (the image side, run once per image) and query.onnx "
              "(run per query), verified against the model and eager.")
@click.option("--context-inputs", "context_inputs", default=None, metavar="A,B",
              help="With --split: the image-side inputs (default: the mechanism's or "
              "component's; needed for --module).")
@ir_flag()
def convert(name, all_, factory, preset, target, attention, opset, precision, output, as_json,
            with_maps, map_heads, outputs, hf_path, component, split, context_inputs, with_ir):
    """Export NAME (or --all, --module, --hf) to ONNX, lowered, simplified, checked, verified."""
    _check_arguments(name, all_, factory, hf_path, component, target, attention, precision,
                     with_maps, outputs)
    if context_inputs and not split:
        raise UserError("--context-inputs goes with --split context",
                        hint="add --split context, or drop --context-inputs")
    if with_ir:
        check_ir_flag(precision)
    progress = None if as_json else _progress
    failures: list[str] = []
    if factory or hf_path:
        results = [_convert_custom(factory, hf_path, component, target, attention, opset,
                                   precision, output, outputs, as_json, progress)]
    else:
        results, failures = _convert_mechanisms(name, all_, preset, target, attention, opset,
                                                precision, output, as_json, with_maps,
                                                map_heads, progress)
    if split:
        for summary in results:
            summary["split"] = _split(summary["path"], context_inputs, target, as_json)
    if with_ir:  # the final model: the reduced one when --precision made one
        for summary in results:
            final = Path(summary.get("precision", summary)["path"])
            summary["ir"] = write_ir_reported(final if final.is_dir() else final.parent,
                                              as_json)
    if as_json:
        click.echo(json.dumps(results if all_ else results[0] if results else {}, indent=2))
    if failures:
        click.echo(f"\n{len(failures)} of {len(failures) + len(results)} conversions failed:",
                   err=True)
        for f in failures:
            click.echo(f"  {f.splitlines()[0]}", err=True)
        sys.exit(1)
    if all_ and not as_json:
        click.echo(f"\nall {len(results)} mechanisms converted and verified")


def _check_arguments(name, all_, factory, hf_path, component, target, attention, precision,
                     with_maps, outputs) -> None:
    """Every contradiction or unknown choice, as a clean error before any work."""
    from qcrun.errors import unknown_choice

    from qcexport import mechanisms
    from qcexport.optimize import PRECISIONS, check_target_precision

    chosen = sum(bool(x) for x in (name, all_, factory, hf_path))
    if chosen != 1:
        raise UserError("give exactly one of NAME, --all, --module or --hf",
                        hint="e.g. `qcexport convert qformer`; mechanisms: "
                        f"{', '.join(mechanisms.names())}")
    if attention not in ATTENTION_CHOICES:
        raise unknown_choice("attention form", attention, ATTENTION_CHOICES, flag="--attention")
    if precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS, flag="--precision")
    check_target_precision(target, precision)
    custom = factory or hf_path
    if component and not hf_path:
        raise UserError("--component goes with --hf", hint="e.g. --hf DIR --component qformer")
    if custom and with_maps:
        raise UserError("--with-attention-maps works with the built-in mechanisms, not --module",
                        hint="drop --with-attention-maps, or return maps as outputs of your module")
    if outputs and not custom:
        raise UserError("--outputs selects outputs of your own module (--module)",
                        hint="drop --outputs; a mechanism's outputs come from its spec")


def _convert_custom(factory, hf_path, component, target, attention, opset, precision, output,
                    outputs, as_json, progress) -> dict[str, Any]:
    """``--module`` or ``--hf``: one conversion, then the reduced precision if asked for."""
    from qcexport.export import convert as convert_module
    from qcexport.optimize import at_precision

    out = Path(output or (f"out/{component}" if hf_path else "out/custom"))
    options = dict(target=target, attention=attention, opset=opset, on_stage=progress,
                   output_names=output_names(outputs))
    if hf_path:
        from qcexport import hf

        comp = load_hf(hf_path, component)
        _header(f"{hf_path} ({component}) -> {out}", as_json)

        def fp32(directory):
            return hf.convert(None, comp, output_dir=directory, **options)
    else:
        module, example, axes = load_factory(factory)
        _header(f"{factory} -> {out}", as_json)

        def fp32(directory):
            return convert_module(module, example, axes, output_dir=directory, **options,
                                  metadata={"mechanism": "custom", "factory": factory})
    return _summary(at_precision(fp32, precision, out, target=target), as_json)


def _convert_mechanisms(name, all_, preset, target, attention, opset, precision, output,
                        as_json, with_maps, map_heads,
                        progress) -> tuple[list[dict[str, Any]], list[str]]:
    """NAME or --all: the summaries and, with --all, the mechanisms that failed (reported
    as they fail; the others go on)."""
    from qcexport import mechanisms
    from qcexport.export import convert_mechanism
    from qcexport.optimize import at_precision

    results: list[dict[str, Any]] = []
    failures: list[str] = []
    names = mechanisms.names() if all_ else [name]
    mechanisms.get(names[0])  # unknown name: clean error before any work
    for mech in names:
        out = (Path(output) / f"{mech}-{preset}" if all_ and output else
               Path(output) if output else Path("out") / f"{mech}-{preset}")
        _header(f"{mech} ({preset}) -> {out}", as_json)

        def fp32(directory, mech=mech):
            return convert_mechanism(mech, preset, target=target, attention=attention,
                                     opset=opset, on_stage=progress, precision=precision,
                                     with_attention_maps=with_maps,
                                     attention_map_heads=map_heads, output_dir=directory)
        try:
            summary = _summary(at_precision(fp32, precision, out, target=target), as_json)
        except UserError as exc:
            if not all_:
                raise
            failures.append(f"{mech}: {exc}")
            click.echo(f"error: {mech}: {exc}", err=True)
            continue
        results.append(summary)
    return results, failures


def _split(path: str, context_inputs: str | None, target: str, as_json: bool) -> dict[str, Any]:
    """``--split context`` on a converted model directory: the cut, verified, in its manifest."""
    from qcexport.split.model_dir import split_model_dir

    names = [n.strip() for n in context_inputs.split(",") if n.strip()] if context_inputs \
        else None
    model_dir = Path(path).parent if path.endswith(".onnx") else Path(path)
    result = split_model_dir(model_dir, names, target=target)
    boundary = [f"{b.name}{b.shape}" for b in result.cut.boundary]
    if not as_json:
        click.echo(f"  split     context.onnx ({result.context_nodes} nodes, inputs "
                   f"{', '.join(result.cut.context_inputs)}) -> {', '.join(boundary)} -> "
                   f"query.onnx ({result.query_nodes} nodes)")
        click.echo(f"  verify    pair: {len(result.checks)} checks passed (against the single "
                   "graph, and eager on the golden cases)")
    return {"context_inputs": result.cut.context_inputs, "boundary": boundary,
            "context_nodes": result.context_nodes, "query_nodes": result.query_nodes,
            "checks": len(result.checks), "passed": result.passed}


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
        return _with_reduced(data, result, as_json)
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
    return _with_reduced(data, result, as_json)


def _with_reduced(data: dict[str, Any], result, as_json: bool) -> dict[str, Any]:
    """The summary of the reduced-precision model made after the conversion, if any."""
    if result.reduced is not None:
        data["precision"] = report_quantized(result.reduced, result.reduced.manifest["precision"],
                                             as_json)
    return data

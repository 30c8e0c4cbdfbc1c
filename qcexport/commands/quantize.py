"""``qcexport quantize``: a reduced-precision copy of an exported fp32 model, measured against
it. ``quantize_and_report`` is also the last stage of ``convert --precision``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from qcrun.clikit import json_flag_option, output_option, policy_option
from qcrun.errors import UserError

from qcexport.commands.ir import check_ir_flag, ir_flag, write_ir_reported


@click.command("quantize")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--precision", required=True,
              help="fp16, int8-dynamic, int8-static, bf16 (OpenVINO CPU computes the fp32 "
              "graph in bf16) or int8-nncf (NNCF, OpenVINO IR; needs qcexport[nncf]).")
@click.option("--accuracy-control", is_flag=True,
              help="int8-nncf: return operations to float until every evaluation case is "
              "within the int8-nncf tolerance policy (nncf.quantize_with_accuracy_control).")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False, path_type=Path),
              help="int8-static: .npz with one array per input, samples on axis 0.")
@click.option("--calibration-cases", default=16, show_default=True,
              help="int8-static without a file: seeded cases from the mechanism's input factory.")
@click.option("--method", default="minmax", show_default=True,
              help="int8-static calibration: minmax, percentile or entropy.")
@click.option("--exclude-nodes", default="", help="Comma-separated node names kept in float.")
@click.option("--exclude-modules", default="",
              help="Comma-separated PyTorch module names (e.g. layers.0.ff) kept in float.")
@click.option("--auto-exclude", is_flag=True,
              help="int8-static/int8-dynamic: keep the module that adds the most error in float, "
              "re-quantize and re-measure on the target until the final outputs meet the "
              "precision policy; reports what stayed in float and its latency cost.")
@click.option("--exclusion-budget", default=4, show_default=True, type=click.IntRange(min=0),
              help="--auto-exclude: the most modules kept in float before giving up.")
@policy_option("Tolerance policy file (JSON, format 1) the reduced model is held to against "
               "fp32, over qcrun's built-in policy (e.g. int8-static min_cosine 0.999).")
@output_option("Output directory (default: MODEL_DIR-PRECISION).", file_okay=False)
@json_flag_option(None)
@ir_flag()
def quantize(model_dir, precision, accuracy_control, calibration_file, calibration_cases, method,
             exclude_nodes, exclude_modules, auto_exclude, exclusion_budget, policy_file, output,
             as_json, with_ir):
    """Make a reduced-precision copy of an exported fp32 model, measured against it."""
    if with_ir:
        check_ir_flag(precision)
    if calibration_cases < 1:
        raise UserError(f"--calibration-cases must be at least 1, not {calibration_cases}")
    out = output or model_dir.parent / f"{model_dir.name}-{precision}"
    data = quantize_and_report(model_dir, precision, out, as_json,
                               calibration_file=calibration_file,
                               calibration_cases=calibration_cases, method=method,
                               exclude_nodes=[n for n in exclude_nodes.split(",") if n],
                               exclude_modules=[m for m in exclude_modules.split(",") if m],
                               **({"accuracy_control": True} if accuracy_control else {}),
                               **({"auto_exclude": True, "exclusion_budget": exclusion_budget}
                                  if auto_exclude else {}),
                               **({"policy_file": policy_file} if policy_file else {}))
    if with_ir:
        data["ir"] = write_ir_reported(Path(out), as_json)
    if as_json:
        click.echo(json.dumps(data, indent=2))


def quantize_and_report(fp32_dir: Path, precision: str, out: Path, as_json: bool,
                        **options) -> dict[str, Any]:
    """The optimize stage after a convert, or on its own (`quantize`): prints the loss."""
    from qcexport.optimize import quantize_model_dir

    return report_quantized(quantize_model_dir(fp32_dir, precision, out, **options), precision,
                            as_json)


def report_quantized(result, precision: str, as_json: bool) -> dict[str, Any]:
    """What ``quantize`` (or ``convert --precision``) made: printed, and as data."""
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
        click.echo(f"  matmuls   quantized {c['quantized']['top']} "
                   f"(+{c['quantized']['branches']} in branches), float {c['float']['top']} "
                   f"(+{c['float']['branches']} in branches)")
    if result.manifest.get("calibration"):
        cal = result.manifest["calibration"]
        click.echo(f"  calib     {cal['count']} samples from {cal['source']} "
                   f"(sha256 {cal['sha256'][:12]})")
    if q.get("auto_exclude"):
        from qcexport.optimize.auto_exclude import summary_lines

        click.echo("\n".join(summary_lines(q["auto_exclude"])))
    worst = max(result.loss, key=lambda r: r.max_abs)
    click.echo(f"  vs fp32   {len(result.loss)} outputs within policy; worst {worst.case}/"
               f"{worst.output}: max abs {worst.max_abs:.3g}, min cosine "
               f"{min(r.cosine for r in result.loss):.6f}")
    return data

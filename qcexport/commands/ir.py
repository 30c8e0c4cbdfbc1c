"""``qcexport ir``: OpenVINO IR beside an exported model's ONNX (also ``convert --ir`` and
``quantize --ir``, which end with the same step)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from qcrun.clikit import json_flag_option
from qcrun.errors import UserError

#: The help of ``convert --ir`` / ``quantize --ir``.
IR_FLAG_HELP = ("Also write OpenVINO IR (model.xml + model.bin) beside the model's ONNX, as "
                "`qcexport ir` does: OpenVINO targets then read it instead of converting the "
                "ONNX at every load.")


def ir_flag():
    return click.option("--ir", "with_ir", is_flag=True, help=IR_FLAG_HELP)


def check_ir_flag(precision: str) -> None:
    """``--ir`` with a precision whose model is IR already: a clean error before any work."""
    if precision == "int8-nncf":
        raise UserError("--ir: an int8-nncf model is OpenVINO IR already (NNCF writes it)",
                        hint="drop --ir")


def write_ir_reported(model_dir: Path, as_json: bool) -> dict[str, Any]:
    """Write IR beside ``model_dir``'s ONNX (``qcexport.ir.write_ir``); print what was
    written unless ``as_json``; return the manifest's IR entry."""
    from qcrun.schema import dump

    from qcexport.ir import write_ir

    model = write_ir(model_dir)
    entry = dump(model.manifest.ir)
    if not as_json:
        click.echo(f"  ir        {model_dir / entry['xml']}  + {entry['bin']}  "
                   f"(OpenVINO {entry['openvino']}, {model.precision}, weights as in model.onnx)")
        click.echo(f"  sha256    {entry['xml_sha256'][:16]}... / {entry['bin_sha256'][:16]}...")
    return entry


@click.command("ir")
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@json_flag_option("Print the manifest's IR entry as JSON only.")
def ir(model_dir: Path, as_json: bool):
    """Write OpenVINO IR (model.xml + model.bin) beside MODEL_DIR/model.onnx.

    OpenVINO targets (parity, profile, bundle, inspect, qcrun.load) then read the IR instead
    of converting the ONNX at every load; onnxruntime keeps reading model.onnx. Weights are
    stored as the ONNX stores them (an fp32 model stays fp32: no fp16 compression), and the
    manifest records both files' sha256.
    """
    entry = write_ir_reported(model_dir, as_json)
    if as_json:
        click.echo(json.dumps(entry, indent=2))

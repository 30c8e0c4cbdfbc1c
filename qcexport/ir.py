"""The IR stage: OpenVINO IR (``model.xml`` + ``model.bin``) written beside a model's ONNX.

    write_ir("out/qformer-base")   # -> out/qformer-base/model.xml, model.bin; manifest.ir

OpenVINO then reads the IR on its targets (``qcrun.ir.ModelFiles``) instead of parsing and
converting the ONNX graph at every load. ``openvino.save_model`` compresses weights to fp16 by
default; the IR is written with ``compress_to_fp16=False`` so that it stores what the ONNX
stores (an fp32 model stays fp32), and the IR's own layers are read back to prove it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
from pathlib import Path

from qcrun.errors import UserError, import_engine
from qcrun.files import ModelDir, manifest_json, read_model_dir, write_atomic
from qcrun.golden import file_sha256
from qcrun.ir import IR_BIN, IR_XML, expected_ir_precision, ir_precision
from qcrun.schema import dump


def ir_from_onnx(onnx_path: Path, out_dir: Path) -> tuple[Path, Path]:
    """Convert ``onnx_path`` to IR files ``out_dir/model.xml`` + ``model.bin`` (weights as
    stored: no fp16 compression)."""
    ov = import_engine("openvino")
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(out_dir / IR_XML), compress_to_fp16=False)
    except Exception as e:  # the converter's own words are the reason
        raise UserError(f"OpenVINO could not convert {onnx_path} to IR: "
                        f"{' '.join(str(e).split())}", stage="ir",
                        hint="check that openvino-cpu runs the ONNX model (`qcexport parity "
                        "MODEL_DIR --targets openvino-cpu`)") from None
    return out_dir / IR_XML, out_dir / IR_BIN


def write_ir(model_dir: str | Path) -> ModelDir:
    """Write IR beside ``model_dir``'s model.onnx and record it (hashes, source, OpenVINO
    version) in its manifest; returns the checked directory. IR written before by this tool
    (the manifest lists it) is replaced; a model.xml / model.bin the manifest does not list is
    the user's, and is refused, never overwritten."""
    model_dir = Path(model_dir)
    model = read_model_dir(model_dir, stage="ir")
    if model.onnx is None:
        raise UserError(f"{model_dir} holds only OpenVINO IR: there is no ONNX to convert",
                        stage="ir", hint="it is ready for OpenVINO targets as it is")
    if model.manifest.ir is None:
        theirs = [n for n in (IR_XML, IR_BIN) if (model_dir / n).exists()]
        if theirs:
            raise UserError(f"{model_dir} holds {', '.join(theirs)}, which its manifest does "
                            "not list: refusing to overwrite them", stage="ir",
                            hint="move them away (qcexport replaces only IR it wrote)")
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".qcexport-ir-") as tmp:
        xml, weights = ir_from_onnx(model.onnx, Path(tmp))
        stored, wanted = ir_precision(xml), expected_ir_precision(model.precision)
        if stored != wanted:  # a converter default changed: never record a silent cast
            raise UserError(f"the IR OpenVINO wrote stores {stored}, but the model is "
                            f"{model.precision}", stage="ir",
                            hint="report this with the OpenVINO version; nothing was written")
        manifest = dump(model.manifest)
        manifest["ir"] = {
            "xml": IR_XML, "xml_sha256": file_sha256(xml),
            "bin": IR_BIN, "bin_sha256": file_sha256(weights),
            "source_sha256": model.manifest.model_sha256,
            "openvino": _version("openvino"),
        }
        text = manifest_json(manifest)
        for path in (xml, weights):
            os.chmod(path, 0o644)
            os.replace(path, model_dir / path.name)
    # The manifest is written last: until then the old one stands, and lists no IR or the
    # previous one (whose hashes the new files no longer match, so a crash here is caught).
    write_atomic(model_dir / "manifest.json", text)
    return read_model_dir(model_dir, stage="ir")


def _version(dist: str) -> str | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(dist)
    return None

"""Host entry points: localise an exported model directory against eager, another target,
or the fp32 model it was reduced from."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from qcrun.errors import UserError
from qcrun.files import read_model_dir
from qcrun.golden import GoldenSet, file_sha256, load_golden
from qcrun.localize import (
    CHUNK_BYTES,
    Case,
    LocalizeReport,
    Workspace,
    localize_precision,
    localize_with,
)
from qcrun.parity import policy_for
from qcrun.targets import get_target

from qcexport.golden import golden_path

EAGER = "eager"
FP32 = "fp32"


def _golden_for(model, golden: Path | None) -> GoldenSet:
    manifest = model.manifest
    path = golden_path(manifest.mechanism, manifest.preset, golden)
    if path is None:
        raise UserError(f"{model.path} holds a custom module: there is no built-in golden set",
                        stage="localize", hint="pass --golden DIR")
    gset = load_golden(path, mechanism=manifest.mechanism if manifest.builtin else None,
                       preset=manifest.preset)
    model.check_weights(gset)
    return gset


def _cases(gset: GoldenSet, names: Sequence[str] = (), *, with_outputs: bool) -> list[Case]:
    chosen = [c for c in gset.cases if not names or c.name in names]
    unknown = sorted(set(names) - {c.name for c in gset.cases})
    if unknown:
        raise UserError(f"no case {', '.join(unknown)} in {gset.path}", stage="localize",
                        hint=f"cases: {', '.join(c.name for c in gset.cases)}")
    return [Case(c.name, c.inputs, c.outputs if with_outputs else None) for c in chosen]


def localize_model_dir(model_dir: Path, targets: Sequence[str], *, against: str = EAGER,
                       golden: Path | None = None, policy_file: Path | None = None,
                       cases: Sequence[str] = (), fp32_model: Path | None = None,
                       chunk_bytes: int = CHUNK_BYTES, force_bisection: Sequence[str] = (),
                       all_cases: bool = False) -> LocalizeReport:
    """Localise ``model_dir`` on ``targets``.

    ``against``: ``eager`` (the golden set's PyTorch module, forward hooks; the precision's
    policy), a target name (two runtimes on the same model; the kernel policy) or ``fp32``
    (quantization against kernel error: the model against its fp32 model, both on
    onnx-reference, and each runtime against onnx-reference on the model itself). The first
    failing golden case is localised per target, every failing one with ``all_cases``."""
    model = read_model_dir(model_dir, stage="localize")
    gset = _golden_for(model, golden)
    names = [get_target(t).name for t in targets]
    run_cases = _cases(gset, cases, with_outputs=against == EAGER)
    options = {"chunk_bytes": chunk_bytes, "force_bisection": force_bisection,
               "all_cases": all_cases}
    policy = policy_for(model.precision, policy_file=policy_file)
    if against == FP32:
        fp32 = _fp32_file(model, fp32_model)
        with tempfile.TemporaryDirectory(prefix="qcexport-localize-") as scratch:
            space = Workspace(model.model, Path(scratch) / "model")
            return localize_precision(space, fp32, names, run_cases, model.precision, policy,
                                      Path(scratch) / "fp32", **options)
    reference = _eager(model, gset, run_cases) if against == EAGER else against
    return localize_with(model.model, names, run_cases, reference, policy, model.precision,
                         **options)


def _eager(model, gset: GoldenSet, run_cases: Sequence[Case]):
    from qcexport.export.mechanism import module_from_golden
    from qcexport.hooks import EagerReference

    if not model.manifest.builtin:
        raise UserError("--against eager needs a built-in mechanism's model",
                        stage="localize", hint="use --against TARGET")
    return EagerReference(module_from_golden(gset), {c.name: c.inputs for c in run_cases})


def _fp32_file(model, fp32_model: Path | None) -> Path:
    """The fp32 model file: ``--fp32 DIR``, else the source the manifest records (when it is
    still there, unchanged)."""
    if fp32_model is not None:
        return read_model_dir(fp32_model, stage="localize").model
    source = model.manifest.source_model
    hint = "pass --fp32 DIR (the model directory it was reduced from)"
    if source is None:
        raise UserError(f"{model.path}: the manifest names no fp32 source model",
                        stage="localize", hint=hint)
    path = Path(source.path)
    if not path.is_file() or file_sha256(path) != source.sha256:
        raise UserError(f"the fp32 source {path} recorded in {model.path} is missing or "
                        "changed since the model was reduced", stage="localize", hint=hint)
    return path


def write_report(report: LocalizeReport, path: Path) -> None:
    """The report as JSON (``.json``), Markdown (``.md``) or offline HTML (``.html``),
    atomically."""
    from qcrun.clikit import write_report as write
    from qcrun.localize import format_table, render_html

    suffix = Path(path).suffix.lower()
    renderers = {".json": report.to_json, ".md": lambda: format_table(report, markdown=True),
                 ".html": lambda: render_html(report)}
    if suffix not in renderers:
        raise UserError(f"cannot tell the report format of {path}", stage="localize",
                        hint="end the file name in .json, .md or .html")
    write(Path(path), renderers[suffix]())

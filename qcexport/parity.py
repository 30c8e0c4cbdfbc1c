"""The parity matrix on the host: golden sets replayed on every requested target.

The comparing and the records are qcrun's (the code a device runs); this module only decides
which model each target gets. Given an exported model directory, every target runs that model
(a target that does not accept its attention form is skipped with the reason). Given a
mechanism name, the reference module is rebuilt with the golden set's weights and exported
once per attention form that the available targets prefer, so each target is checked on the
graph it would really be given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qcrun.context import split_parity
from qcrun.engines import availability
from qcrun.errors import UserError
from qcrun.files import read_model_dir
from qcrun.golden import load_golden
from qcrun.parity import (
    ParityReport,
    environment,
    kernel_parity,
    policy_for,
    required_targets,
    run_parity,
)
from qcrun.targets import get_target

from qcexport import mechanisms
from qcexport.export.mechanism import rebuild_from_golden
from qcexport.export.pipeline import MODEL_FILE
from qcexport.golden import eager_drift, golden_path


@dataclass
class ParityRun:
    report: ParityReport
    drift: list[str]  # golden outputs PyTorch eager no longer reproduces (name mode)
    models: dict[str, str]  # attention form -> model path used
    # reduced precision: each runtime vs onnx-reference on the same model (kernel error)
    kernel: ParityReport | None = None

    @property
    def passed(self) -> bool:
        return self.report.passed and not self.drift and (self.kernel is None or self.kernel.passed)


def read_model_manifest(model_dir: Path):
    """The checked model directory (``qcrun.files.ModelDir``): paths, hashes, precision."""
    return read_model_dir(model_dir, stage="parity")


def parity_for_model_dir(
    model_dir: Path, targets: list[str], *, golden: Path | None = None, require=(), optional=(),
    policy_file: Path | None = None,
) -> ParityRun:
    """Every target runs the exported model; each one named must run unless ``optional``.

    The tolerances are qcrun's built-in policy for the precision the graph has, or
    ``policy_file``; never the model directory's own (the artifact under test)."""
    model = read_model_manifest(model_dir)
    manifest = model.manifest
    name, preset = manifest.mechanism, manifest.preset
    golden = golden_path(name, preset, golden)
    if golden is None:
        raise UserError(f"{model_dir} holds a custom module: there is no built-in golden set",
                        stage="parity", hint="pass --golden DIR")
    gset = load_golden(golden, mechanism=name if manifest.builtin else None, preset=preset)
    model.check_weights(gset)
    policy = policy_for(model.precision, policy_file=policy_file)
    precision = model.precision
    report = run_parity(model.model_files(), gset, targets, policy, precision,
                        require=required_targets(targets, optional, require), optional=optional,
                        attention_form=manifest.attention)
    if manifest.split is not None:  # the context and query graphs, where the single one ran
        ran = [t for t in report.targets if any(r.target == t and r.verdict != "skip"
                                                for r in report.records)]
        report.records += split_parity(model, gset, ran, policy, precision)
    kernel = None
    if precision != "fp32":
        kernel = kernel_parity(model.model, gset, targets, precision,
                               attention_form=manifest.attention)
    return ParityRun(report, [], {manifest.attention or "?": str(model.model)}, kernel)


def parity_for_mechanism(
    name: str, preset: str, targets: list[str], *, work_dir: Path,
    golden: Path | None = None, require=(), optional=(), policy_file: Path | None = None,
) -> ParityRun:
    """Each target runs the module exported in the form it prefers; each one named must run
    unless ``optional``."""
    mechanisms.get(name)  # neither a model directory nor a mechanism: list the valid names
    gset = load_golden(golden_path(name, preset, golden), mechanism=name, preset=preset)
    drift = eager_drift(gset)
    profiles = [get_target(t) for t in targets]
    required = required_targets(targets, optional, require)
    policy = policy_for("fp32", policy_file=policy_file)  # read before any export
    by_form: dict[str, list[str]] = {}
    unavailable = []
    for target in profiles:
        ok, _ = availability(target)
        if ok:
            by_form.setdefault(target.attention_forms[0], []).append(target.name)
        else:
            unavailable.append(target.name)
    models: dict[str, str] = {}
    for form, names in by_form.items():
        models[form] = str(rebuild_from_golden(gset, form, names[0],
                                               work_dir / f"{name}-{preset}-{form}").path)
    records = []
    for form, names in by_form.items():
        records += run_parity(models[form], gset, names, policy,
                              require=_among(required, names), attention_form=form).records
    if unavailable:
        any_model = next(iter(models.values()), "")
        records += run_parity(any_model or work_dir / MODEL_FILE, gset, unavailable, policy,
                              require=_among(required, unavailable)).records
    order = {t.name: i for i, t in enumerate(profiles)}
    records.sort(key=lambda r: order.get(r.target, len(order)))
    report = ParityReport(
        records=records,
        model=", ".join(f"{form}: {path}" for form, path in models.items()),
        golden=f"{gset.path} ({gset.mechanism}/{gset.preset})",
        precision="fp32",
        targets=[t.name for t in profiles],
        required=required,
        environment=environment(),
        optional=[t.name for t in profiles if t.name not in required],
    )
    return ParityRun(report, drift, models)


def _among(required: list[str], names: list[str]) -> list[str]:
    return [n for n in required if n in names]

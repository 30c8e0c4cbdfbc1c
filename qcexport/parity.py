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

from qcrun.errors import UserError
from qcrun.files import read_model_dir
from qcrun.golden import GoldenSet, load_golden
from qcrun.parity import ParityReport, TolerancePolicy, environment, kernel_parity, run_parity
from qcrun.targets import availability, get_target

from qcexport import mechanisms
from qcexport.export.pipeline import MODEL_FILE, convert
from qcexport.golden import eager_drift, golden_dir, module_from_golden


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


def read_model_manifest(model_dir: Path) -> dict:
    return read_model_dir(model_dir, stage="parity")


def parity_for_model_dir(
    model_dir: Path, targets: list[str], *, golden: Path | None = None, require=()
) -> ParityRun:
    manifest = read_model_manifest(model_dir)
    name, preset = manifest.get("mechanism"), manifest.get("preset")
    if golden is None:
        if name not in mechanisms.names() or not preset:
            raise UserError(f"{model_dir} holds a custom module: there is no built-in golden set",
                            stage="parity", hint="pass --golden DIR")
        golden = golden_dir(name, preset)
    gset = load_golden(golden, mechanism=name if name != "custom" else None, preset=preset)
    policy = TolerancePolicy.from_dict(manifest.get("tolerances") or {})
    precision = manifest.get("precision", "fp32")
    report = run_parity(model_dir / MODEL_FILE, gset, targets, policy, precision, require=require,
                        attention_form=manifest.get("attention"))
    kernel = None
    if precision != "fp32":
        kernel = kernel_parity(model_dir / MODEL_FILE, gset, targets, precision,
                               attention_form=manifest.get("attention"))
    return ParityRun(report, [], {manifest.get("attention", "?"): str(model_dir / MODEL_FILE)},
                     kernel)


def parity_for_mechanism(
    name: str, preset: str, targets: list[str], *, work_dir: Path,
    golden: Path | None = None, require=(),
) -> ParityRun:
    mechanisms.get(name)  # neither a model directory nor a mechanism: list the valid names
    gset = load_golden(golden or golden_dir(name, preset), mechanism=name, preset=preset)
    drift = eager_drift(gset)
    profiles = [get_target(t) for t in targets]
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
        models[form] = str(_export(gset, form, names[0], work_dir / f"{name}-{preset}-{form}"))
    records = []
    for form, names in by_form.items():
        records += run_parity(models[form], gset, names, require=require, attention_form=form).records
    if unavailable:
        any_model = next(iter(models.values()), "")
        records += run_parity(any_model or work_dir / MODEL_FILE, gset, unavailable,
                              require=require).records
    order = {t.name: i for i, t in enumerate(profiles)}
    records.sort(key=lambda r: order.get(r.target, len(order)))
    report = ParityReport(
        records=records,
        model=", ".join(f"{form}: {path}" for form, path in models.items()),
        golden=f"{gset.path} ({gset.mechanism}/{gset.preset})",
        precision="fp32",
        targets=[t.name for t in profiles],
        required=list(require),
        environment=environment(),
    )
    return ParityRun(report, drift, models)


def _export(gset: GoldenSet, form: str, target: str, out: Path) -> Path:
    """Export the golden set's module (its weights) in ``form``; verification included."""
    spec = mechanisms.get(gset.mechanism)
    config = spec.config_cls(**gset.manifest["config"])
    module = module_from_golden(gset)
    result = convert(
        module,
        spec.inputs(config, spec.export_case, seed=0),
        spec.dynamic_axes,
        output_names=spec.output_names,
        target=target,
        attention=form,
        output_dir=out,
        verify_inputs=[("export_shape", spec.inputs(config, spec.export_case, seed=1)),
                       ("verify_shape", spec.inputs(config, spec.verify_case, seed=2))],
        metadata={"mechanism": gset.mechanism, "preset": gset.preset,
                  "config": gset.manifest["config"], "golden": str(gset.path.resolve())},
    )
    return result.path

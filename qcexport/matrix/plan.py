"""The plan of a parity/latency matrix: cells (model x precision x target), the bundle each
runs and the commands a device runs for it.

A cell id (``qformer-tiny.fp32.ort-cpu``) is made from its model, precision and target only,
so the same matrix planned again gives the same ids: a device result names its cell, and the
merge finds it in the plan. Targets that read the same model (same attention form and opset,
no TensorRT shape ranges) share one bundle per model and precision, so the three CPU targets
cost one build. The plan is deterministic (no timestamps): regenerating it with the same
options gives the same file, which the generated workflow checks by its sha256.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from qcrun.cell import CELL_ID, CHECKS
from qcrun.choices import PRECISIONS
from qcrun.errors import UserError, unknown_choice
from qcrun.files import MANIFEST_FILE, read_model_dir, write_atomic
from qcrun.parity import name_list
from qcrun.schema import dump, parse, read_json
from qcrun.targets import get_target

FORMAT = 1
KIND = "qcexport-matrix-plan"
DEFAULT_PRESET = "tiny"
DEFAULT_PROFILE_RUNS = 50
#: Where bundles and results lie, relative to the working directory of every job.
BUNDLES_DIR = "bundles"
RESULTS_DIR = "results"


@dataclass(frozen=True)
class Runner:
    """Where a target's cells run in CI and what a fresh runner installs there. ``runs_on``
    are GitHub Actions ``runs-on`` labels; GitLab tags are the same labels less the
    GitHub-only ones."""

    runs_on: tuple[str, ...]
    extra: str | None  # the qcrun extra with the target's engine; None: the runner has it


#: One row per target: hosted runners for the CPU targets, labelled self-hosted runners for
#: the rest (the labels a project gives its device runners; ``--runner`` overrides a row).
#: Jetson boards get onnxruntime-gpu from JetPack (Jetson Zoo), not from PyPI.
RUNNERS: Mapping[str, Runner] = {
    "ort-cpu": Runner(("ubuntu-latest",), "ort"),
    "openvino-cpu": Runner(("ubuntu-latest",), "openvino"),
    "onnx-reference": Runner(("ubuntu-latest",), "reference"),
    "ort-cuda": Runner(("self-hosted", "cuda"), "ort-gpu"),
    "ort-tensorrt": Runner(("self-hosted", "tensorrt"), "ort-gpu"),
    "openvino-gpu": Runner(("self-hosted", "intel-gpu"), "openvino"),
    "jetson-orin": Runner(("self-hosted", "jetson-orin"), None),
}
#: The runner of a target missing from the table.
DEFAULT_RUNNER = Runner(("self-hosted",), None)


@dataclass(frozen=True)
class ModelRef:
    """A model of the matrix: a built-in mechanism at a preset, or a model directory."""

    id: str
    mechanism: str | None = None
    preset: str | None = None
    path: str | None = None
    golden: str | None = None  # a model directory's golden set (a built-in has its own)

    def describe(self) -> str:
        return f"{self.mechanism} ({self.preset})" if self.mechanism else f"{self.path}"


@dataclass(frozen=True)
class PlannedBundle:
    """A bundle the build makes: ``bundles_dir/path``, made for ``target``."""

    id: str
    model: str
    precision: str
    target: str
    path: str
    targets: list[str] = field(default_factory=list)  # the cells' targets it serves


@dataclass(frozen=True)
class Cell:
    id: str
    model: str
    precision: str
    target: str
    bundle: str
    required: bool
    checks: list[Literal["verify", "profile"]]
    runs_on: list[str]
    setup: str  # what a fresh runner installs
    commands: list[list[str]]  # argv, run from the working directory (bundles/, results/)

    def result_path(self, results_dir: str, check: str) -> str:
        return f"{results_dir}/{self.id}.{check}.json"


@dataclass(frozen=True)
class MatrixPlan:
    """``plan.json``: every cell, the bundles they need and how CI sets up each runner."""

    VERSION_KEY: ClassVar[str] = "format"
    VERSIONS: ClassVar[tuple[int, ...]] = (FORMAT,)

    format: int
    kind: Literal["qcexport-matrix-plan"]
    argv: list[str]  # the options the plan was made with, to make it again
    models: list[ModelRef]
    bundles: list[PlannedBundle]
    cells: list[Cell]
    bundles_dir: str = BUNDLES_DIR
    results_dir: str = RESULTS_DIR
    host_setup: str = "pip install qcexport"
    profile_args: list[str] = field(default_factory=list)
    not_planned: list[str] = field(default_factory=list)

    def cell(self, cell_id: str) -> Cell | None:
        return next((c for c in self.cells if c.id == cell_id), None)

    def bundle(self, bundle_id: str) -> PlannedBundle:
        return next(b for b in self.bundles if b.id == bundle_id)

    def model(self, model_id: str) -> ModelRef:
        return next(m for m in self.models if m.id == model_id)

    def to_json(self) -> str:
        return json.dumps(dump(self), indent=2) + "\n"

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# --- making a plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanOptions:
    """What ``qcexport matrix plan`` was asked for (``argv`` is recorded in the plan)."""

    models: Sequence[str]
    goldens: Mapping[str, str] = field(default_factory=dict)  # model directory -> golden set
    precisions: Sequence[str] = ("fp32",)
    targets: Sequence[str] = ("ort-cpu", "openvino-cpu", "onnx-reference")
    optional: Sequence[str] = ()
    checks: Sequence[str] = CHECKS
    runners: Mapping[str, Sequence[str]] = field(default_factory=dict)
    profile_runs: int = DEFAULT_PROFILE_RUNS
    qcrun_spec: str = "qcrun"
    qcexport_spec: str = "qcexport"
    argv: Sequence[str] = ()


def make_plan(options: PlanOptions) -> MatrixPlan:
    """The plan for ``options``; every name is checked here, before any work, and a
    precision a target does not run is left out with the reason (``not_planned``)."""
    models = [_model_ref(text, options.goldens) for text in name_list(list(options.models))]
    for directory in set(options.goldens) - {m.path for m in models if m.path}:
        raise UserError(f"--golden names {directory}, which is not among --models",
                        stage="plan", hint="pass the model directory in --models too")
    if not models:
        raise UserError("no models given", stage="plan",
                        hint="pass --models qformer:tiny,perceiver (MECHANISM[:PRESET] or a "
                        "model directory)")
    _unique([m.id for m in models], "model id")
    precisions = name_list(list(options.precisions)) or ["fp32"]
    for p in precisions:
        if p not in PRECISIONS:
            raise unknown_choice("precision", p, PRECISIONS, flag="--precisions")
    targets = [get_target(t).name for t in name_list(list(options.targets))]
    optional = {get_target(t).name for t in name_list(list(options.optional))}
    if not targets:
        raise UserError("no targets given", stage="plan", hint="pass --targets ort-cpu,...")
    for name in optional - set(targets):
        raise UserError(f"--optional names {name}, which is not among --targets",
                        stage="plan", hint="list it in --targets too, or drop it")
    for name in options.runners:
        get_target(name)
    checks = [c for c in CHECKS if c in name_list(list(options.checks))]
    if not checks:
        raise UserError(f"no checks among {', '.join(options.checks)}", stage="plan",
                        hint=f"pass --checks with some of {', '.join(CHECKS)}")
    if options.profile_runs < 1:
        raise UserError(f"--runs {options.profile_runs} is not a number of timed runs",
                        stage="plan", hint="pass --runs 50")
    profile_args = ["--runs", str(options.profile_runs), "--warmup", "5", "--op-runs", "0",
                    "--gemm-sizes", "0"]
    plan_cells, not_planned = [], []
    bundles: dict[tuple, PlannedBundle] = {}
    for model in models:
        for precision in precisions:
            for target in targets:
                why = get_target(target).incompatibility(precision=precision)
                if why:
                    not_planned.append(f"{model.id} {precision} on {target}: {why}")
                    continue
                bundle = _bundle_for(bundles, model, precision, target)
                plan_cells.append((model, precision, target, bundle.id))
    if not plan_cells:
        raise UserError("no cell left to plan: " + "; ".join(not_planned), stage="plan",
                        hint="pick precisions the targets run (see `qcrun targets`)")
    cells = [_cell(m, p, t, b, t not in optional, checks, options, profile_args)
             for m, p, t, b in plan_cells]
    _unique([c.id for c in cells], "cell id")
    return MatrixPlan(format=FORMAT, kind=KIND, argv=list(options.argv), models=models,
                      bundles=list(bundles.values()), cells=cells,
                      host_setup=f"pip install {_quote(options.qcexport_spec)}",
                      profile_args=profile_args, not_planned=not_planned)


def _model_ref(text: str, goldens: Mapping[str, str]) -> ModelRef:
    from qcexport import mechanisms

    path = Path(text)
    if "/" in text or path.is_dir():
        if not (path / MANIFEST_FILE).is_file():
            raise UserError(f"{text} is not a model directory (no {MANIFEST_FILE})",
                            stage="plan", hint="pass a directory written by `qcexport convert`, "
                            "or a built-in mechanism name (qcexport list)")
        golden = goldens.get(path.as_posix())
        if golden is None and not read_model_dir(path, stage="plan").manifest.builtin:
            raise UserError(f"{text} is your own model: its cells need its golden set",
                            stage="plan", hint=f"pass --golden {text}=GOLDEN_DIR (written by "
                            "`qcexport golden --hf/--module ... -o GOLDEN_DIR`)")
        return ModelRef(id=_safe_id(path.resolve().name), path=path.as_posix(), golden=golden)
    mechanism, _, preset = text.partition(":")
    spec = mechanisms.get(mechanism)  # unknown name: a UserError listing the known ones
    preset = preset or DEFAULT_PRESET
    spec.config(preset)  # unknown preset: a UserError listing the presets
    return ModelRef(id=_safe_id(f"{mechanism}-{preset}"), mechanism=mechanism, preset=preset)


def _safe_id(text: str) -> str:
    ident = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
    return ident or "model"


def _bundle_key(target: str) -> tuple:
    """Targets with equal keys read the same bundle: same attention form and opset, and
    no TensorRT shape ranges (those are fixed per target when the bundle is made)."""
    t = get_target(target)
    return (t.preferred_attention, t.max_opset, t.name if t.needs_shape_ranges else "")


def _bundle_for(bundles: dict, model: ModelRef, precision: str, target: str) -> PlannedBundle:
    key = (model.id, precision, _bundle_key(target))
    if key not in bundles:
        ident = f"{model.id}.{precision}.{target}"
        bundles[key] = PlannedBundle(ident, model.id, precision, target, f"{ident}.bundle")
    bundle = bundles[key]
    bundle.targets.append(target)
    return bundle


def _cell(model: ModelRef, precision: str, target: str, bundle_id: str, required: bool,
          checks: list[str], options: PlanOptions, profile_args: list[str]) -> Cell:
    runner = RUNNERS.get(target, DEFAULT_RUNNER)
    runs_on = list(options.runners.get(target) or runner.runs_on)
    spec = options.qcrun_spec + (f"[{runner.extra}]" if runner.extra else "")
    ident = f"{model.id}.{precision}.{target}"
    if not CELL_ID.match(ident):
        raise UserError(f"cell id {ident!r} is too long or has odd characters", stage="plan",
                        hint="give the model directory a shorter name")
    cell = Cell(id=ident, model=model.id, precision=precision, target=target,
                bundle=bundle_id, required=required, checks=list(checks), runs_on=runs_on,
                setup=f"pip install {_quote(spec)}", commands=[])
    cell.commands.extend(cell_commands(cell, f"{BUNDLES_DIR}/{bundle_id}.bundle", RESULTS_DIR,
                                       profile_args))
    return cell


def cell_commands(cell: Cell, bundle_path: str, results_dir: str,
                  profile_args: Sequence[str]) -> list[list[str]]:
    """The device commands of ``cell``: ``qcrun verify`` and/or ``qcrun profile`` of its
    bundle on its target, each writing its cell result."""
    commands = []
    for check in cell.checks:
        argv = ["qcrun", check, bundle_path, "--target", cell.target, "--cell", cell.id,
                "--json", cell.result_path(results_dir, check)]
        commands.append(argv + (list(profile_args) if check == "profile" else []))
    return commands


def _quote(text: str) -> str:
    return f"'{text}'" if re.search(r"[^A-Za-z0-9_./=:-]", text) else text


def _unique(ids: list[str], what: str) -> None:
    seen = set()
    for ident in ids:
        if ident in seen:
            raise UserError(f"two entries give the {what} {ident!r}", stage="plan",
                            hint="name each model once")
        seen.add(ident)


def parse_goldens(items: Sequence[str]) -> dict[str, str]:
    """``--golden MODEL_DIR=GOLDEN_DIR`` (repeatable) as {model directory: golden set}."""
    goldens = {}
    for item in items:
        model, sep, golden = item.partition("=")
        if not sep or not model.strip() or not golden.strip():
            raise UserError(f"--golden {item!r} is not MODEL_DIR=GOLDEN_DIR", stage="plan",
                            hint="e.g. --golden out/blip2=out/golden-blip2")
        if not (Path(golden.strip()) / MANIFEST_FILE).is_file():
            raise UserError(f"--golden {item!r}: {golden.strip()} is not a golden set (no "
                            f"{MANIFEST_FILE})", stage="plan",
                            hint="write it with `qcexport golden --hf/--module ... -o DIR`")
        goldens[Path(model.strip()).as_posix()] = Path(golden.strip()).as_posix()
    return goldens


def parse_runners(items: Sequence[str]) -> dict[str, list[str]]:
    """``--runner TARGET=LABEL,LABEL`` (repeatable) as {target: labels}."""
    runners = {}
    for item in items:
        target, sep, labels = item.partition("=")
        names = [x.strip() for x in labels.split(",") if x.strip()]
        if not sep or not names:
            raise UserError(f"--runner {item!r} is not TARGET=LABEL[,LABEL...]", stage="plan",
                            hint="e.g. --runner jetson-orin=self-hosted,jetson-agx")
        runners[get_target(target.strip()).name] = names
    return runners


# --- reading and writing ---------------------------------------------------------------------


def read_plan(path: str | Path) -> MatrixPlan:
    data = read_json(Path(path), what="matrix plan", stage="plan")
    if isinstance(data, dict) and data.get("kind") != KIND:
        raise UserError(f"{path} is not a matrix plan (kind {data.get('kind')!r})",
                        stage="plan", hint="pass the plan.json `qcexport matrix plan` wrote")
    plan = parse(MatrixPlan, data, where=f"matrix plan {path}", stage="plan")
    bundle_ids = {b.id for b in plan.bundles}
    model_ids = {m.id for m in plan.models}
    for cell in plan.cells:
        if cell.bundle not in bundle_ids or cell.model not in model_ids \
                or not CELL_ID.match(cell.id):
            raise UserError(f"matrix plan {path}: cell {cell.id!r} names an unknown bundle or "
                            "model", stage="plan", hint="make the plan again with `qcexport "
                            "matrix plan` rather than editing it")
    return plan


def write_plan(plan: MatrixPlan, path: str | Path) -> None:
    write_atomic(Path(path), plan.to_json())

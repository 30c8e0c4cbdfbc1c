"""The build of a matrix: every bundle the plan's cells need, made on the host.

A built-in mechanism is exported once (fp32, ``convert_mechanism``) into a work directory and
bundled for each precision and target family (``make_bundle`` exports again for another
attention form and quantizes for another precision, and proves each bundle on the host before
it is written). A model directory named in the plan is bundled as it is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qcrun.bundle import BUNDLE_MANIFEST
from qcrun.errors import UserError

from qcexport.matrix.plan import MatrixPlan, ModelRef, PlannedBundle

Say = Callable[[str], None]


@dataclass(frozen=True)
class Built:
    bundle: str
    path: Path
    made: bool  # False: an existing bundle was kept


def bundle_path(plan: MatrixPlan, bundle: PlannedBundle, workdir: Path) -> Path:
    return workdir / plan.bundles_dir / bundle.path


def build_bundles(plan: MatrixPlan, workdir: Path, *, only: set[str] | None = None,
                  rebuild: bool = False, say: Say = lambda _: None) -> list[Built]:
    """Make the plan's bundles (those in ``only``, default all) under ``workdir/bundles``.

    A bundle already there is kept unless ``rebuild`` (its digest is what the results are
    checked against, so keeping it never mixes results of two builds). Raises the first
    UserError of a build, naming the bundle.
    """
    wanted = [b for b in plan.bundles if only is None or b.id in only]
    built: list[Built] = []
    todo = []
    for bundle in wanted:
        path = bundle_path(plan, bundle, workdir)
        if (path / BUNDLE_MANIFEST).is_file() and not rebuild:
            say(f"bundle {bundle.id}: kept {path} (--rebuild makes it again)")
            built.append(Built(bundle.id, path, False))
        else:
            todo.append(bundle)
    if not todo:
        return built
    (workdir / plan.bundles_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qcexport-matrix-") as tmp:
        sources: dict[str, Path] = {}
        for bundle in todo:
            model = plan.model(bundle.model)
            if model.id not in sources:
                sources[model.id] = _model_dir(model, workdir, Path(tmp), say)
            path = bundle_path(plan, bundle, workdir)
            say(f"bundle {bundle.id}: {model.describe()}, {bundle.precision}, for "
                f"{', '.join(bundle.targets)}")
            _make(sources[model.id], bundle, path, _golden(model, workdir))
            built.append(Built(bundle.id, path, True))
    return built


def _model_dir(model: ModelRef, workdir: Path, scratch: Path, say: Say) -> Path:
    if model.path is not None:
        return _resolved(model.path, workdir)
    from qcexport.export import convert_mechanism

    out = scratch / model.id
    say(f"model {model.id}: exporting {model.mechanism} ({model.preset})")
    try:
        convert_mechanism(model.mechanism, model.preset, output_dir=out)
    except UserError as e:
        raise _named(f"model {model.id}", e) from None
    return out


def _golden(model: ModelRef, workdir: Path) -> Path | None:
    if model.golden is None:
        return None  # a built-in mechanism: its committed golden set
    return _resolved(model.golden, workdir)


def _resolved(text: str, workdir: Path) -> Path:
    """A path of the plan: relative ones are from the working directory of every job."""
    path = Path(text)
    return path if path.is_absolute() else workdir / path


def _make(model_dir: Path, bundle: PlannedBundle, path: Path, golden: Path | None) -> None:
    from qcexport.bundle import make_bundle

    try:
        make_bundle(model_dir, bundle.target, bundle.precision, path, golden=golden)
    except UserError as e:
        raise _named(f"bundle {bundle.id}", e) from None


def _named(what: str, e: UserError) -> UserError:
    stage = f"{e.stage}: " if e.stage else ""
    return UserError(f"{what}: {stage}{e.args[0]}", stage="build", hint=e.hint)

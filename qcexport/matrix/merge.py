"""Merging device results into one matrix, judged against the plan.

What decides a cell comes from the plan and the result files, never from a result's own
verdict: a result counts for a cell only when its bundle digest is the sha256 of the
``bundle.json`` the build made for that cell (anything else is "stale"); its parity report is
read with qcrun's schema, its records for the cell's target are taken one by one (a report's
``passed`` is not read), a record that claims a pass must carry numbers within qcrun's own
tolerance for the cell's precision and a tolerance no looser than it; a profile counts when
the cell's target ran timed runs. A planned cell with no result is a failure ("no result"); a
repeated result keeps the newest; a file that is not a result is reported, not fatal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, Literal

from qcrun.bundle import BUNDLE_MANIFEST
from qcrun.cell import CellResult, Device, read_result
from qcrun.errors import UserError
from qcrun.parity import NOT_RUN_CODES, ParityReport, Record, policy_for
from qcrun.profile import ProfileReport

from qcexport.matrix.plan import Cell, MatrixPlan

FORMAT = 1
KIND = "qcexport-matrix-report"
Status = Literal["pass", "fail", "error", "stale", "missing"]
#: How bad a status is, for the status of a cell made of several checks.
SEVERITY = {"pass": 0, "missing": 1, "stale": 2, "error": 3, "fail": 4}
LABELS = {"pass": "pass", "fail": "fail", "error": "error", "stale": "stale",
          "missing": "no result"}


@dataclass(frozen=True)
class Latency:
    """One sweep point of a cell's profile, in milliseconds."""

    shape: str
    runs: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class CheckOutcome:
    """One check (verify or profile) of a cell: the result kept and what it showed."""

    WRITE_NULLS: ClassVar[bool] = True

    check: str
    status: Status
    detail: str = ""
    file: str | None = None
    created: str | None = None
    device: str | None = None
    bundle_sha256: str | None = None
    replaced: int = 0  # older results of the same check that the kept one replaced
    latency: list[Latency] = field(default_factory=list)


@dataclass(frozen=True)
class CellOutcome:
    DERIVED: ClassVar[dict[str, Callable]] = {"label": lambda c: LABELS[c.status]}

    cell: str
    model: str
    precision: str
    target: str
    required: bool
    status: Status
    expected_sha256: str | None
    checks: list[CheckOutcome]

    @property
    def problems(self) -> list[str]:
        return [f"{c.check}: {LABELS[c.status]}" + (f": {c.detail}" if c.detail else "")
                for c in self.checks if c.status != "pass"]

    @property
    def device(self) -> str | None:
        return next((c.device for c in self.checks if c.device), None)


@dataclass(frozen=True)
class FileIssue:
    path: str
    problem: str


@dataclass(frozen=True)
class MatrixReport:
    """The merged matrix (``matrix.json``); ``passed`` is recomputed from the cells."""

    VERSION_KEY: ClassVar[str] = "format"
    VERSIONS: ClassVar[tuple[int, ...]] = (FORMAT,)
    DERIVED: ClassVar[dict[str, Callable]] = {
        "passed": lambda r: r.passed,
        "counts": lambda r: r.counts(),
    }

    format: int
    kind: Literal["qcexport-matrix-report"]
    created: str
    plan_sha256: str
    cells: list[CellOutcome]
    devices: dict[str, Device] = field(default_factory=dict)
    engines: dict[str, dict[str, str]] = field(default_factory=dict)  # device -> versions
    unreadable: list[FileIssue] = field(default_factory=list)
    unplanned: list[FileIssue] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every required cell passed, and some cell passed (an empty run is not a pass)."""
        return (all(c.status == "pass" for c in self.cells if c.required)
                and any(c.status == "pass" for c in self.cells))

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.cells) for s in SEVERITY}

    def failing(self) -> list[CellOutcome]:
        return [c for c in self.cells if c.required and c.status != "pass"]

    def verdict_line(self) -> str:
        required = [c for c in self.cells if c.required]
        ok = sum(c.status == "pass" for c in required)
        counts = {LABELS[s]: sum(c.status == s for c in required) for s in SEVERITY}
        bad = ", ".join(f"{n} {label}" for label, n in counts.items() if n and label != "pass")
        head = f"{ok} of {len(required)} required cells passed"
        return head + (f" ({bad})" if bad else "")


# --- reading the results ---------------------------------------------------------------------


def result_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, with directories expanded to the .json files under them (sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if p.is_file())
        else:
            files.append(path)
    return files


def _when(result: CellResult) -> datetime:
    try:
        stamp = datetime.fromisoformat(result.created)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def expected_digests(plan: MatrixPlan, bundles_dir: Path) -> dict[str, str | None]:
    """bundle id -> sha256 of the bundle.json the build wrote (None: not there)."""
    digests: dict[str, str | None] = {}
    for bundle in plan.bundles:
        try:
            raw = (bundles_dir / bundle.path / BUNDLE_MANIFEST).read_bytes()
        except OSError:
            digests[bundle.id] = None
            continue
        digests[bundle.id] = hashlib.sha256(raw).hexdigest()
    return digests


def merge(plan: MatrixPlan, paths: Sequence[str | Path], bundles_dir: str | Path
          ) -> MatrixReport:
    """Every planned cell judged from the result files (see the module docstring)."""
    from qcrun.cell import now

    found: dict[tuple[str, str], list[tuple[datetime, int, Path, CellResult]]] = {}
    unreadable, unplanned = [], []
    for index, path in enumerate(result_files(paths)):
        try:
            result = read_result(path)
        except UserError as e:
            unreadable.append(FileIssue(str(path), e.args[0]))
            continue
        cell = plan.cell(result.cell)
        if cell is None or result.check not in cell.checks:
            unplanned.append(FileIssue(str(path), f"cell {result.cell} ({result.check}) is not "
                                       "in the plan"))
            continue
        found.setdefault((cell.id, result.check), []).append((_when(result), index, path, result))
    digests = expected_digests(plan, Path(bundles_dir))
    cells, devices, engines = [], {}, {}
    for cell in plan.cells:
        outcomes = []
        for check in cell.checks:
            candidates = sorted(found.get((cell.id, check), []), key=lambda c: c[:2])
            if not candidates:
                outcomes.append(CheckOutcome(check, "missing", f"no {check} result"))
                continue
            _, _, path, result = candidates[-1]
            devices[result.device.name] = result.device
            engines[result.device.name] = result.engines
            outcomes.append(_judge(cell, check, path, result, digests[cell.bundle],
                                   len(candidates) - 1))
        status = max((o.status for o in outcomes), key=SEVERITY.__getitem__)
        cells.append(CellOutcome(cell.id, cell.model, cell.precision, cell.target,
                                 cell.required, status, digests[cell.bundle], outcomes))
    return MatrixReport(format=FORMAT, kind=KIND, created=now(), plan_sha256=plan.sha256(),
                        cells=cells, devices=devices, engines=engines, unreadable=unreadable,
                        unplanned=unplanned)


# --- judging one result ----------------------------------------------------------------------


def _judge(cell: Cell, check: str, path: Path, result: CellResult, expected: str | None,
           replaced: int) -> CheckOutcome:
    def outcome(status: Status, detail: str = "", latency=()) -> CheckOutcome:
        return CheckOutcome(check, status, detail, str(path), result.created,
                            result.device.name, result.bundle_sha256, replaced, list(latency))

    if expected is None:
        return outcome("error", f"bundle {cell.bundle} is not among the built bundles (no "
                       f"{BUNDLE_MANIFEST}): the result's digest cannot be checked")
    if result.bundle_sha256 != expected:
        got = result.bundle_sha256[:12] if result.bundle_sha256 else "none"
        return outcome("stale", f"ran bundle sha256 {got}…, the plan's bundle {cell.bundle} "
                       f"is {expected[:12]}…")
    if result.error is not None or result.report is None:
        return outcome("error", result.error or "the result carries no report")
    try:
        if check == "verify":
            status, detail = judge_parity(cell, ParityReport.from_dict(result.report))
            return outcome(status, detail)
        status, detail, latency = judge_profile(cell, ProfileReport.from_dict(result.report))
        return outcome(status, detail, latency)
    except UserError as e:
        return outcome("error", f"its report cannot be read: {e.args[0]}")


def judge_parity(cell: Cell, report: ParityReport) -> tuple[Status, str]:
    """The cell's verdict from the records of its target, each one re-checked."""
    if report.precision != cell.precision:
        return "fail", f"the report is of a {report.precision} model, the cell is {cell.precision}"
    records = [r for r in report.records if r.target == cell.target]
    if not records:
        return "fail", f"nothing ran on {cell.target} (no record of it)"
    policy = policy_for(cell.precision)
    problems = []
    for record in records:
        problem = _record_problem(record, policy, cell)
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return "fail", problems[0] + more
    cases = len({r.case for r in records})
    return "pass", f"{len(records)} checks on {cases} cases"


def _record_problem(record: Record, policy, cell: Cell) -> str | None:
    where = f"{record.case}/{record.output}" if record.output else record.case
    if record.code in NOT_RUN_CODES or record.verdict == "skip":
        return f"{where}: not run ({record.message or record.code})"
    if record.verdict != "pass":
        return f"{where}: {record.message or record.code}"
    if record.output is None:
        return None
    m, used = record.metrics, record.tolerance
    if m is None or used is None or m.max_abs is None:
        return f"{where}: a pass without numbers"
    limit = policy.resolve(cell.precision, cell.target, record.output)
    if (used.max_abs > limit.max_abs or (used.max_rel or 0.0) > (limit.max_rel or 0.0)
            or used.min_cosine < limit.min_cosine):
        return (f"{where}: judged with {used.describe()}, looser than qcrun's "
                f"{limit.describe()}")
    if not m.shape_match or m.nonfinite_mismatch or m.violations:
        return f"{where}: claims a pass, but its numbers break the tolerance"
    if m.max_abs > limit.max_abs and m.cosine is not None and m.cosine < limit.min_cosine:
        return f"{where}: cosine {m.cosine:.6f} < {limit.min_cosine:g}"
    return None


def judge_profile(cell: Cell, report: ProfileReport) -> tuple[Status, str, list[Latency]]:
    """Pass when the cell's target ran timed runs at every point of the profile."""
    precision = report.model_info.get("precision")
    if precision is not None and precision != cell.precision:
        return "fail", f"profiled a {precision} model, the cell is {cell.precision}", []
    try:
        target = report.target(cell.target)
    except KeyError:
        return "fail", f"the profile has no {cell.target}", []
    if target.status != "ok":
        return "fail", f"{cell.target} {target.status}: {target.reason}", []
    latency, problems = [], []
    for point in target.points:
        stats = point.stats
        if point.error or stats is None:
            problems.append(f"{point.label()}: {point.error or 'no timed run'}")
            continue
        latency.append(Latency(point.label(), stats.runs, stats.min_ms, stats.p50_ms,
                               stats.p90_ms, stats.p99_ms, stats.max_ms))
    if problems or not latency:
        return "fail", "; ".join(problems) or "no timed run", latency
    best = min(latency, key=lambda x: x.p50_ms)
    return "pass", f"p50 {best.p50_ms:.3g} ms at {best.shape}", latency

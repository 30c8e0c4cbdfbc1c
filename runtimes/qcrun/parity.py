"""Parity: compare runtime outputs with golden outputs, under a tolerance policy, as records.

Running and comparing are separate: ``compare`` is a pure function on two arrays, and
``run_parity`` runs every case of a golden set on every target and turns each output into a
``Record`` (pass, fail or skip, with the numbers and the tolerance used). Every failure is
collected; nothing stops at the first. The report is plain data that saves to JSON and loads
back, and renders as JUnit XML and as a text matrix. The host (qcexport) calls this same code,
so host and device cannot disagree about what "pass" means.

Verdict rule (``compare``): an output passes iff

1. its shape equals the expected shape;
2. its non-finite values agree with the expected ones: a NaN or Inf where the expected value is
   finite, or a finite value where the expected one is NaN/Inf, fails whatever the tolerance
   (no tolerance can make NaN right, and NaN would poison every other metric);
3. every finite element satisfies ``|actual - expected| <= max_abs + max_rel * |expected|``
   (numpy.allclose style; ``max_rel=None`` means a pure absolute bound). A per-element bound
   scales with the output's magnitude where a global one cannot: logits of size 50 carry more
   absolute rounding error than normalised features of size 1;
4. the cosine similarity of the flattened finite values is at least ``min_cosine`` -- checked
   only when the expected output has some element larger than ``max_abs``: on an all-(near-)zero
   output the direction of the rounding noise is meaningless and the absolute bound decides.

The dtype is recorded but does not decide: an fp16 engine that returns fp32 is judged on values.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qcrun import machine
from qcrun.choices import PRECISIONS, TOLERANCE_FIELDS
from qcrun.engines import (
    LoadFailed,
    RunFailed,
    TargetUnavailable,
    adapter_for,
    availability,
    model_file,
)
from qcrun.errors import UserError, unknown_choice
from qcrun.golden import GoldenSet
from qcrun.schema import dump, parse, read_json
from qcrun.targets import Target, get_target

#: Floor on |expected| in max_rel, so that an expected 0 does not divide by zero. It only
#: affects the reported max_rel; the verdict uses the allclose bound above.
REL_FLOOR = 1e-6

VERDICTS = ("pass", "fail", "skip")
#: The version of a parity report's JSON (``ParityReport.to_json``).
FORMAT = 1

#: Record codes of a target that ran nothing (a skip, or a failure when the target was required).
NOT_RUN_CODES = ("unavailable", "precision", "attention-form", "format")


# --- tolerances ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Bounds for one output: ``|a - e| <= max_abs + max_rel*|e|`` per element, and cosine."""

    WRITE_NULLS: ClassVar[bool] = True

    max_abs: float
    max_rel: float | None = None
    min_cosine: float = 0.0

    def overridden(self, fields: Mapping[str, float | None]) -> Tolerance:
        return replace(self, **_checked_fields(fields))

    def bound(self) -> str:
        """The per-element bound in words, e.g. "1e-04 + 1e-04*|expected|"."""
        text = f"{self.max_abs:.0e}"
        if self.max_rel:
            text += f" + {self.max_rel:.0e}*|expected|"
        return text

    def describe(self) -> str:
        return f"max_abs {self.bound()}, cosine >= {self.min_cosine:g}"


def _checked_fields(fields: Mapping[str, Any]) -> dict[str, float | None]:
    for key in fields:
        if key not in TOLERANCE_FIELDS:
            raise unknown_choice("tolerance field", key, TOLERANCE_FIELDS)
    return {k: (None if v is None else float(v)) for k, v in fields.items()}


# Default tolerance per precision, against PyTorch eager fp32 golden outputs, and why:
# - fp32: engines reorder and fuse sums (blocked GEMMs, fused softmax), so identical math
#   drifts by ~1e-6 relative per op; a few attention layers on O(1) activations stay well below
#   1e-4. cosine 0.99999 still catches a wrong mask or a dropped branch that moves few elements.
# - fp16: 10-bit mantissa (eps ~1e-3); after several layers errors reach ~1e-2 on O(1) values.
# - int8-dynamic: activations quantised per tensor at run time, weights int8: single elements
#   can be off by a few quantisation steps (~0.05-0.1), but the output direction survives, so
#   cosine >= 0.99 is the real criterion and max_abs only catches gross errors.
# - int8-static: activation ranges come from calibration and clip outliers: looser max_abs,
#   same cosine criterion.
# - bf16: the fp32 graph computed by the engine in bfloat16 (8-bit mantissa, eps ~3.9e-3):
#   each matmul input is rounded, so after a few layers elements drift ~1e-2 on O(1) values,
#   between fp16's and int8's; the direction survives (cosine >= 0.9999 measured on every
#   tiny mechanism on OpenVINO CPU), so 0.999 leaves room for deeper models.
# - int8-nncf: NNCF's static int8 (calibrated activations, per-channel weights): int8-static's
#   numbers; with accuracy control the sensitive operations stay in float under this row.
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-4, max_rel=1e-4, min_cosine=0.99999),
    "fp16": Tolerance(max_abs=1e-2, max_rel=1e-2, min_cosine=0.999),
    "int8-dynamic": Tolerance(max_abs=0.15, max_rel=0.05, min_cosine=0.99),
    "int8-static": Tolerance(max_abs=0.25, max_rel=0.1, min_cosine=0.99),
    "bf16": Tolerance(max_abs=5e-2, max_rel=5e-2, min_cosine=0.999),
    "int8-nncf": Tolerance(max_abs=0.25, max_rel=0.1, min_cosine=0.99),
}

Scoped = Mapping[str, Mapping[str, Mapping[str, float | None]]]


@dataclass(frozen=True)
class TolerancePolicy:
    """Which tolerance applies to (precision, target, output).

    ``resolve`` starts from ``defaults[precision]``, then applies, each over the last:
    the target's ``tolerance_overrides[precision]`` (when ``use_target_settings``),
    ``targets[target]["*"]``, ``targets[target][precision]``, ``outputs[output]["*"]``,
    ``outputs[output][precision]``. Overrides are partial: ``{"max_abs": 1e-3}`` keeps the
    other fields. Outputs come last because an output's nature (logits vs normalised features)
    matters on every target.
    """

    defaults: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    targets: Scoped = field(default_factory=dict)
    outputs: Scoped = field(default_factory=dict)
    use_target_settings: bool = field(default=True, metadata={"key": "use_target_profiles"})

    def __post_init__(self):
        # plain dicts, so that ``qcrun.schema.dump`` writes any Mapping a caller passed
        object.__setattr__(self, "defaults", dict(self.defaults))
        for name in ("targets", "outputs"):
            plain = {k: {s: dict(f) for s, f in v.items()} for k, v in getattr(self, name).items()}
            object.__setattr__(self, name, plain)
        for scoped in (self.targets, self.outputs):
            for scopes in scoped.values():
                for scope, fields in scopes.items():
                    if scope != "*" and scope not in PRECISIONS:
                        raise unknown_choice("precision", scope, (*PRECISIONS, "*"))
                    _checked_fields(fields)

    def resolve(self, precision: str, target: str | Target, output: str | None = None) -> Tolerance:
        if precision not in self.defaults:
            raise unknown_choice("precision", precision, self.defaults, flag="--precision")
        target = get_target(target)
        tolerance = self.defaults[precision]
        layers = []
        if self.use_target_settings:
            layers.append(target.tolerance_overrides.get(precision, {}))
        for scopes in (self.targets.get(target.name, {}), self.outputs.get(output, {})):
            layers += [scopes.get("*", {}), scopes.get(precision, {})]
        for fields in layers:
            if fields:
                tolerance = tolerance.overridden(fields)
        return tolerance

    @classmethod
    def from_dict(cls, data: object, *, where: str = "tolerance policy",
                  stage: str = "policy") -> TolerancePolicy:
        """A policy from plain data (``qcrun.schema.dump`` of a policy, the body of a policy
        file): partial overrides over qcrun's built-in policy, read by ``qcrun.schema.parse``."""
        return cls.over_defaults(parse(PolicyOverrides, data, where=where, stage=stage))

    @classmethod
    def over_defaults(cls, overrides: PolicyOverrides) -> TolerancePolicy:
        """``overrides`` laid over qcrun's built-in policy; missing defaults are the built-in."""
        defaults = dict(DEFAULT_TOLERANCES)
        for precision, fields in overrides.defaults.items():
            if precision not in PRECISIONS:
                raise unknown_choice("precision", precision, PRECISIONS)
            defaults[precision] = defaults[precision].overridden(fields)
        return cls(defaults=defaults, targets=overrides.targets, outputs=overrides.outputs,
                   use_target_settings=overrides.use_target_settings)


_Fields = dict[str, float | None]


@dataclass(frozen=True)
class PolicyOverrides:
    """Tolerance overrides as data: partial fields per precision over qcrun's built-in policy
    (``TolerancePolicy.resolve`` says in which order they apply). ``dump(TolerancePolicy)``
    writes this shape, with every default in full."""

    defaults: dict[str, _Fields] = field(default_factory=dict)
    targets: dict[str, dict[str, _Fields]] = field(default_factory=dict)
    outputs: dict[str, dict[str, _Fields]] = field(default_factory=dict)
    use_target_settings: bool = field(default=True, metadata={"key": "use_target_profiles"})


@dataclass(frozen=True)
class PolicyFile(PolicyOverrides):
    """A tolerance policy file the user names (``--policy FILE``), format 1::

        {"format": 1, "defaults": {"fp32": {"max_abs": 1e-3}},
         "targets": {"openvino-gpu": {"*": {"max_abs": 1e-2}}},
         "outputs": {"logits": {"fp16": {"max_rel": 0.05}}}, "use_target_profiles": true}

    Overrides are partial, over qcrun's built-in policy (``TolerancePolicy.resolve`` says in
    which order they apply).
    """

    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    VERSION_KEY: ClassVar[str] = "format"

    format: int = 1  # required all the same: the version is checked before the fields
    description: str | None = None


def policy_for(precision: str, *, policy_file: str | Path | None = None) -> TolerancePolicy:
    """The tolerance policy that judges a model of ``precision``: qcrun's built-in one, or the
    file the user named. Never anything the artifact under test carries: a model that could
    loosen its own tolerances could pass whatever it computes."""
    if precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS)
    if policy_file is None:
        return TolerancePolicy()
    path = Path(policy_file)
    where = f"policy file {path}"
    data = parse(PolicyFile, read_json(path, what="policy file", stage="policy"), where=where,
                 stage="policy")
    try:
        return TolerancePolicy.over_defaults(data)
    except UserError as e:
        raise UserError(f"{where}: {e.args[0]}", stage="policy",
                        hint="keys are precisions (or '*') and max_abs, max_rel, min_cosine"
                        ) from None


# --- comparing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """How far one output is from its golden value. Value metrics cover positions where both
    arrays are finite; they are None when the shapes differ (there is nothing to pair up)."""

    WRITE_NULLS: ClassVar[bool] = True

    max_abs: float | None
    max_rel: float | None
    mean_abs: float | None
    cosine: float | None
    nan_actual: int
    inf_actual: int
    nan_expected: int
    inf_expected: int
    nonfinite_mismatch: int
    shape_match: bool
    dtype_match: bool
    actual_shape: tuple[int, ...]
    expected_shape: tuple[int, ...]
    actual_dtype: str
    expected_dtype: str
    violations: int = 0
    worst_index: tuple[int, ...] | None = None
    worst_actual: float | None = None
    worst_expected: float | None = None


@dataclass(frozen=True)
class Comparison:
    """The outcome of ``compare``: the metrics, the tolerance applied, the verdict and why."""

    metrics: Metrics
    tolerance: Tolerance
    passed: bool
    reason: str
    code: str  # ok | shape | nonfinite | tolerance


def _counts(array: np.ndarray) -> tuple[int, int]:
    if not np.issubdtype(array.dtype, np.inexact):
        return 0, 0
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def compare(actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> Comparison:
    """Compare one output with its golden value under ``tolerance`` (see the module docstring)."""
    a, e = np.asarray(actual), np.asarray(expected)
    nan_a, inf_a = _counts(a)
    nan_e, inf_e = _counts(e)
    base = {
        "nan_actual": nan_a,
        "inf_actual": inf_a,
        "nan_expected": nan_e,
        "inf_expected": inf_e,
        "shape_match": a.shape == e.shape,
        "dtype_match": a.dtype == e.dtype,
        "actual_shape": tuple(a.shape),
        "expected_shape": tuple(e.shape),
        "actual_dtype": str(a.dtype),
        "expected_dtype": str(e.dtype),
    }
    if a.shape != e.shape:
        metrics = Metrics(None, None, None, None, nonfinite_mismatch=0, **base)
        reason = f"shape {list(a.shape)} but expected {list(e.shape)}"
        return Comparison(metrics, tolerance, False, reason, "shape")

    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    finite = np.isfinite(a64) & np.isfinite(e64)
    same_nonfinite = (np.isnan(a64) & np.isnan(e64)) | (a64 == e64)
    bad_nonfinite = ~finite & ~same_nonfinite
    nonfinite_mismatch = int(bad_nonfinite.sum())

    diff, magnitude = np.zeros(a.shape), np.zeros(a.shape)
    diff[finite] = np.abs(a64[finite] - e64[finite])
    magnitude[finite] = np.abs(e64[finite])
    n = int(finite.sum())
    max_abs = float(diff.max()) if n else 0.0
    max_rel = float((diff / np.maximum(magnitude, REL_FLOOR)).max()) if n else 0.0
    mean_abs = float(diff.sum() / n) if n else 0.0
    cosine = _cosine(a64[finite], e64[finite])

    excess = diff - (tolerance.max_abs + (tolerance.max_rel or 0.0) * magnitude)
    over = finite & (excess > 0)
    violations = int(over.sum())
    worst = {}
    if violations:
        index = np.unravel_index(int(np.argmax(np.where(over, excess, -np.inf))), a.shape)
        worst = {
            "worst_index": tuple(int(i) for i in index),
            "worst_actual": float(a64[index]),
            "worst_expected": float(e64[index]),
        }
    metrics = Metrics(
        max_abs,
        max_rel,
        mean_abs,
        cosine,
        nonfinite_mismatch=nonfinite_mismatch,
        violations=violations,
        **base,
        **worst,
    )

    problems, code = [], "ok"
    if nonfinite_mismatch:
        problems.append(_nonfinite_reason(a64, e64, bad_nonfinite))
        code = "nonfinite"
    if violations:
        problems.append(
            f"{violations} of {a.size} elements exceed {tolerance.bound()} (worst at "
            f"{list(worst['worst_index'])}: actual {worst['worst_actual']:.6g}, expected "
            f"{worst['worst_expected']:.6g})"
        )
        code = "tolerance" if code == "ok" else code
    signal = float(magnitude.max()) if n else 0.0
    if signal > tolerance.max_abs and cosine < tolerance.min_cosine:
        problems.append(f"cosine {cosine:.6f} < {tolerance.min_cosine:g}")
        code = "tolerance" if code == "ok" else code
    return Comparison(metrics, tolerance, not problems, "; ".join(problems), code)


def _cosine(a: np.ndarray, e: np.ndarray) -> float:
    norm_a, norm_e = float(np.linalg.norm(a)), float(np.linalg.norm(e))
    if norm_a == 0.0 and norm_e == 0.0:
        return 1.0
    if norm_a == 0.0 or norm_e == 0.0:
        return 0.0
    return float(np.dot(a.ravel(), e.ravel()) / (norm_a * norm_e))


def _nonfinite_reason(a: np.ndarray, e: np.ndarray, bad: np.ndarray) -> str:
    nan = int((bad & np.isnan(a)).sum())
    inf = int((bad & np.isinf(a)).sum())
    lost = int((bad & np.isfinite(a)).sum())
    parts = []
    if nan or inf:
        parts.append(f"{nan} NaN and {inf} Inf in actual where expected is finite")
    if lost:
        parts.append(f"{lost} finite values in actual where expected is NaN/Inf")
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return f"{', '.join(parts) or 'non-finite values differ'} (first at {list(first)})"


# --- records and reports ---------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One verdict: an output of a case on a target (``output`` None: the whole case).

    ``code`` says what kind of verdict it is: ok, tolerance, nonfinite, shape, missing-output,
    load, run, unavailable, precision, attention-form.
    """

    WRITE_NULLS: ClassVar[bool] = True

    target: str
    case: str
    output: str | None
    verdict: str
    code: str
    message: str = ""
    metrics: Metrics | None = None
    tolerance: Tolerance | None = None

    def describe(self) -> str:
        """One line with the numbers, for a failure list."""
        where = " / ".join(x for x in (self.target, self.case, self.output) if x)
        if self.metrics is None or self.metrics.max_abs is None:
            return f"{where}: {self.message}"
        m, t = self.metrics, self.tolerance
        if t is None:
            numbers = f"max_abs {m.max_abs:.3g}, cosine {m.cosine:.6f}"
        else:
            numbers = (
                f"max_abs {m.max_abs:.3g} (tolerance {t.bound()}), "
                f"cosine {m.cosine:.6f} (min {t.min_cosine:g})"
            )
        return f"{where}: {numbers}" + (f" -- {self.message}" if self.message else "")


def environment() -> dict[str, Any]:
    """Where the report was made: python, platform, and the versions of the engines present."""
    return machine.software()


@dataclass(frozen=True)
class LoadTime:
    """How a target loaded the model in a parity run: the file its engine read, the seconds
    the load took, whether a compiled-model cache was used ("none", "used", "not used: why"),
    and, where one was used, the seconds a load without it took here (``uncached_s``, measured
    by ``qcrun verify``: what the cache saves on this device)."""

    file: str
    seconds: float
    cache: str = "none"
    uncached_s: float | None = None

    def describe(self) -> str:
        text = f"{self.seconds:.3f} s ({self.file}"
        if self.cache != "none":
            text += f", compiled-model cache {self.cache}"
        if self.uncached_s is not None:
            text += f"; without it {self.uncached_s:.3f} s"
        return text + ")"


@dataclass
class ParityReport:
    """Every record of a parity run, and what it ran on. JSON is the source of truth: format
    ``FORMAT``, the fields in this order, then the verdict (``passed``, ``ran``, ``counts``)."""

    DERIVED: ClassVar[dict[str, Callable]] = {
        "passed": lambda report: report.passed,
        "ran": lambda report: report.ran(),
        "counts": lambda report: report.counts(),
    }

    model: str = ""
    golden: str = ""
    precision: str = "fp32"
    targets: list[str] = field(default_factory=list)
    required: list[str] = field(default_factory=list)
    optional: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    # target -> what its engine computed float operations in, read back after loading (None:
    # the engine computes the graph's own types); targets that did not load are absent
    inference_precision: dict[str, str | None] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    # target -> how it loaded the model (targets that did not load are absent)
    loads: dict[str, LoadTime] = field(default_factory=dict)

    def failures(self) -> list[Record]:
        return [r for r in self.records if r.verdict == "fail"]

    def skips(self) -> list[Record]:
        return [r for r in self.records if r.verdict == "skip"]

    def ran(self) -> bool:
        """Whether any case ran on any target (a run that failed counts; a skip does not)."""
        return any(r.code not in NOT_RUN_CODES for r in self.records)

    @property
    def passed(self) -> bool:
        """No failure, and something passed: a run in which nothing executed is not a pass."""
        return not self.failures() and any(r.verdict == "pass" for r in self.records)

    def verdict_line(self) -> str:
        """Why the report fails, in one line ("" when it passes)."""
        if self.passed:
            return ""
        if not self.ran():
            return (f"nothing ran: no case ran on any target ({', '.join(self._target_order())}"
                    "; reasons above)")
        failed = sorted({r.target for r in self.failures()})
        return f"parity failed on {', '.join(failed)}: {len(self.failures())} failing checks"

    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.records) for v in VERDICTS}

    def cases(self) -> list[str]:
        return list(dict.fromkeys(r.case for r in self.records))

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dump(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: object) -> ParityReport:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else None
            raise UserError(f"not a parity report of format {FORMAT} (format {got!r})",
                            stage="parity",
                            hint="pass a JSON file written by `qcrun verify --json` or "
                                 "`qcexport parity --json`")
        body = {k: v for k, v in data.items() if k != "format"}
        return parse(cls, body, where="parity report JSON", stage="parity")

    @classmethod
    def from_json(cls, text: str) -> ParityReport:
        return cls.from_dict(json.loads(text))

    # -- JUnit --------------------------------------------------------------------------------

    def to_junit_xml(self) -> str:
        """JUnit XML: a testsuite per target, a testcase per case/output; a skip is
        ``<skipped/>``, a required target that did not run is a ``<failure>``, and a run in
        which nothing ran at all gets one failing testcase of its own, so that a CI system
        reading only the XML does not count it as green."""
        counts = self.counts()
        empty = not self.records or (not self.failures() and not self.passed)
        root = ET.Element(
            "testsuites",
            name="qcrun parity",
            tests=str(len(self.records) + empty),
            failures=str(counts["fail"] + empty),
            skipped=str(counts["skip"]),
            errors="0",
        )
        if empty:
            suite = ET.SubElement(root, "testsuite", name="parity", tests="1", failures="1",
                                  skipped="0", errors="0")
            case = ET.SubElement(suite, "testcase", classname="parity", name="any case ran")
            line = self.verdict_line() or "no records"
            ET.SubElement(case, "failure", message=line, type="nothing-ran").text = line
        for target in self._target_order():
            records = [r for r in self.records if r.target == target]
            suite = ET.SubElement(
                root,
                "testsuite",
                name=target,
                tests=str(len(records)),
                failures=str(sum(r.verdict == "fail" for r in records)),
                skipped=str(sum(r.verdict == "skip" for r in records)),
                errors="0",
            )
            for r in records:
                case = ET.SubElement(
                    suite,
                    "testcase",
                    classname=f"{target}.{r.case}",
                    name=f"{r.case}/{r.output}" if r.output else r.case,
                )
                if r.verdict == "fail":
                    failure = ET.SubElement(case, "failure", message=r.message, type=r.code)
                    failure.text = r.describe()
                elif r.verdict == "skip":
                    ET.SubElement(case, "skipped", message=r.message)
        return ET.tostring(root, encoding="unicode", xml_declaration=True)

    def _target_order(self) -> list[str]:
        return list(dict.fromkeys([*self.targets, *(r.target for r in self.records)]))

    # -- text ---------------------------------------------------------------------------------

    def format_matrix(self) -> str:
        """Rows = cases, columns = targets, cells = verdict and worst max_abs; then every
        failure with its numbers and every skip reason."""
        targets, cases = self._target_order(), self.cases()
        header = ["case", *targets]
        rows = [[case, *(self._cell(t, case) for t in targets)] for case in cases]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]

        failures = self.failures()
        if failures:
            lines += ["", f"failures ({len(failures)}):"]
            lines += [f"  {r.describe()}" for r in failures]
        skipped = {r.target: r.message for r in self.skips()}
        if skipped:
            lines += ["", "skipped:"]
            lines += [f"  {t}: {reason}" for t, reason in skipped.items()]
        c = self.counts()
        lines += ["", f"{c['pass']} passed, {c['fail']} failed, {c['skip']} skipped"]
        if not self.ran():
            lines.append("nothing ran: a run in which no case executed is a failure")
        return "\n".join(lines)

    def _cell(self, target: str, case: str) -> str:
        records = [r for r in self.records if r.target == target and r.case == case]
        if not records:
            return "-"
        failed = [r for r in records if r.verdict == "fail"]
        if failed:
            codes = {r.code for r in failed}
            if "nonfinite" in codes:
                return "fail nan"
            if codes <= {"tolerance"}:
                return f"fail {_worst_abs(failed)}"
            return f"fail {sorted(codes)[0]}"
        if all(r.verdict == "skip" for r in records):
            return "skip"
        return f"pass {_worst_abs([r for r in records if r.verdict == 'pass'])}"


def _worst_abs(records: Sequence[Record]) -> str:
    values = [r.metrics.max_abs for r in records if r.metrics and r.metrics.max_abs is not None]
    return f"{max(values):.0e}" if values else ""


# --- running ---------------------------------------------------------------------------------


def name_list(values: str | Iterable[str] | None) -> list[str]:
    """Target names from an option that is repeatable and/or comma-separated."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return list(dict.fromkeys(n.strip() for raw in values for n in raw.split(",") if n.strip()))


def required_targets(names: Sequence[str], optional: Iterable[str] = (),
                     require: Iterable[str] = ()) -> list[str]:
    """The targets that must run: every one named, less those marked ``optional``.

    A target the user names is asked for: not running there is a failure, not a pass, unless
    they say it may be absent (``--optional``). ``require`` names targets that must run in any
    case (the older ``--require`` flag, now the default for every named target); naming one
    both required and optional, or an optional one that is not among the targets, is an error.
    """
    names = [get_target(n).name for n in names]
    optional = [get_target(n).name for n in name_list(list(optional))]
    require = [get_target(n).name for n in name_list(list(require))]
    for name in require:
        if name not in names:
            raise UserError(f"required target {name!r} is not among the targets "
                            f"({', '.join(names)})", stage="parity", hint="name it in --targets")
    for name in optional:
        if name not in names:
            raise UserError(f"optional target {name!r} is not among the targets "
                            f"({', '.join(names)})", stage="parity",
                            hint="name it in --targets too, or drop it from --optional")
    both = sorted(set(optional) & set(require))
    if both:
        raise UserError(f"{', '.join(both)} is both required and optional", stage="parity",
                        hint="drop it from --require or from --optional")
    return [n for n in names if n not in optional]


def run_parity(
    model_path: str | Path,
    golden: GoldenSet,
    targets: Iterable[str | Target],
    policy: TolerancePolicy | None = None,
    precision: str = "fp32",
    *,
    require: Iterable[str] = (),
    attention_form: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    optional: Iterable[str] = (),
) -> ParityReport:
    """Run every golden case on every target and compare every output.

    A target that cannot run here (engine or device missing, precision or attention form it
    does not accept) gets one skip record per case with the reason -- or a fail record if it is
    in ``require``. A target whose engine refuses the model gets fail records with the engine's
    message, and the other targets still run. A feed that does not match the model's inputs is
    a UserError: the golden set belongs to another model. ``options`` maps a target name to
    adapter options (see the adapters). ``optional`` only records which targets the caller
    allowed to be absent (see ``required_targets``). The report passes only when some case
    ran and passed.
    """
    policy = policy or TolerancePolicy()
    if precision not in PRECISIONS:
        raise unknown_choice("precision", precision, PRECISIONS, flag="--precision")
    resolved = [get_target(t) for t in targets]
    if not resolved:
        raise UserError("no targets given", stage="parity", hint="pass at least one --target")
    names = [t.name for t in resolved]
    required = list(dict.fromkeys(require))
    for name in required:
        if name not in names:
            raise UserError(
                f"required target {name!r} is not among the targets ({', '.join(names)})",
                stage="parity",
            )
    options = options or {}
    records: list[Record] = []
    computed: dict[str, str | None] = {}
    loads: dict[str, LoadTime] = {}
    for target in resolved:
        records += _run_target(
            model_path,
            golden,
            target,
            policy,
            precision,
            required=target.name in required,
            attention_form=attention_form,
            options=dict(options.get(target.name, {})),
            computed=computed,
            loads=loads,
        )
    return ParityReport(
        records=records,
        model=str(getattr(model_path, "primary", model_path)),
        golden=f"{golden.path} ({golden.mechanism}/{golden.preset})",
        precision=precision,
        targets=names,
        required=required,
        environment=environment(),
        optional=[n for n in name_list(list(optional)) if n not in required],
        inference_precision=computed,
        loads=loads,
    )


def _not_run(target: Target, golden: GoldenSet, reason: str, code: str, required: bool):
    if required:
        verdict, reason = "fail", f"{target.name} is required but was not run: {reason}"
    else:
        verdict = "skip"
    return [Record(target.name, c.name, None, verdict, code, reason) for c in golden.cases]


def _run_target(
    model_path, golden, target, policy, precision, *, required, attention_form, options,
    computed=None, loads=None,
) -> list[Record]:
    refusals = {r.code: r for r in target.refusals(precision=precision,
                                                    attention=attention_form)}
    if "precision" in refusals:  # "it does not run ..." said of the target by name
        reason = f"{target.name} {refusals['precision'].reason.removeprefix('it ')}"
        return _not_run(target, golden, reason, "precision", required)
    if "attention-form" in refusals:
        reason = (
            f"the model uses attention form {attention_form!r}, which {target.name} cannot run "
            f"(it accepts {', '.join(target.attention_forms)}); re-export it with "
            f"--target {target.name}"
        )
        return _not_run(target, golden, reason, "attention-form", required)
    ok, reason = availability(target)
    if not ok:
        return _not_run(target, golden, reason, "unavailable", required)

    if target.needs_shape_ranges and "profile_shapes" not in options:
        options.setdefault("profile_feeds", [case.inputs for case in golden.cases])
    try:  # ModelFiles (qcrun.ir): the file this target's engine reads (IR on OpenVINO)
        path = model_file(model_path, target) if hasattr(model_path, "pick") \
            else Path(model_path)
    except UserError as e:  # an IR-only model on an engine that reads ONNX only
        return _not_run(target, golden, f"{e} ({e.hint})", "format", required)
    adapter = adapter_for(path, target, precision=precision, **options)
    try:
        adapter.load()
    except TargetUnavailable as e:
        return _not_run(target, golden, str(e), "unavailable", required)
    except LoadFailed as e:
        return [Record(target.name, c.name, None, "fail", "load", str(e)) for c in golden.cases]
    if computed is not None:
        computed[target.name] = adapter.inference_precision()
    if loads is not None:
        loads[target.name] = LoadTime(path.name, round(adapter.load_seconds, 4),
                                      adapter.cache_state)

    records = []
    try:
        for case in golden.cases:
            records += _run_case(adapter, case, target, policy, precision)
    finally:
        adapter.close()
    return records


def _run_case(adapter, case, target, policy, precision) -> list[Record]:
    try:
        actual = adapter.run(case.inputs)
    except RunFailed as e:
        return [
            Record(target.name, case.name, name, "fail", "run", str(e)) for name in case.outputs
        ]
    return compare_outputs(target.name, case.name, actual, case.outputs,
                           lambda name: policy.resolve(precision, target, name))


def compare_outputs(
    target: str,
    case: str,
    actual: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    tolerance: Callable[[str], Tolerance],
) -> list[Record]:
    """One ``Record`` per expected output of one run: ``actual`` against ``expected`` under
    ``tolerance(output name)``. The one comparison of outputs behind parity, convert's
    verification and quantize's accuracy check."""
    records = []
    for name, wanted in expected.items():
        bound = tolerance(name)
        if name not in actual:
            message = f"the model has no output {name!r} (its outputs: {', '.join(actual)})"
            verdict, code, metrics = "fail", "missing-output", None
        else:
            result = compare(actual[name], wanted, bound)
            verdict = "pass" if result.passed else "fail"
            message, code, metrics = result.reason, result.code, result.metrics
        records.append(Record(target, case, name, verdict, code, message, metrics, bound))
    return records


# --- kernel error: each runtime against onnx-reference on the same model ---------------------

#: How closely a runtime must agree with onnx's reference evaluator running the *same*
#: reduced-precision model. This isolates kernel error (saturating int8 kernels, fp16
#: accumulation) from quantization error, which the golden comparison measures. Engines may
#: requantize differently from the reference's literal QDQ arithmetic: OpenVINO folds QDQ into
#: its own int8 kernels, and on the tiny int8-static models it was measured up to 7.6e-2 from
#: the reference on a handful of elements (one quantization step), cosine >= 0.99982, while
#: onnxruntime matched the reference to 1e-6. A saturating int8 kernel moves every output by
#: about the size of the quantization error itself (cosine well below 0.999): the cosine bound
#: is what catches it, the element bound only catches gross errors.
INT8_KERNEL = Tolerance(max_abs=0.1, max_rel=0.1, min_cosine=0.9995)
KERNEL_TOLERANCES: Mapping[str, Tolerance] = {
    "fp32": DEFAULT_TOLERANCES["fp32"],
    "fp16": DEFAULT_TOLERANCES["fp16"],
    "int8-dynamic": INT8_KERNEL,
    "int8-static": INT8_KERNEL,
    "bf16": DEFAULT_TOLERANCES["bf16"],
    "int8-nncf": INT8_KERNEL,
}
REFERENCE_TARGET = "onnx-reference"


def kernel_parity(
    model_path: str | Path,
    golden: GoldenSet,
    targets: Iterable[str | Target],
    precision: str,
    *,
    attention_form: str | None = None,
) -> ParityReport | None:
    """Compare each target with onnx-reference on the same model and the golden inputs.

    Returns None when the reference evaluator cannot run here, the model (its attention
    form) is not one it reads, or no other target runs the model here; otherwise a report whose records measure kernel error only.
    """
    reference = get_target(REFERENCE_TARGET)
    ok, _ = availability(reference)
    if not ok or reference.refusals(attention=attention_form, precision=precision):
        return None
    # Kernel error is measured where a runtime runs this model; whether a requested target
    # ran at all is the golden report's verdict, so one that cannot is left out here.
    others = [t for t in map(get_target, targets)
              if t.name != REFERENCE_TARGET
              and not t.refusals(precision=precision, attention=attention_form)
              and availability(t)[0]]
    if not others:
        return None
    cases = []
    with adapter_for(model_path, reference).load() as evaluator:
        for case in golden.cases:
            outputs = evaluator.run(case.inputs)
            cases.append(replace(case, outputs={k: outputs[k] for k in case.outputs}))
    expected = replace(golden, cases=cases)
    policy = TolerancePolicy(defaults=dict(KERNEL_TOLERANCES), use_target_settings=False)
    report = run_parity(model_path, expected, others, policy, precision,
                        attention_form=attention_form)
    report.golden = f"{REFERENCE_TARGET} on {Path(model_path).name} ({golden.mechanism} inputs)"
    return report

"""Where a model diverges: PyTorch module boundaries compared one by one on a target.

The expected value of every module's output comes from a :class:`Reference` (PyTorch eager on
the host, stored intermediates of a golden set, or another runtime). The target runs the model
with the module boundary tensors exposed as outputs (:mod:`qcrun.boundaries`), in chunks of
bounded size, so the intermediates of a large model are never all held at once. Each module is
compared under the precision's tolerance policy (qcrun's, never the artifact's) with max abs,
max rel, cosine and SNR; the report lists modules in execution order, names the first that
breaks the policy, and shows the error growth along depth.

Observation must not change the answer: the unmodified model runs too, and when exposing the
boundaries moves the final outputs beyond a tight bound (the engine fused differently), the
target is localised by bisection instead, on prefix subgraphs that end at a boundary and run
as a deployed model would (:func:`bisect_target`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from qcrun import boundaries as bd
from qcrun import machine
from qcrun.engines import adapter_for, availability
from qcrun.errors import UserError, import_engine
from qcrun.golden import intermediates_entry, read_intermediates
from qcrun.parity import (
    KERNEL_TOLERANCES,
    REFERENCE_TARGET,
    Tolerance,
    TolerancePolicy,
    compare,
)
from qcrun.schema import dump, parse
from qcrun.targets import get_target

FORMAT = 1
#: Bytes of exposed intermediates one run may return (chunks of modules beyond that).
CHUNK_BYTES = 256 << 20
#: How far exposing intermediates may move the final outputs before the exposed run is
#: distrusted, as a share of the policy the modules are judged by. Observing a value can change
#: the kernels an engine picks (a fusion it no longer may do): that is the same kind of change
#: as between two runtimes on one model, ~1e-6 on fp32. A module's verdict can only flip when its
#: error lies within that movement of the bound, so a tenth of the policy leaves every verdict
#: the exposed run gives within 10% of what the deployed graph would give; an engine that
#: computes the model differently once observed moves the outputs by a large share of the
#: policy, and is localised by bisection on graphs that run as deployed.
OBSERVATION_SHARE = 0.1
#: SNR written for identical values (JSON has no infinity).
SNR_CAP = 999.0


def snr_db(actual: np.ndarray, expected: np.ndarray) -> float | None:
    """Signal to noise ratio of ``actual`` as an estimate of ``expected``, in dB (None when
    the shapes differ; inf when they are equal)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return None
    finite = np.isfinite(a) & np.isfinite(e)
    noise = float(np.sum((a[finite] - e[finite]) ** 2))
    signal = float(np.sum(e[finite] ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def observation_bound(tolerance: Tolerance) -> Tolerance:
    share = OBSERVATION_SHARE
    return Tolerance(max_abs=tolerance.max_abs * share,
                     max_rel=(tolerance.max_rel or 0.0) * share,
                     min_cosine=1.0 - (1.0 - tolerance.min_cosine) * share)


# --- report ----------------------------------------------------------------------------------


@dataclass
class ModuleError:
    """One module's output on one target: the worst case over the golden cases."""

    WRITE_NULLS: ClassVar[bool] = True

    module: str
    depth: int  # dots in the path + 1: layers.0.attn is 3
    tensor: str  # the ONNX value compared ("" when none matched)
    verdict: str  # pass | fail | unmatched
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    snr_db: float | None = None
    failed_cases: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class TargetLocalization:
    """What one target computes at each module boundary, against the reference."""

    WRITE_NULLS: ClassVar[bool] = True

    target: str
    method: str  # exposed | bisection | skipped
    first: str | None = None  # the first module (execution order) that breaks the policy
    observation: str = ""  # how exposing boundaries moved the final outputs
    final_passed: bool | None = None  # the unmodified model's outputs against the reference
    tolerance: str = ""
    modules: list[ModuleError] = field(default_factory=list)
    reason: str = ""
    cases: list[str] = field(default_factory=list)  # the cases localised (failing first)
    against: str = ""  # this target's reference, when not the report's


@dataclass
class LocalizeReport:
    """A localisation run: JSON is the source of truth (format ``FORMAT``)."""

    VERSIONS: ClassVar[tuple[int, ...]] = (FORMAT,)

    format: int = FORMAT
    model: str = ""
    reference: str = ""  # eager | stored intermediates | a target name
    precision: str = "fp32"
    cases: list[str] = field(default_factory=list)
    targets: list[TargetLocalization] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    seconds: float = 0.0
    load: str = ""  # the machine's load average at the end (timings of a busy machine)
    split: list[ErrorSplit] = field(default_factory=list)  # reduced precision: per module
    environment: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dump(self), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> LocalizeReport:
        return parse(cls, json.loads(text), where="localize report JSON", stage="localize")

    def ran(self) -> bool:
        return any(t.method != "skipped" for t in self.targets)

    @property
    def diverged(self) -> bool:
        return any(t.first for t in self.targets)


# --- references ------------------------------------------------------------------------------


class Reference(Protocol):
    """Where the expected module outputs come from (eager, stored, another runtime)."""

    name: str

    def order(self, case: str) -> list[str]:
        """The modules of ``case`` in execution order (those that ran)."""

    def nbytes(self, case: str, module: str) -> int:
        """Size of the module's output (for chunking)."""

    def values(self, case: str, modules: Sequence[str]) -> dict[str, np.ndarray]:
        """The expected outputs of ``modules`` in ``case``."""


@dataclass
class Case:
    name: str
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray] | None = None  # the expected final outputs, if known


# --- running a target ------------------------------------------------------------------------


class Workspace:
    """The model, read once: its weights written to one external-data file in a scratch
    directory, its graph (the tensors' data replaced by references to that file) kept in
    memory. Instrumented variants are small files written next to the weights, so no run
    copies or rewrites the weights; the unmodified model runs from its own file."""

    WEIGHTS = "weights.data"

    def __init__(self, model_path: Path, scratch: Path):
        onnx = import_engine("onnx")
        self.original = Path(model_path)
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        model = onnx.load(str(model_path))
        graph = self.scratch / "graph.onnx"
        onnx.save_model(model, str(graph), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=self.WEIGHTS,
                        size_threshold=1024)
        del model  # its message keeps the weights' memory even with the bytes cleared
        self.graph = onnx.load(str(graph), load_external_data=False)
        self._count = 0

    def write(self, model) -> Path:
        onnx = import_engine("onnx")
        self._count += 1
        path = self.scratch / f"m{self._count}.onnx"
        onnx.save_model(model, str(path))
        return path


class _Runner:
    """Runs models on one target. The last model loaded stays loaded, so consecutive runs of
    one model (the deployed one over the cases, one instrumented variant) load it once."""

    def __init__(self, target: str, workspace: Workspace):
        self.target = get_target(target)
        self.workspace = workspace
        self._key: str | None = None
        self._adapter = None

    def run(self, model, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(model, (str, Path)):
            key = f"file:{model}"
        else:
            key = hashlib.sha256(model.SerializeToString()).hexdigest()
        if key != self._key:
            self.close()
            path = model if isinstance(model, (str, Path)) else self.workspace.write(model)
            self._adapter = adapter_for(path, self.target).load()
            self._key = key
        return self._adapter.run(dict(feed))

    def close(self) -> None:
        if self._adapter is not None:
            self._adapter.close()
        self._adapter, self._key = None, None


def specialised(model, runner: _Runner, feed) -> tuple[Any, dict[str, bool]]:
    """``model`` with every ``If`` replaced by the branch this target takes on ``feed``."""
    taken: dict[str, bool] = {}
    while conditions := bd.if_conditions(model):
        bools = {c: 9 for c in conditions.values()}  # ONNX BOOL: an If's condition
        values = runner.run(bd.expose(model, list(bools), bools), feed)
        choice = {n: bool(np.asarray(values[c]).reshape(-1)[0]) for n, c in conditions.items()}
        taken.update(choice)
        model = bd.specialise(model, choice)
    return model, taken


def _pick(cands: Sequence[bd.Candidate], actual: Mapping[str, np.ndarray],
          expected: np.ndarray) -> tuple[str, np.ndarray] | None:
    """The module's output among its boundary tensors: the last one with the expected shape
    (else the last with as many elements, reshaped)."""
    for same_shape in (True, False):
        for cand in sorted(cands, key=lambda c: -c.position):
            value = actual.get(cand.tensor)
            if value is None:
                continue
            if value.shape == expected.shape or (not same_shape and value.size == expected.size):
                return cand.tensor, value.reshape(expected.shape)
    return None


@dataclass
class _Tally:
    """Worst metrics of one module over the cases."""

    rows: dict[str, ModuleError] = field(default_factory=dict)

    def add(self, case: str, module: str, tensor: str, actual, expected, tolerance) -> bool:
        row = self.rows.setdefault(module, ModuleError(module, module.count(".") + 1, tensor,
                                                       "pass"))
        if actual is None:
            if row.verdict == "pass" and row.max_abs is None:
                row.verdict = "unmatched"
                row.message = "no boundary tensor of this module has its output's shape"
            return True
        result = compare(actual, expected, tolerance)
        m = result.metrics
        row.tensor = row.tensor or tensor
        if row.verdict == "unmatched":
            row.verdict, row.message = "pass", ""
        row.max_abs = _worst(row.max_abs, m.max_abs, max)
        row.max_rel = _worst(row.max_rel, m.max_rel, max)
        row.cosine = _worst(row.cosine, m.cosine, min)
        snr = snr_db(actual, expected)
        row.snr_db = _worst(row.snr_db, None if snr is None else min(snr, SNR_CAP), min)
        if not result.passed:
            row.verdict = "fail"
            row.failed_cases.append(case)
            row.message = row.message or f"{case}: {result.reason}"
        return result.passed


def _worst(old, new, pick):
    if new is None:
        return old
    return new if old is None else pick(old, new)


def _chunks(modules: Sequence[str], size: Callable[[str], int], budget: int) -> list[list[str]]:
    chunks, current, used = [], [], 0
    for module in modules:
        n = size(module) * 3  # a module has a few boundary tensors; keep headroom
        if current and used + n > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(module)
        used += n
    return chunks + ([current] if current else [])


def _passes(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
            tolerance: Tolerance) -> bool:
    return all(compare(actual[k], v, tolerance).passed for k, v in expected.items())


def _choose(cases: Sequence[Case], finals, tolerance: Tolerance, all_cases: bool
            ) -> tuple[list[Case], bool | None]:
    """The cases to localise: the failing ones (the first, unless ``all_cases``), or, when
    none fails, the first case (every case with ``all_cases``) to show the module map; and
    whether the deployed model passed (None when no final output is known)."""
    judged = [c for c in cases if c.outputs is not None]
    failing = [c for c in judged if not _passes(finals[c.name], c.outputs, tolerance)]
    pool = failing or list(cases)
    return (pool if all_cases else pool[:1]), (not failing if judged else None)


def localize_target(workspace: Workspace, target: str, cases: Sequence[Case],
                    reference: Reference, tolerance: Tolerance, *, chunk_bytes: int = CHUNK_BYTES,
                    force_bisection: bool = False, all_cases: bool = False
                    ) -> TargetLocalization:
    """Localise on one target: exposed boundaries, or bisection when observing changes the
    answer (or ``force_bisection``)."""
    profile = get_target(target)
    ok, why = availability(profile)
    result = TargetLocalization(profile.name, "skipped", tolerance=tolerance.describe())
    if not ok:
        result.reason = why
        return result
    runner = _Runner(profile.name, workspace)
    try:
        finals = {c.name: runner.run(workspace.original, c.inputs) for c in cases}
        chosen, result.final_passed = _choose(cases, finals, tolerance, all_cases)
        result.cases = [c.name for c in chosen]
        tally, result.method, result.observation = _Tally(), "bisection", ""
        if not force_bisection:
            tally, result.observation = _exposed(workspace, runner, chosen, reference,
                                                 tolerance, finals, chunk_bytes)
            result.method = "bisection" if tally is None else "exposed"
        if tally is None or force_bisection:
            tally = _Tally()
            for case in chosen:
                spec, _ = specialised(workspace.graph, runner, case.inputs)
                _bisect_case(spec, runner, case, reference, tolerance, tally)
    finally:
        runner.close()
    order = _union_order(reference, chosen)
    result.modules = [tally.rows[m] for m in order if m in tally.rows]
    result.first = next((r.module for r in result.modules if r.verdict == "fail"), None)
    return result


def _exposed(workspace, runner, chosen, reference, tolerance, finals, chunk_bytes
             ) -> tuple[_Tally | None, str]:
    """Every module of the chosen cases from exposed runs, and what observing did to the final
    outputs; no tally when it moved them beyond the observation bound."""
    tally, bound, moved = _Tally(), observation_bound(tolerance), 0.0
    for case in chosen:
        spec, _ = specialised(workspace.graph, runner, case.inputs)
        shift, problem = _exposed_case(spec, runner, case, reference, tolerance, tally,
                                       finals[case.name], bound, chunk_bytes)
        if problem:
            return None, problem
        moved = max(moved, shift)
    return tally, (f"exposing the boundaries moved the final outputs by at most {moved:.2g} "
                   f"(trusted up to {bound.bound()}, {OBSERVATION_SHARE:g} of the policy)")


def _union_order(reference: Reference, cases: Sequence[Case]) -> list[str]:
    """The cases' execution orders merged: a module one case alone ran (an ``If`` branch)
    goes right after the module that ran before it in that case."""
    order: list[str] = []
    for case in cases:
        after = -1
        for module in reference.order(case.name):
            if module in order:
                after = order.index(module)
            else:
                after += 1
                order.insert(after, module)
    return order


def _by_module(spec) -> dict[str, list[bd.Candidate]]:
    types = bd.float_tensors(spec)
    found: dict[str, list[bd.Candidate]] = {}
    for cand in bd.candidates(spec):
        if cand.tensor in types:
            found.setdefault(cand.module, []).append(cand)
    return found


def _exposed_case(spec, runner, case, reference, tolerance, tally, plain, bound,
                  chunk_bytes) -> tuple[float, str]:
    """Compare every module of ``case`` from exposed runs, a chunk of modules at a time;
    returns how far observing moved the final outputs, and why the exposed run cannot be
    trusted ("" when it can)."""
    cands = _by_module(spec)
    types = bd.float_tensors(spec)
    modules = [m for m in reference.order(case.name) if m in cands]
    moved = 0.0
    for chunk in _chunks(modules, lambda m: reference.nbytes(case.name, m), chunk_bytes):
        tensors = [c.tensor for m in chunk for c in cands[m]]
        actual = runner.run(bd.expose(spec, tensors, types), case.inputs)
        for name, value in plain.items():
            check = compare(actual[name], value, bound)
            moved = max(moved, check.metrics.max_abs or 0.0)
            if not check.passed:
                return moved, (f"exposing {len(tensors)} boundary tensors moved output {name!r} "
                               f"({case.name}) beyond {bound.bound()} ({OBSERVATION_SHARE:g} of "
                               f"the policy): max abs {check.metrics.max_abs:.3g}; the engine "
                               "computes the observed graph differently, localised by bisection "
                               "instead")
        expected = reference.values(case.name, chunk)
        for module in chunk:
            picked = _pick(cands[module], actual, expected[module])
            tally.add(case.name, module, picked[0] if picked else "",
                      picked[1] if picked else None, expected[module], tolerance)
        del actual, expected
    return moved, ""


def _upstream(spec) -> Callable[[str], frozenset[str]]:
    """The values a value is computed from (itself included), in the main graph."""
    producers = {out: node for node in spec.graph.node for out in node.output if out}
    cache: dict[str, frozenset[str]] = {}

    def upstream(tensor: str) -> frozenset[str]:
        if tensor not in cache:
            seen, stack = set(), [tensor]
            while stack:
                name = stack.pop()
                if name in seen:
                    continue
                seen.add(name)
                node = producers.get(name)
                if node is not None:
                    stack.extend(i for i in node.input if i)
            cache[tensor] = frozenset(seen)
        return cache[tensor]

    return upstream


def _bisect_case(spec, runner, case, reference, tolerance, tally) -> None:
    """The first failing module by bisection over prefix subgraphs (each run as a deployed
    model would run). Modules are not a chain (a query, key and value projection run side by
    side), so the search narrows a set of suspects along the data flow: a failing probe keeps
    the suspects it is computed from, a passing one drops them."""
    cands = _by_module(spec)
    types = bd.float_tensors(spec)
    modules = [m for m in reference.order(case.name) if m in cands]
    if not modules:
        return
    out = {m: max(cands[m], key=lambda c: c.position).tensor for m in modules}
    upstream = _upstream(spec)

    def feeding(module: str, pool: Sequence[str]) -> list[str]:
        above = upstream(out[module])
        return [m for m in pool if out[m] in above]

    def probe(module: str) -> bool:
        expected = reference.values(case.name, [module])[module]
        for cand in sorted(cands[module], key=lambda c: -c.position):
            actual = runner.run(bd.prefix_model(spec, cand.tensor, types), case.inputs)
            value = actual[cand.tensor]
            if value.size == expected.size:
                return tally.add(case.name, module, cand.tensor, value.reshape(expected.shape),
                                 expected, tolerance)
        return tally.add(case.name, module, "", None, expected, tolerance)

    if probe(modules[-1]):
        return
    suspects, probed = feeding(modules[-1], modules), {modules[-1]}
    while unprobed := [m for m in suspects if m not in probed]:
        half = len(suspects) / 2
        module = min(unprobed, key=lambda m: abs(len(feeding(m, suspects)) - half))
        probed.add(module)
        above = feeding(module, suspects)
        suspects = [m for m in suspects if m not in above] if probe(module) else above


def localize(model_path: Path, targets: Sequence[str], cases: Sequence[Case],
             reference: Reference, policy: TolerancePolicy, precision: str, *,
             chunk_bytes: int = CHUNK_BYTES, force_bisection: Sequence[str] = (),
             all_cases: bool = False, workspace: Workspace | None = None) -> LocalizeReport:
    """Localise on every target; the report carries the run's peak memory and time. The
    model is read once for all targets (``workspace``, or one made here)."""
    if not cases:
        raise UserError("no case to localise", stage="localize",
                        hint="the golden set (or --case) must name at least one case")
    machine.reset_peak_rss()
    start = time.perf_counter()
    report = LocalizeReport(model=str(model_path), reference=reference.name,
                            precision=precision, cases=[c.name for c in cases],
                            environment=machine.software())
    finals = getattr(reference, "final_outputs", None)
    if finals is not None:
        cases = [c if c.outputs is not None else replace(c, outputs=finals(c.name))
                 for c in cases]
    scratch = tempfile.TemporaryDirectory(prefix="qcrun-localize-") if workspace is None else None
    with scratch or contextlib.nullcontext():
        space = workspace or Workspace(Path(model_path), Path(scratch.name))
        bd.check_has_scopes(space.graph, str(model_path))
        for target in targets:
            tolerance = policy.resolve(precision, target)
            report.targets.append(localize_target(
                space, target, cases, reference, tolerance, chunk_bytes=chunk_bytes,
                force_bisection=get_target(target).name in force_bisection,
                all_cases=all_cases))
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = machine.peak_rss_bytes()
    report.load = machine_load()
    return report


def machine_load() -> str:
    """The load average while the run ended (the figures of a busy machine are noisy)."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return ""
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# --- rendering -------------------------------------------------------------------------------


def _num(value, spec: str) -> str:
    if value is None:
        return "-"
    if value == SNR_CAP:
        return "inf"
    return format(value, spec)


def _rows(t: TargetLocalization) -> list[list[str]]:
    rows = []
    for r in t.modules:
        mark = "<- first" if r.module == t.first else ""
        rows.append([r.module, str(r.depth), r.verdict, _num(r.max_abs, ".3g"),
                     _num(r.max_rel, ".3g"), _num(r.cosine, ".6f"), _num(r.snr_db, ".1f"), mark])
    return rows


HEAD = ["module", "depth", "verdict", "max abs", "max rel", "cosine", "SNR dB", ""]


def summary_lines(report: LocalizeReport) -> list[str]:
    lines = []
    for t in report.targets:
        if t.method == "skipped":
            lines.append(f"{t.target}: skipped ({t.reason})")
        elif t.first:
            lines.append(f"{t.target}: first divergence at {t.first} ({_inside(t.first)}; "
                         f"{t.method}, case {', '.join(t.cases)})")
        else:
            lines.append(f"{t.target}: no module breaks the policy ({t.method})")
    peak = report.peak_rss_bytes
    timing = (f"peak memory {peak / 2**20:.0f} MiB, {report.seconds:.1f} s"
              if peak else f"{report.seconds:.1f} s (peak memory unknown here)")
    lines.append(timing + (f"; {report.load}" if report.load else ""))
    return lines


def _inside(module: str) -> str:
    parts = module.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts))]
    return "inside " + " > ".join(chain) if chain else "top-level module"


def format_table(report: LocalizeReport, *, markdown: bool = False) -> str:
    """Per target: modules in execution order with their error (terminal or Markdown)."""
    out = []
    for t in report.targets:
        title = (f"{t.target} vs {t.against or report.reference} ({report.precision}, "
                 f"{t.tolerance})")
        out.append(f"### {title}" if markdown else title)
        if t.method == "skipped":
            out.append(f"skipped: {t.reason}\n")
            continue
        out.append(f"method: {t.method}, case {', '.join(t.cases)}; {t.observation}")
        out += _table(HEAD, _rows(t), markdown)
        out.append("")
    if report.split:
        out.append(format_split(report, markdown=markdown))
    out += summary_lines(report)
    return "\n".join(out)


def render_html(report: LocalizeReport) -> str:
    """One offline page: SNR to the reference along execution order per target as inline SVG
    (the first divergence marked), the quantization/kernel split, and the tables. No script,
    no external resource."""
    from html import escape

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>qcexport localize"
             "</title><style>body{font:14px sans-serif;margin:2em}table{border-collapse:"
             "collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 6px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}"
             ".fail{background:#fdd}.first{background:#f99;font-weight:bold}"
             "</style></head><body>",
             f"<h1>Where {escape(report.model)} diverges</h1>",
             "<p>" + "<br>".join(escape(x) for x in summary_lines(report)) + "</p>",
             _plot(report)]
    if report.split:
        kernels = sorted({k for r in report.split for k in r.kernel_snr_db})
        head = ["module", "quantization SNR dB", *[f"{k} kernel SNR dB" for k in kernels],
                "larger"]
        rows = [[r.module, _num(r.quantization_snr_db, ".1f"),
                 *[_num(r.kernel_snr_db.get(k), ".1f") for k in kernels], r.larger]
                for r in report.split]
        parts.append("<h2>Quantization vs kernel error (lowest SNR first)</h2>"
                     + _html_table(head, rows, [""] * len(rows)))
    for t in report.targets:
        against = t.against or report.reference
        parts.append(f"<h2>{escape(t.target)} vs {escape(against)} ({escape(t.method)}, case "
                     f"{escape(', '.join(t.cases))})</h2><p>{escape(t.tolerance)}; "
                     f"{escape(t.observation or t.reason)}</p>")
        marks = ["first" if r.module == t.first else "fail" if r.verdict == "fail" else ""
                 for r in t.modules]
        parts.append(_html_table(HEAD, _rows(t), marks))
    return "\n".join(parts) + "</body></html>\n"


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], marks: Sequence[str]) -> str:
    from html import escape

    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"]
    for row, mark in zip(rows, marks, strict=True):
        cls = f" class='{mark}'" if mark else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{escape(x)}</td>" for x in row) + "</tr>")
    return "".join(out) + "</table>"


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
_DASHES = ("", "8 4", "2 3", "12 3 2 3", "4 4")
_PLOT_TOP = 150.0  # dB: identical values (inf) are drawn here


def _plot(report: LocalizeReport) -> str:
    """SNR (dB, higher is closer) of each module's output along execution order, one line per
    target (dashed differently: equal targets overlap), the first divergence marked."""
    from html import escape

    shown = [t for t in report.targets if t.modules]
    if not shown:
        return ""
    width, height, left, top, bottom = 1000, 320, 50, 10, 60
    n = max(len(t.modules) for t in shown)

    def x(i):
        return left + (width - left - 20) * (i / max(n - 1, 1))

    def y(db):
        db = _PLOT_TOP if db is None or db >= SNR_CAP else min(max(db, 0.0), _PLOT_TOP)
        return top + (height - top - bottom) * (1 - db / _PLOT_TOP)

    svg = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
           "role='img' aria-label='SNR along execution order' font-size='11'>"]
    for db in range(0, int(_PLOT_TOP) + 1, 30):
        label = "identical" if db == _PLOT_TOP else f"{db} dB"
        svg.append(f"<line x1='{left}' x2='{width - 20}' y1='{y(db):.1f}' y2='{y(db):.1f}' "
                   f"stroke='#eee'/><text x='0' y='{y(db) + 4:.1f}'>{label}</text>")
    for k, t in enumerate(shown):
        color, dash = _COLORS[k % len(_COLORS)], _DASHES[k % len(_DASHES)]
        points = " ".join(f"{x(i):.1f},{y(r.snr_db):.1f}" for i, r in enumerate(t.modules))
        svg.append(f"<polyline fill='none' stroke='{color}' stroke-width='{1.5 + len(shown) - k}'"
                   f" stroke-dasharray='{dash}' stroke-opacity='0.8' points='{points}'/>")
        svg.append(f"<line x1='{left + 150 * k}' x2='{left + 150 * k + 24}' y1='{height - 12}' "
                   f"y2='{height - 12}' stroke='{color}' stroke-width='3' "
                   f"stroke-dasharray='{dash}'/><text x='{left + 150 * k + 28}' "
                   f"y='{height - 8}' fill='{color}'>{escape(t.target)}</text>")
        first = next((i for i, r in enumerate(t.modules) if r.module == t.first), None)
        if first is not None:
            svg.append(f"<line x1='{x(first):.1f}' x2='{x(first):.1f}' y1='{top}' "
                       f"y2='{height - bottom}' stroke='{color}' stroke-dasharray='3 3'/>"
                       f"<text x='{x(first) + 4:.1f}' y='{top + 12 + 14 * k}' fill='{color}' "
                       "stroke='white' stroke-width='4' paint-order='stroke'>"
                       f"first: {escape(t.first)}</text>")
    svg.append(f"<text x='{left}' y='{height - 30}'>modules in execution order -&gt;  "
               "(y: SNR of the module's output against the reference)</text></svg>")
    return "".join(svg)


class RuntimeReference:
    """Another runtime as the reference (``--against TARGET``, or the fp32 model on
    onnx-reference): its final outputs (the deployed model) and its value of each module's last
    boundary tensor, computed when asked for (one chunk at a time)."""

    def __init__(self, workspace: Workspace, target: str, cases: Sequence[Case],
                 name: str | None = None):
        self.name = name or get_target(target).name
        ok, why = availability(get_target(target))
        if not ok:
            raise UserError(f"the reference target {target} cannot run here: {why}",
                            stage="localize", hint="name a target that runs here in --against")
        self.workspace = workspace
        self.runner = _Runner(target, workspace)
        self.inputs = {c.name: c.inputs for c in cases}
        self._spec: dict[str, tuple[Any, dict[str, bd.Candidate]]] = {}

    def final_outputs(self, case: str) -> dict[str, np.ndarray]:
        return self.runner.run(self.workspace.original, self.inputs[case])

    def _prepared(self, case: str):
        if case not in self._spec:
            spec, _ = specialised(self.workspace.graph, self.runner, self.inputs[case])
            last = {m: max(c, key=lambda x: x.position) for m, c in _by_module(spec).items()}
            self._spec[case] = (spec, last)
        return self._spec[case]

    def order(self, case: str) -> list[str]:
        _, last = self._prepared(case)
        return sorted(last, key=lambda m: (last[m].position, -m.count(".")))

    def nbytes(self, case: str, module: str) -> int:
        return 1 << 20  # unknown before running: chunks of about a hundred modules

    def values(self, case: str, modules: Sequence[str]) -> dict[str, np.ndarray]:
        spec, last = self._prepared(case)
        tensors = [last[m].tensor for m in modules]
        actual = self.runner.run(bd.expose(spec, tensors, bd.float_tensors(spec)),
                                 self.inputs[case])
        return {m: actual[last[m].tensor] for m in modules}

    def close(self) -> None:
        self.runner.close()


# --- quantization against kernel error -------------------------------------------------------


@dataclass
class ErrorSplit:
    """One module of a reduced-precision model: how much of its error the reduction causes
    (the model against its fp32 model, both on onnx-reference) and how much each runtime's
    kernels add (the runtime against onnx-reference on the reduced model)."""

    WRITE_NULLS: ClassVar[bool] = True

    module: str
    quantization_snr_db: float | None = None
    quantization_cosine: float | None = None
    kernel_snr_db: dict[str, float | None] = field(default_factory=dict)
    kernel_cosine: dict[str, float | None] = field(default_factory=dict)
    larger: str = ""  # "quantization" or the target whose kernels err most


def split_errors(quantization: TargetLocalization, kernels: Sequence[TargetLocalization]
                 ) -> list[ErrorSplit]:
    """Per module, both errors, ranked worst first (lowest SNR of either kind)."""
    rows = {r.module: ErrorSplit(r.module, r.snr_db, r.cosine) for r in quantization.modules}
    for t in kernels:
        for r in t.modules:
            row = rows.setdefault(r.module, ErrorSplit(r.module))
            row.kernel_snr_db[t.target] = r.snr_db
            row.kernel_cosine[t.target] = r.cosine
    for row in rows.values():
        sources = {"quantization": row.quantization_snr_db, **row.kernel_snr_db}
        known = {k: v for k, v in sources.items() if v is not None}
        row.larger = min(known, key=known.get) if known else ""
    return sorted(rows.values(), key=_split_rank)


def _split_rank(row: ErrorSplit) -> float:
    known = [v for v in (row.quantization_snr_db, *row.kernel_snr_db.values()) if v is not None]
    return min(known) if known else SNR_CAP


def localize_precision(space: Workspace, fp32_model: Path, targets: Sequence[str],
                       cases: Sequence[Case], precision: str, policy: TolerancePolicy,
                       scratch: Path, **options) -> LocalizeReport:
    """Quantization against kernel error, per module: the reduced model (``space``) on
    onnx-reference against the fp32 model on onnx-reference (under the precision's policy),
    then each other target against onnx-reference on the reduced model (the kernel policy),
    on the same cases."""
    fp32 = RuntimeReference(Workspace(fp32_model, scratch), REFERENCE_TARGET, cases,
                            name=f"fp32 model on {REFERENCE_TARGET}")
    try:
        report = localize(space.original, [REFERENCE_TARGET], cases, fp32, policy, precision,
                          workspace=space, **options)
    finally:
        fp32.close()
    quant = report.targets[0]
    quant.against = fp32.name
    chosen = [c for c in cases if c.name in quant.cases] or list(cases)
    same = RuntimeReference(space, REFERENCE_TARGET, chosen)
    try:
        kernels = localize(space.original, [t for t in targets if t != REFERENCE_TARGET],
                           chosen, same, kernel_policy(), precision, workspace=space,
                           **{**options, "all_cases": True})
    finally:
        same.close()
    for t in kernels.targets:
        t.against = f"{REFERENCE_TARGET} on the same model"
    report.reference = f"quantization: {fp32.name}; kernels: {REFERENCE_TARGET}"
    report.targets += kernels.targets
    report.split = split_errors(quant, [t for t in kernels.targets if t.modules])
    report.seconds += kernels.seconds
    report.peak_rss_bytes = max(report.peak_rss_bytes or 0, kernels.peak_rss_bytes or 0) or None
    return report


def format_split(report: LocalizeReport, *, markdown: bool = False, limit: int = 15) -> str:
    """The modules whose error is largest, quantization beside each runtime's kernels."""
    if not report.split:
        return ""
    kernels = sorted({k for r in report.split for k in r.kernel_snr_db})
    head = ["module", "quantization SNR dB", *[f"{k} kernel SNR dB" for k in kernels], "larger"]
    rows = [[r.module, _num(r.quantization_snr_db, ".1f"),
             *[_num(r.kernel_snr_db.get(k), ".1f") for k in kernels], r.larger]
            for r in report.split[:limit]]
    title = (f"quantization vs kernel error (worst {len(rows)} of {len(report.split)} modules, "
             "lowest SNR first)")
    return "\n".join([f"### {title}" if markdown else title, *_table(head, rows, markdown), ""])


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *["| " + " | ".join(r) + " |" for r in rows]]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    return ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
            for r in [head, *rows]]


# --- references without torch ----------------------------------------------------------------


class StoredReference:
    """The PyTorch module outputs stored with a golden set (``qcexport golden
    --with-intermediates``): the device's reference, without torch. Read module by module."""

    name = "stored PyTorch module outputs"

    def __init__(self, golden):
        self.golden = golden

    def _entry(self, case: str):
        entry = intermediates_entry(self.golden, case)
        if entry is None:
            read_intermediates(self.golden, case, [])  # raises: says how to store them
        return entry

    def order(self, case: str) -> list[str]:
        return list(self._entry(case).modules)

    def nbytes(self, case: str, module: str) -> int:
        spec = self._entry(case).arrays[module]
        return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize

    def values(self, case: str, modules: Sequence[str]) -> dict[str, np.ndarray]:
        return read_intermediates(self.golden, case, modules)


def kernel_policy() -> TolerancePolicy:
    """Two runtimes on one model: the kernel tolerances, whatever the target's settings."""
    return TolerancePolicy(defaults=dict(KERNEL_TOLERANCES), use_target_settings=False)


def localize_with(model_path: Path, targets: Sequence[str], cases: Sequence[Case],
                  against: Reference | str, policy: TolerancePolicy, precision: str,
                  **options) -> LocalizeReport:
    """``localize`` against a reference, or against another target by name (then the targets
    compare with it under the kernel policy, on its final outputs rather than golden ones)."""
    with tempfile.TemporaryDirectory(prefix="qcrun-localize-") as tmp:
        space = Workspace(Path(model_path), Path(tmp))
        reference = against
        if isinstance(against, str):
            cases = [replace(c, outputs=None) for c in cases]
            reference = RuntimeReference(space, against, cases)
            policy = kernel_policy()
            targets = [t for t in targets if get_target(t).name != reference.name]
        try:
            return localize(model_path, targets, cases, reference, policy, precision,
                            workspace=space, **options)
        finally:
            getattr(reference, "close", lambda: None)()

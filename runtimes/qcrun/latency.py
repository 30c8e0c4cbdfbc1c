"""Latency measurement: untimed warm-up, timed runs or a time budget, percentiles, sweeps.

Only what a user waits for is timed: ``time_calls`` times calls of an already loaded model;
session creation and compilation happen before it and are timed on their own (``time_load``).
Each run is timed separately with ``time.perf_counter_ns`` and the garbage collector is off
during the timed runs, so that a collection of an unrelated object never lands in a sample.

Percentiles interpolate linearly between the closest ranks (numpy's default, Hyndman and Fan
type 7): for samples x_0 <= ... <= x_{n-1}, the q-th percentile is read at rank
(n - 1) * q / 100. ``std`` is the sample standard deviation (n - 1 in the denominator; 0 for
one run). Throughput is runs per second over the timed runs, 1000 / mean_ms.

A sweep is a grid of sizes for named symbolic axes; ``plan_sweep`` finds the axes that
``--batch`` and ``--tokens`` size through the roles the model's manifest gives its axes (the
mechanism spec's, written at export), never by an axis's name. ``check_sweep`` says
which input axis cannot take a requested size (it is static in the model) before anything
runs, and ``synthetic_feed`` builds seeded inputs for any point from the manifest's input
specs. ``fit_growth`` fits latency = c * size^k in log-log space (least squares) and returns k.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcrun.errors import UserError
from qcrun.files import MANIFEST_FILE
from qcrun.golden import load_golden
from qcrun.inputs import fill_shape, make_inputs

PERCENTILES = (50, 90, 99)
DEFAULT_WARMUP = 3
#: With neither a run count nor a budget, time for this many seconds per (target, shape).
DEFAULT_BUDGET_S = 5.0
#: A budget never runs more than this many timed runs.
MAX_RUNS = 100_000
#: Below this many runs, p90/p99 are little more than the largest sample: say so.
FEW_RUNS = 10


# --- statistics ------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of the timed runs of one shape on one target, in milliseconds."""

    runs: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    std_ms: float
    throughput_per_s: float


def summarize(samples_s: Sequence[float]) -> LatencyStats:
    """Statistics of run times given in seconds."""
    if not samples_s:
        raise ValueError("no timed runs to summarize")
    ms = [s * 1e3 for s in samples_s]
    n = len(ms)
    mean = sum(ms) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in ms) / (n - 1)) if n > 1 else 0.0
    return LatencyStats(
        runs=n,
        min_ms=min(ms),
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=max(ms),
        mean_ms=mean,
        std_ms=std,
        throughput_per_s=1e3 / mean if mean > 0 else math.inf,
    )


# --- timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    """The raw samples of ``time_calls`` (seconds) and what happened while taking them."""

    samples_s: list[float]
    warmup: int
    budget_s: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def stats(self) -> LatencyStats:
        return summarize(self.samples_s)


def check_plan(runs: int | None, budget_s: float | None, warmup: int) -> None:
    """A UserError for a run plan that cannot be carried out (zero or negative counts)."""
    if runs is not None and runs <= 0:
        raise UserError(
            f"--runs must be a positive number of timed runs, not {runs}",
            stage="profile",
            hint="pass --runs 1 or more, or a time budget with --budget SECONDS",
        )
    if budget_s is not None and not budget_s > 0:
        raise UserError(
            f"--budget must be a positive number of seconds, not {budget_s}",
            stage="profile",
            hint="pass e.g. --budget 5, or a run count with --runs N",
        )
    if warmup < 0:
        raise UserError(
            f"--warmup must be 0 or more untimed runs, not {warmup}",
            stage="profile",
            hint="pass e.g. --warmup 3",
        )


def time_calls(
    fn: Callable[[], Any],
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int | None = None,
    budget_s: float | None = None,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then time each of the following calls.

    With ``runs``, exactly that many timed calls; with ``budget_s``, timed calls until the
    budget is spent (at least one: a budget shorter than one call reports that one call, with
    a warning); with both, whichever ends first; with neither, ``DEFAULT_BUDGET_S``.
    """
    check_plan(runs, budget_s, warmup)
    if runs is None and budget_s is None:
        budget_s = DEFAULT_BUDGET_S
    limit = runs if runs is not None else MAX_RUNS
    budget_ns = None if budget_s is None else budget_s * 1e9

    for _ in range(warmup):
        fn()
    samples: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        start = clock()
        while len(samples) < limit:
            t0 = clock()
            fn()
            t1 = clock()
            samples.append((t1 - t0) / 1e9)
            if budget_ns is not None and t1 - start >= budget_ns:
                break
    finally:
        if gc_was_enabled:
            gc.enable()

    warnings = []
    if budget_s is not None and len(samples) == 1 and samples[0] > budget_s:
        warnings.append(
            f"the time budget of {budget_s:g} s is shorter than one run ({samples[0]:.3f} s): "
            "reported 1 run, so every percentile is that run; raise --budget for statistics"
        )
    elif len(samples) < FEW_RUNS:
        warnings.append(
            f"only {len(samples)} timed runs: p90 and p99 are interpolated between the few "
            "slowest runs; use --runs or --budget for more"
        )
    return Timing(samples, warmup, budget_s, warnings)


def time_load(load: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``load`` (session creation, compilation) once: its result and its seconds."""
    t0 = time.perf_counter_ns()
    result = load()
    return result, (time.perf_counter_ns() - t0) / 1e9


# --- sweeps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One shape of a sweep: a size for each swept symbolic axis."""

    sizes: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, sizes: Mapping[str, int]) -> SweepPoint:
        return cls(tuple((k, int(v)) for k, v in sizes.items()))

    def as_dict(self) -> dict[str, int]:
        return dict(self.sizes)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.sizes) or "(no swept axes)"


def parse_sizes(text: str | None, flag: str) -> list[int]:
    """"1,4" -> [1, 4]; a UserError naming ``flag`` for anything but positive integers."""
    if text is None:
        return []
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise UserError(
                f"{flag} takes comma-separated positive integers, got {text!r}",
                stage="profile",
                hint=f"e.g. {flag} 1,4",
            ) from None
        if value <= 0:
            raise UserError(
                f"{flag} sizes must be positive, got {value}",
                stage="profile",
                hint=f"e.g. {flag} 1,4",
            )
        values.append(value)
    return list(dict.fromkeys(values))


InputSpec = Mapping[str, Any]  # {"name", "dtype", "shape": [int | str | None, ...]}

#: Visual tokens of a ViT-L/14 at 224 px (16 x 16 patches and a class token).
DEFAULT_TOKENS = 257
#: The axis roles a profile flag sizes (``--batch``, ``--tokens``), and each one's size when
#: the flag is not given and the model has an axis in that role.
ROLE_SIZES = {"batch": 1, "tokens": DEFAULT_TOKENS}


def parse_axis(text: str) -> tuple[str, list[int]]:
    """"text=6,32" -> ("text", [6, 32])."""
    name, sep, sizes = str(text).partition("=")
    name = name.strip()
    if not sep or not name:
        raise UserError(
            f"--axis takes NAME=SIZES, got {text!r}", stage="profile", hint="e.g. --axis text=32"
        )
    values = parse_sizes(sizes, f"--axis {name}")
    if not values:
        raise UserError(
            f"--axis {name} has no sizes", stage="profile", hint=f"e.g. --axis {name}=32"
        )
    return name, values


def plan_sweep(
    inputs: Sequence[InputSpec],
    *,
    roles: Mapping[str, str] | None = None,
    batch: Sequence[int] = (),
    tokens: Sequence[int] = (),
    axes: Sequence[str] = (),
) -> dict[str, list[int]]:
    """The sweep of a profile. ``roles`` maps a role to the model's axis in it (the manifest's
    ``roles``, e.g. ``{"tokens": "visual_tokens"}``): --batch and --tokens size the axis of their
    role (default ``ROLE_SIZES[role]`` when the model has that axis), every --axis NAME=SIZES
    the axis it names."""
    roles = dict(roles or {})
    symbolic = sorted({d for spec in inputs for d in spec["shape"] if isinstance(d, str)})
    given = {"batch": list(batch), "tokens": list(tokens)}
    sweep: dict[str, list[int]] = {}
    for role, sizes in given.items():
        axis = roles.get(role)
        if sizes and axis is None:
            raise UserError(
                f"--{role} sizes the model's {role} axis, but its manifest gives no axis that "
                f"role (roles: {roles or 'none'}; symbolic axes: {', '.join(symbolic) or 'none'})",
                stage="profile",
                hint="name the axis instead: --axis NAME=SIZES")
        if sizes:
            sweep[axis] = sizes
        elif axis in symbolic:
            sweep[axis] = [ROLE_SIZES[role]]
    for text in axes:
        name, sizes = parse_axis(text)
        twice = [role for role, sizes in given.items() if sizes and roles.get(role) == name]
        if twice:
            raise UserError(
                f"{name} is given twice (--{twice[0]} and --axis {name}=...)",
                stage="profile",
                hint=f"use --{twice[0]} only",
            )
        sweep[name] = sizes
    return sweep


def sweep_points(axes: Mapping[str, Sequence[int]]) -> list[SweepPoint]:
    """The grid of ``axes`` (name -> sizes), in the order given, the last axis fastest."""
    names = [n for n, v in axes.items() if v]
    grid = itertools.product(*(axes[n] for n in names))
    return [SweepPoint(tuple(zip(names, (int(v) for v in values), strict=True))) for values in grid]


def _intended_axes(
    dynamic_axes: Mapping[str, Mapping[Any, str]] | None,
) -> dict[str, dict[int, str]]:
    return {
        name: {int(axis): label for axis, label in axes.items()}
        for name, axes in (dynamic_axes or {}).items()
    }


def check_sweep(
    inputs: Sequence[InputSpec],
    axes: Mapping[str, Sequence[int]],
    dynamic_axes: Mapping[str, Mapping[Any, str]] | None = None,
) -> None:
    """A UserError listing every requested size the model's inputs cannot take.

    ``inputs`` are the model's input specs (manifest ``inputs``: symbolic axes are strings);
    ``dynamic_axes`` is what the export asked for ({input: {axis: name}}), so that an axis the
    exporter fixed can be named even though the model no longer calls it by its name.
    """
    intended = _intended_axes(dynamic_axes)
    problems = []
    symbolic = sorted({d for spec in inputs for d in spec["shape"] if isinstance(d, str)})
    for axis_name, sizes in axes.items():
        if not sizes:
            continue
        found = False
        for spec in inputs:
            for index, dim in enumerate(spec["shape"]):
                meant = intended.get(spec["name"], {}).get(index)
                if dim == axis_name:
                    found = True
                elif meant == axis_name and isinstance(dim, int):
                    found = True
                    bad = [s for s in sizes if s != dim]
                    if bad:
                        problems.append(
                            f"input {spec['name']!r} axis {index} ({axis_name!r}) is static "
                            f"({dim}) in this model, so it cannot take {axis_name}="
                            f"{','.join(map(str, bad))}"
                        )
        if not found:
            problems.append(
                f"no input has an axis named {axis_name!r} (the model's symbolic axes: "
                f"{', '.join(symbolic) or 'none'})"
            )
    if problems:
        raise UserError(
            "the requested sweep does not fit the model: " + "; ".join(problems),
            stage="profile",
            hint="re-export with those axes dynamic, or sweep only sizes the model takes",
        )


def input_shapes(
    inputs: Sequence[InputSpec],
    sizes: Mapping[str, int],
    defaults: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for ``sizes``: swept symbols take the sweep's size; other symbolic axes
    the size they have in ``defaults`` (e.g. a golden case's inputs), else 1."""
    return {spec["name"]: fill_shape(spec, sizes, (defaults or {}).get(spec["name"]))
            for spec in inputs}


def synthetic_feed(
    inputs: Sequence[InputSpec],
    sizes: Mapping[str, int],
    *,
    seed: int = 0,
    template: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded inputs at ``sizes`` by qcrun's one input rule (:func:`qcrun.inputs.make_inputs`):
    other axes and 0-d values from ``template`` (e.g. a golden case, so a run-time count such
    as a query count keeps a realistic value), integers within the template's values or the
    input's recorded range, masks with the first position kept."""
    return make_inputs(inputs, sizes, seed, template=template)


def synthetic_feeds(model) -> Callable[[Any, SweepPoint], dict[str, np.ndarray]]:
    """``feeds(manifest, point)`` of seeded synthetic inputs for a checked model directory
    (``qcrun.files.ModelDir``), with its first golden case as the template of the other axes."""
    template = golden_template(model)

    def feeds(manifest, point):
        return synthetic_feed(manifest.input_specs(), point.as_dict(), seed=0,
                              template=template)

    return feeds


def golden_template(model) -> dict[str, np.ndarray] | None:
    """The first golden case's inputs, if the model has a readable golden set: they give the
    sizes of axes that are not swept and values such as Matryoshka's m."""
    directory = model.golden_dir()
    if directory is None or not (directory / MANIFEST_FILE).is_file():
        return None
    try:
        golden = load_golden(directory)
    except UserError:
        return None
    return golden.cases[0].inputs if golden.cases else None


def input_memory_bound() -> int:
    """The most bytes one profiled shape's inputs may take: an eighth of this machine's memory
    (the model's activations and the engine's buffers are several times the inputs), at most
    4 GiB."""
    import os

    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return min(total // 8, 4 << 30)


def check_input_memory(inputs: Sequence[InputSpec], points: Sequence[SweepPoint],
                       roles: Mapping[str, str] | None = None) -> None:
    """Refuse a sweep point whose inputs alone exceed ``input_memory_bound``, naming the flag
    that asked for it (``--ROLE`` for an axis in one of ``roles``), before any array is
    allocated."""
    bound = input_memory_bound()
    flag_of = {axis: f"--{role}" for role, axis in (roles or {}).items() if role in ROLE_SIZES}
    for point in points:
        shapes = input_shapes(inputs, point.as_dict())
        size = 0
        for spec in inputs:
            count = 1
            for dim in shapes[spec["name"]]:
                count *= dim
            size += count * np.dtype(spec.get("dtype") or "float32").itemsize
        if size > bound:
            flags = ", ".join(flag_of.get(k, f"--axis {k}=...") for k, v in point.sizes if v > 1)
            raise UserError(
                f"the inputs at {point.label()} would take {size / 2**30:.3g} GiB, over the "
                f"bound of {bound / 2**30:.3g} GiB per shape (1/8 of this machine's memory, at "
                "most 4 GiB)",
                stage="profile",
                hint=f"lower {flags or 'the swept sizes'}",
            )


# --- growth ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Growth:
    """latency ~ c * size^exponent over ``sizes`` along ``axis``, other axes at ``fixed``."""

    axis: str
    fixed: dict[str, int]
    sizes: list[int]
    latencies_ms: list[float]
    exponent: float
    r2: float


def fit_exponent(sizes: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of log(value) against log(size), and its r^2."""
    if len(sizes) != len(values) or len(set(sizes)) < 2:
        raise ValueError("fitting an exponent needs two or more distinct sizes")
    x = np.log(np.asarray(sizes, dtype=np.float64))
    y = np.log(np.asarray(values, dtype=np.float64))
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(((y - (slope * x + intercept)) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return float(slope), r2


def fit_growth(points: Iterable[tuple[Mapping[str, int], float]]) -> list[Growth]:
    """Growth exponents of latency along every axis that takes two or more sizes, one fit per
    combination of the other axes. ``points`` are (sizes, latency in ms)."""
    points = [(dict(s), v) for s, v in points if v is not None and v > 0]
    axes = list(dict.fromkeys(k for s, _ in points for k in s))
    fits = []
    for axis in axes:
        groups: dict[tuple, list[tuple[int, float]]] = {}
        for sizes, value in points:
            if axis not in sizes:
                continue
            rest = tuple((k, v) for k, v in sizes.items() if k != axis)
            groups.setdefault(rest, []).append((sizes[axis], value))
        for rest, pairs in groups.items():
            pairs.sort()
            if len({p[0] for p in pairs}) < 2:
                continue
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            exponent, r2 = fit_exponent(xs, ys)
            fits.append(Growth(axis, dict(rest), xs, ys, exponent, r2))
    return fits

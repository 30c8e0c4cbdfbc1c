"""Latency profiles: what a model costs on each target, as a ``ProfileReport``.

This module runs the profile and is the public face of its parts: the records and their JSON
(``qcrun.profiling.records``), the Markdown table (``qcrun.profiling.markdown``), ONNX node ->
PyTorch module attribution (``qcrun.profiling.provenance``) and the engine's GEMM peak
(``qcrun.gemm``). Engine-specific profiling (onnxruntime's trace, OpenVINO's performance
counters, the options each reports) lives in the engine modules (``qcrun.engines``), which
use the records, so the run sits above the engines and the records below them.

``profile_model`` does, for every target (an unavailable one is skipped with the reason):

1. session creation / compilation, timed on its own (never inside a timed run);
2. per sweep point: untimed warm-up, then timed runs or a time budget (``qcrun.latency``);
3. memory: resident set size before and after loading, and the peak while running;
4. a per-op breakdown from a second session with the engine's profiler on (the engine's own
   hook: onnxruntime's profiling trace, OpenVINO's performance counters), folded to op types
   and to the PyTorch module that produced each node (``provenance``);
5. the engine's measured GEMM peak (``qcrun.gemm``); achieved FLOP/s = graph FLOPs
   (``qcrun.flops``) / p50, and its fraction of that peak;
6. for a split model (``split``): rows of its own for the context graph (each timed run one
   ``encode``) and the query graph (each one ``query`` against a context encoded once,
   untimed), with the bytes of one context (``TargetProfile.split_points``).

The profiled session and the calibration session are separate from the timed one, so neither
the profiler's overhead nor the calibration disturbs the latency numbers. Engine options are
recorded twice: as requested, and as the engine reports them after loading (threads, hints,
providers). Each engine chooses its profile options (OpenVINO its performance defaults rather
than parity's ACCURACY hint) and says when they change what the timings mean.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcrun import machine
from qcrun.context import SplitRunner
from qcrun.engines import (
    Adapter,
    LoadFailed,
    RunFailed,
    TargetUnavailable,
    adapter_for,
    availability,
    engine_of,
    model_file,
    observe_shapes,
)
from qcrun.engines.ort import parse_ort_trace
from qcrun.errors import UserError
from qcrun.files import ModelDir
from qcrun.flops import FlopCount, count_flops
from qcrun.gemm import DEFAULT_GEMM_SIZES, gemm_model, gemm_peak
from qcrun.latency import (
    DEFAULT_BUDGET_S,
    DEFAULT_WARMUP,
    SweepPoint,
    check_plan,
    time_calls,
    time_load,
)
from qcrun.machine import current_rss_bytes, peak_rss_bytes, physical_cores, reset_peak_rss
from qcrun.profiling.provenance import Provenance, parse_scopes, provenance
from qcrun.profiling.records import (
    CONTEXT,
    DEFAULT_MODULE_DEPTH,
    ENGINE_INTERNAL,
    FORMAT,
    NO_METADATA,
    QUERY,
    TOP_LEVEL,
    Folded,
    GemmPeak,
    NodeTime,
    OpBreakdown,
    PointResult,
    ProfileReport,
    TargetProfile,
    plain,
)
from qcrun.schema import dump
from qcrun.targets import Target, get_target

__all__ = [
    "DEFAULT_GEMM_SIZES",
    "DEFAULT_MODULE_DEPTH",
    "DEFAULT_OP_RUNS",
    "ENGINE_INTERNAL",
    "FORMAT",
    "NO_METADATA",
    "TOP_LEVEL",
    "Folded",
    "GemmPeak",
    "NodeTime",
    "OpBreakdown",
    "PointResult",
    "ProfileReport",
    "Provenance",
    "TargetProfile",
    "current_rss_bytes",
    "environment",
    "gemm_model",
    "gemm_peak",
    "model_files",
    "parse_ort_trace",
    "parse_scopes",
    "peak_rss_bytes",
    "physical_cores",
    "profile_model",
    "profile_options",
    "provenance",
    "reset_peak_rss",
]

DEFAULT_OP_RUNS = 10

Feeds = Callable[[SweepPoint], Mapping[str, np.ndarray]]
Progress = Callable[[str], None]


def environment() -> dict[str, Any]:
    """Where a profile was taken: the parity environment plus CPU model, cores and memory."""
    return {**machine.software(), **machine.hardware()}


def model_files(model_path: str | Path) -> list[Path]:
    """The model file and its external data files (``<model>.*.data`` beside it)."""
    path = Path(model_path)
    files = [path]
    files += sorted(p for p in path.parent.glob(f"{path.name}.*") if p.suffix == ".data")
    files += [p for p in [path.parent / f"{path.name}.data"] if p.is_file() and p not in files]
    return files


def _max_known(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def profile_options(target: Target, *, threads: int | None = None, accuracy: bool = False,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Adapter options for a profile on ``target``: the engine's performance defaults (OpenVINO
    without the ACCURACY hint parity uses, unless ``accuracy``), ``threads`` if given."""
    options = engine_of(target).profile_options(target, threads=threads, accuracy=accuracy)
    options.update(extra or {})
    return options


def profile_model(
    model_path: str | Path,
    targets: Sequence[str | Target],
    points: Sequence[SweepPoint],
    feeds: Feeds,
    *,
    warmup: int = DEFAULT_WARMUP,
    runs: int | None = None,
    budget_s: float | None = None,
    op_runs: int = DEFAULT_OP_RUNS,
    op_point: int = -1,
    gemm_sizes: int | Sequence[int] | None = DEFAULT_GEMM_SIZES,
    count: bool = True,
    threads: int | None = None,
    accuracy: bool = False,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    model_info: Mapping[str, Any] | None = None,
    adapter_factory: Callable[..., Adapter] = adapter_for,
    progress: Progress | None = None,
    files: Any = None,
    split: ModelDir | None = None,
) -> ProfileReport:
    """Profile ``model_path`` on every target at every sweep point (see the module docstring).

    ``feeds(point)`` gives the inputs of a point (built once, shared by every target).
    ``op_runs`` profiled runs at ``points[op_point]`` give the per-op breakdown (0: none);
    ``gemm_sizes`` None skips the GEMM peak; ``count`` False skips FLOP counting.
    ``options`` maps a target name to adapter options laid over ``profile_options``.
    ``files`` (``qcrun.ir.ModelFiles``): each target reads its engine's file (OpenVINO: IR).
    ``split``: the checked directory of a split model, whose two graphs get rows of their own.
    """
    check_plan(runs, budget_s, warmup)
    if runs is None and budget_s is None:
        budget_s = DEFAULT_BUDGET_S
    if op_runs < 0:
        raise UserError(f"--op-runs must be 0 or more, not {op_runs}", stage="profile")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model file {model_path} does not exist", stage="profile",
                        hint="pass an exported model directory or .onnx file")
    resolved = [get_target(t) for t in targets]
    if not resolved:
        raise UserError("no targets given", stage="profile", hint="pass --targets ort-cpu,...")
    if not points:
        raise UserError("no sweep points", stage="profile", hint="pass --batch / --tokens sizes")
    say, info = progress or (lambda _text: None), dict(model_info or {})
    report = ProfileReport(
        model=str(model_path),
        targets=[],
        sweep=_sweep_of(points),
        plan={"warmup": warmup, "runs": runs, "budget_s": budget_s, "op_runs": op_runs,
              "gemm_sizes": gemm_sizes, "threads": threads, "accuracy": accuracy},
        model_bytes=sum(p.stat().st_size for p in model_files(model_path) if p.is_file()),
        model_info=info,
        environment=environment(),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    feed_cache = {point: {k: np.asarray(v) for k, v in feeds(point).items()} for point in points}
    flop_counts = _count_all(model_path, points, feed_cache, report, say) if count else {}
    prov = _provenance(model_path, report) if op_runs else None

    # Every target computes the declared precision (a bare model: fp32), or is skipped.
    declared = info.get("precision") or "fp32"
    for target in resolved:
        ok, reason, path = _runnable(target, declared, model_path, files)
        if not ok:
            say(f"{target.name}: skipped ({reason})")
            report.targets.append(TargetProfile(target.name, target.engine, "skipped", reason))
            continue
        opts = profile_options(target, threads=threads, accuracy=accuracy,
                               extra={"precision": declared, **((options or {}).get(target.name)
                                                                or {})})
        report.targets.append(
            _profile_target(path, target, opts, points, feed_cache, flop_counts,
                            warmup=warmup, runs=runs, budget_s=budget_s, op_runs=op_runs,
                            op_point=op_point, gemm_sizes=gemm_sizes, prov=prov,
                            precision=info.get("precision"), adapter_factory=adapter_factory,
                            say=say, split=split)
        )
    return report


def _runnable(target: Target, declared: str, model_path: Path, files
              ) -> tuple[bool, str, Path]:
    """(whether ``target`` can profile the model here, why not, the file it reads)."""
    refused = target.incompatibility(precision=declared)
    if refused:
        return False, f"it cannot compute this {declared} model: {refused}", model_path
    ok, reason = availability(target)
    if not ok or files is None:
        return ok, reason, model_path
    try:
        return True, reason, model_file(files, target)
    except UserError as e:  # an IR-only model on an engine that reads ONNX only
        return False, f"{e.args[0]}; {e.hint}", model_path


def _provenance(model_path: Path, report: ProfileReport) -> Provenance | None:
    """The model's node -> module map, or None (with a warning) when it cannot be read."""
    try:
        prov = provenance(model_path)
    except UserError as e:  # onnx missing: op types still fold, modules do not
        report.warnings.append(f"module attribution is off: {e}")
        return None
    if not prov.has_metadata:
        report.warnings.append(
            "the model's nodes carry no module metadata (namespace / "
            "pkg.torch.onnx.name_scopes), so per-module times are not available; the "
            "dynamo exporter writes it, and a simplifier or optimiser that rebuilds "
            "nodes drops it"
        )
    return prov


def _sweep_of(points: Sequence[SweepPoint]) -> dict[str, list[int]]:
    sweep: dict[str, list[int]] = {}
    for point in points:
        for axis, size in point.sizes:
            values = sweep.setdefault(axis, [])
            if size not in values:
                values.append(size)
    return sweep


def _count_all(model_path, points, feed_cache, report, say) -> dict[SweepPoint, FlopCount]:
    counts = {}
    for point in points:
        feed = feed_cache[point]
        shapes = {k: v.shape for k, v in feed.items()}
        try:
            observed = None
            try:
                observed = observe_shapes(model_path, feed)
            except (LoadFailed, RunFailed) as e:  # the model fails here: timed runs say why
                report.warnings.append(f"{point.label()}: shapes not observed ({e})")
            except UserError:  # no engine here observes shapes: shapes from inference only
                pass
            count = count_flops(model_path, shapes, observed=observed)
        except UserError as e:
            report.warnings.append(f"FLOPs not counted: {e}")
            return {}
        counts[point] = count
        report.flops[point.label()] = dump(count)
        say(f"{point.label()}: {count.total / 1e9:.3f} GFLOP"
            + ("" if count.exact else " (not exact: see the JSON)"))
    return counts


def _profile_target(model_path, target, opts, points, feed_cache, flop_counts, *, warmup, runs,
                    budget_s, op_runs, op_point, gemm_sizes, prov, precision, adapter_factory,
                    say, split=None) -> TargetProfile:
    result = TargetProfile(target.name, target.engine, "ok", options=dict(opts),
                           model_file=Path(model_path).name)
    reset = machine.reset_peak_rss()
    rss_before = machine.current_rss_bytes()
    adapter = adapter_factory(model_path, target, **opts)
    try:
        _, result.load_s = time_load(adapter.load)
    except TargetUnavailable as e:
        result.status, result.reason = "skipped", str(e)
        say(f"{target.name}: skipped ({e})")
        return result
    except LoadFailed as e:
        result.status, result.reason = "failed", str(e)
        say(f"{target.name}: load failed ({e})")
        return result
    result.inference_precision = adapter.inference_precision()
    say(f"{target.name}: loaded in {result.load_s:.3f} s"
        + (f", computing in {result.inference_precision}" if result.inference_precision else ""))
    try:
        reported, result.threads = adapter.reported_options()
        result.engine_options = plain(reported)
        rss_loaded = machine.current_rss_bytes()
        for point in points:
            result.points.append(_time_point(adapter, point, feed_cache[point],
                                             flop_counts.get(point), warmup, runs, budget_s, say,
                                             target.name))
    finally:
        adapter.close()
    result.memory = {
        "rss_before_load_bytes": rss_before,
        "rss_after_load_bytes": rss_loaded,
        # The kernel folds per-thread RSS counters into the high-water mark lazily, so the
        # mark can trail an RSS read a moment earlier: the peak is at least every RSS we saw.
        "peak_rss_bytes": _max_known(machine.peak_rss_bytes(), rss_loaded,
                                     machine.current_rss_bytes()),
        "peak_scope": "since this target's load" if reset else "process lifetime",
    }
    result.warnings += engine_of(target).profile_warnings(result.engine_options, precision)
    if any(p.error for p in result.points) and not any(p.samples_ms for p in result.points):
        result.status = "failed"
        result.reason = "; ".join(p.error for p in result.points if p.error)
    if split is not None and result.status == "ok":
        _time_split(split, target, opts, points, feed_cache, result, bool(flop_counts),
                    warmup=warmup, runs=runs, budget_s=budget_s, factory=adapter_factory, say=say)

    if op_runs and result.status == "ok":
        point = points[op_point]
        result.ops = _op_breakdown(model_path, target, opts, point, feed_cache[point], prov,
                                   warmup, op_runs, result, say)
    if gemm_sizes and result.status == "ok":
        try:
            result.gemm_peak = gemm_peak(target, opts, sizes=gemm_sizes)
        except UserError as e:
            result.warnings.append(f"GEMM peak not measured: {e}")
        else:
            say(f"{target.name}: GEMM peak {result.gemm_peak.flops_per_s / 1e9:.1f} GFLOP/s "
                f"({result.gemm_peak.size}^3)")
            for p in result.rows():
                p.peak_flops_per_s = result.gemm_peak.flops_per_s
    return result


def _time_point(adapter, point, feed, count, warmup, runs, budget_s, say, name) -> PointResult:
    checked = adapter.check_feed(feed)
    return _time_row(lambda: adapter.run(checked), _row(point, feed, count, warmup, budget_s),
                     warmup, runs, say, name)


def _row(point: SweepPoint, feed, count: FlopCount | None, warmup: int, budget_s,
         **fields) -> PointResult:
    """The untimed part of a latency row: its shape, the shapes fed, FLOPs, the plan."""
    return PointResult(sizes=point.as_dict(), input_shapes={k: list(np.shape(v))
                                                            for k, v in feed.items()},
                       warmup=warmup, budget_s=budget_s, flops=count.total if count else None,
                       flops_exact=bool(count and count.exact), **fields)


def _time_row(run: Callable[[], Any], result: PointResult, warmup, runs, say,
              name) -> PointResult:
    """``result`` with the samples of ``run`` (``qcrun.latency.time_calls``), or its error."""
    try:
        timing = time_calls(run, warmup=warmup, runs=runs, budget_s=result.budget_s)
    except RunFailed as e:
        result.error = str(e)
        say(f"{name} {result.label()}: failed ({e})")
        return result
    result.samples_ms = [s * 1e3 for s in timing.samples_s]
    result.budget_s = timing.budget_s
    result.warnings += timing.warnings
    stats = timing.stats
    say(f"{name} {result.label()}: p50 {stats.p50_ms:.3f} ms, p90 {stats.p90_ms:.3f} ms "
        f"({stats.runs} runs)")
    return result


def _time_split(model: ModelDir, target: Target, opts, points, feed_cache, result, count, *,
                warmup, runs, budget_s, factory, say) -> None:
    """A split model's rows (``TargetProfile.split_points``) at every point: its context graph,
    each timed run one ``encode``, and its query graph, each timed run one ``query`` against
    a context encoded once, untimed, beforehand (what a user pays per image and per question).
    The graphs that fail to load or run make the target failed: they are what the user runs."""
    cut = model.manifest.split
    try:
        pair = SplitRunner(model, target.name, adapter_factory=factory, **opts).load()
    except (TargetUnavailable, LoadFailed) as e:
        result.status, result.reason = "failed", f"split graphs: {e}"
        say(f"{target.name}: split graphs failed to load ({e})")
        return
    try:
        for point in points:
            image = {k: v for k, v in feed_cache[point].items() if k in cut.context_inputs}
            asked = {k: v for k, v in feed_cache[point].items() if k not in image}
            try:
                context = pair.encode(image)
            except RunFailed as e:
                result.split_points += [_row(point, {}, None, warmup, budget_s, graph=graph,
                                             error=str(e)) for graph in (CONTEXT, QUERY)]
                continue
            fed = {**asked, **context.arrays}
            for graph, file, feed, run in (
                    (CONTEXT, cut.context_model, image, lambda i=image: pair.encode(i)),
                    (QUERY, cut.query_model, fed, lambda a=asked, c=context: pair.query(c, a))):
                flops = _graph_flops(model.path / file, feed) if count else None
                row = _row(point, feed, flops, warmup, budget_s, graph=graph,
                           context_bytes=context.nbytes)
                result.split_points.append(_time_row(run, row, warmup, runs, say, target.name))
    finally:
        pair.close()
    failed = [p.error for p in result.split_points if p.error]
    if failed:
        result.status, result.reason = "failed", "split graphs: " + "; ".join(failed)


def _graph_flops(path: Path, feed) -> FlopCount | None:
    """Matrix FLOPs of one graph of a split model at the shapes fed (None: not countable)."""
    try:
        return count_flops(path, {k: np.shape(v) for k, v in feed.items()})
    except UserError:
        return None


def _op_breakdown(model_path, target, opts, point, feed, prov, warmup, op_runs, result,
                  say) -> OpBreakdown | None:
    try:
        ops = engine_of(target).op_breakdown(model_path, target, opts, feed, prov=prov,
                                             warmup=max(warmup, 1), runs=op_runs,
                                             point=point.as_dict())
    except (LoadFailed, RunFailed) as e:
        result.warnings.append(f"per-op profile failed: {e}")
        return None
    if ops is None:
        result.warnings.append(f"no per-op profiler for the {target.engine} engine")
        return None
    say(f"{target.name}: per-op profile of {op_runs} runs, {ops.total_ms:.3f} ms in nodes")
    return ops

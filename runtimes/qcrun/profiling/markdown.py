"""The Markdown summary of a profile: environment, the latency table, FLOP rates, skips,
per-op tops. Rendered from the record alone (``ProfileReport.to_markdown``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcrun.latency import SweepPoint

if TYPE_CHECKING:
    from qcrun.profiling.records import ProfileReport


def render_markdown(report: ProfileReport, *, top: int, module_depth: int | None) -> str:
    """``report`` as Markdown, with the ``top`` op types and modules per target."""
    lines = _header(report) + _latency_table(report) + _split_table(report)
    lines += _target_table(report) + _growth_table(report)
    for t in report.skipped() + report.failed():
        lines += ["", f"**{t.target} {t.status}:** {t.reason}"]
    lines += _op_tables(report, top, module_depth) + _warnings(report)
    return "\n".join(lines) + "\n"


def _header(report: ProfileReport) -> list[str]:
    """Model, machine, versions and method."""
    env = report.environment
    info = report.model_info
    lines = [f"# Latency profile: {info.get('mechanism') or Path(report.model).parent.name}", ""]
    what = ", ".join(
        f"{k} {info[k]}"
        for k in ("mechanism", "preset", "precision", "attention")
        if info.get(k)
    )
    size = _bytes(report.model_bytes) if report.model_bytes is not None else "?"
    lines.append(f"- model: `{report.model}` ({size}{', ' + what if what else ''})")
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    lines.append(
        f"- machine: {env.get('cpu', '?')}, {env.get('physical_cores', '?')} physical cores "
        f"({env.get('usable_cpus', '?')} usable CPUs), {_bytes(env.get('memory_bytes'))} RAM, "
        f"{env.get('platform', '?')}"
    )
    lines.append(f"- versions: python {env.get('python', '?')}, {versions}")
    lines.append(f"- method: {report.method()}")
    return lines


def _latency_table(report: ProfileReport) -> list[str]:
    """One row per target and shape: latency statistics and FLOP rates."""
    lines: list[str] = []
    lines += ["", "| target | shape | runs | min | p50 | p90 | p99 | max | mean | std | "
              "runs/s | GFLOP | GFLOP/s | % GEMM peak |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
              "---: | ---: | ---: |"]
    for t in report.ran():
        for p in t.rows():
            s = p.stats
            if s is None:
                lines.append(f"| {t.target} | {p.label()} | failed: {p.error} |" + " |" * 11)
                continue
            gflop = _num(p.flops / 1e9 if p.flops is not None else None, "{:.3g}")
            if p.flops is not None and not p.flops_exact:
                gflop += " (bound)"
            rate = p.achieved_flops_per_s
            share = p.fraction_of_peak
            lines.append(
                f"| {t.target} | {p.label()} | {s.runs} | {s.min_ms:.3f} | {s.p50_ms:.3f} | "
                f"{s.p90_ms:.3f} | {s.p99_ms:.3f} | {s.max_ms:.3f} | {s.mean_ms:.3f} | "
                f"{s.std_ms:.3f} | {s.throughput_per_s:.1f} | {gflop} | "
                f"{_num(rate / 1e9 if rate else None, '{:.1f}')} | "
                f"{_num(share * 100 if share is not None else None, '{:.0f}%')} |"
            )
    return lines


def _split_table(report: ProfileReport) -> list[str]:
    """A split model's graphs side by side per target and shape (``TargetProfile.split``)."""
    rows = [(t.target, r) for t in report.ran() for r in t.split_summary()]
    if not rows:
        return []
    lines = ["", "Split model: the context graph runs once per image (encode), the query graph "
             "once per question against that context (computed once, untimed, for its rows).",
             "", "| target | shape | full graph p50 | encode p50 | query p50 | full / query | "
             "queries to break even | one context |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows:
        speedup = r.per_query_speedup
        lines.append(
            f"| {name} | {r.label()} | {_num(r.full_ms, '{:.3f}')} | "
            f"{_num(r.encode_ms, '{:.3f}')} | {_num(r.query_ms, '{:.3f}')} | "
            f"{_num(speedup, '{:.2f}x')} | {_num(r.break_even, '{}')} | "
            f"{_bytes(r.context_bytes)} |")
    return lines


def _target_table(report: ProfileReport) -> list[str]:
    """One row per target: load time, threads, memory, GEMM peak, options."""
    lines: list[str] = []
    lines += ["", "Times in ms. GFLOP: matrix FLOPs (multiply-add = 2) of the graph at that "
              "shape; % GEMM peak: achieved FLOP/s (FLOPs / p50) over the engine's measured "
              "fp32 GEMM rate.", ""]
    lines += ["| target | load s | computes in | threads | peak RSS | RSS after load | "
              "GEMM peak | options |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for t in report.ran():
        peak = t.gemm_peak
        gemm = f"{peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.size}^3)" if peak else "-"
        mem = t.memory
        lines.append(
            f"| {t.target} | {_num(t.load_s, '{:.3f}')}"
            f"{f' ({t.model_file})' if t.model_file else ''} | "
            f"{t.inference_precision or 'graph types'} | {t.threads or '?'} | "
            f"{_bytes(mem.get('peak_rss_bytes'))} | {_bytes(mem.get('rss_after_load_bytes'))} "
            f"| {gemm} | {_options_text(t.engine_options)} |"
        )
    return lines


def _growth_table(report: ProfileReport) -> list[str]:
    """How latency grows along each swept axis, per target."""
    lines: list[str] = []
    growth = [(t.target, g) for t in report.ran() for g in t.growth()]
    if growth:
        lines += ["", "| target | growth along | at | sizes | exponent | r^2 |",
                  "| --- | --- | --- | --- | ---: | ---: |"]
        for name, g in growth:
            fixed = " ".join(f"{k}={v}" for k, v in g.fixed.items()) or "-"
            lines.append(
                f"| {name} | {g.axis} | {fixed} | {' -> '.join(map(str, g.sizes))} | "
                f"{g.exponent:.2f} | {g.r2:.3f} |"
            )
    return lines


def _op_tables(report: ProfileReport, top: int, module_depth: int | None) -> list[str]:
    """The top op types and modules of each per-op breakdown."""
    lines: list[str] = []
    for t in report.ran():
        if t.ops is None:
            continue
        ops = t.ops
        point = SweepPoint.of(ops.point).label()
        lines += ["", f"## {t.target}: per-op time at {point} ({ops.source}, mean of "
                  f"{ops.runs} profiled runs, {ops.total_ms:.3f} ms in nodes)", ""]
        lines += ["| op type | ms | share | nodes |", "| --- | ---: | ---: | ---: |"]
        for f in ops.by_op_type()[:top]:
            lines.append(f"| {f.key} | {f.time_ms:.3f} | {f.share:.1%} | {f.nodes} |")
        lines += ["", "| module | ms | share | nodes |", "| --- | ---: | ---: | ---: |"]
        for f in ops.by_module(module_depth)[:top]:
            lines.append(f"| {f.key} | {f.time_ms:.3f} | {f.share:.1%} | {f.nodes} |")
        for note in ops.notes:
            lines.append(f"\n_{note}_")
    return lines


def _warnings(report: ProfileReport) -> list[str]:
    """Every warning of the report, its targets and its points."""
    lines: list[str] = []
    notes = report.warnings + [f"{t.target}: {w}" for t in report.targets for w in t.warnings]
    notes += [f"{t.target} {p.label()}: {w}" for t in report.targets for p in t.rows()
              for w in p.warnings]
    if notes:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in notes]
    return lines

def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _bytes(value) -> str:
    if value is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if k != "providers") or "-"



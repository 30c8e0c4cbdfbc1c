"""A latency profile as one self-contained HTML page, with its plots drawn as inline SVG.

Nothing is loaded from anywhere (no scripts, fonts or stylesheets from a CDN), so the file
opens offline and can be mailed or attached to a review. The plots:

- latency per target: for every sweep point and target, min..max as a thin line, p50..p90 as a
  box, p99 as a tick, on a log axis (sweep points differ by orders of magnitude);
- latency vs size for every swept axis with two or more sizes (tokens, batch): p50 on log-log
  axes with the p90 as an error bar, the fitted power law dashed, its exponent in the legend,
  and a slope-1 (linear) reference;
- per-op time per target: the top op types and modules of the engine's profile.

Every number drawn is also in a table beside the plot, and the JSON report holds them all.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence

from qcrun.latency import SweepPoint, sweep_points
from qcrun.profile import DEFAULT_MODULE_DEPTH, ProfileReport, TargetProfile

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #f4f4f4; } td.l, th.l { text-align: left; }
.warn { color: #8a4b00; } .skip { color: #666; } .small { color: #555; font-size: 12px; }
svg { display: block; margin: 0.5em 0; } svg text { font: 11px system-ui, sans-serif; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _fmt_ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


class _LogScale:
    """Maps positive values to pixels on a log axis padded to whole decades."""

    def __init__(self, low: float, high: float, start: float, end: float):
        low, high = max(low, 1e-9), max(high, low * 1.0001)
        self.lo = math.floor(math.log10(low))
        self.hi = math.ceil(math.log10(high))
        if self.hi == self.lo:
            self.hi += 1
        self.start, self.end = start, end

    def __call__(self, value: float) -> float:
        frac = (math.log10(max(value, 1e-12)) - self.lo) / (self.hi - self.lo)
        return self.start + frac * (self.end - self.start)

    def ticks(self) -> list[float]:
        values = []
        for exp in range(self.lo, self.hi + 1):
            for m in (1, 2, 5):
                v = m * 10.0**exp
                if 10.0**self.lo <= v <= 10.0**self.hi:
                    values.append(v)
        return values


def _tick_label(value: float) -> str:
    return f"{value:g}" if 1e-3 <= value < 1e5 else f"{value:.0e}"


# --- latency per target ----------------------------------------------------------------------


def latency_plot(report: ProfileReport) -> str:
    """Rows of (sweep point, target): min-max line, p50-p90 box, p99 tick; log time axis."""
    rows = []
    for index, target in enumerate(report.ran()):
        for point in target.points:
            if point.stats is not None:
                rows.append((point.label(), target.target, _color(index), point.stats))
    if not rows:
        return ""
    order = {p.label(): i for i, p in enumerate(sweep_points(report.sweep))}
    rows.sort(key=lambda r: order.get(r[0], len(order)))  # stable: targets keep their order
    longest = max(len(f"{r[1]} · {r[0]}") for r in rows)
    left = max(160, 7 * longest + 16)  # room for the row labels
    right, row_h, top = left + 620, 22, 28
    height = top + row_h * len(rows) + 40
    scale = _LogScale(min(r[3].min_ms for r in rows), max(r[3].max_ms for r in rows), left, right)
    parts = [f'<text x="{left}" y="16" font-weight="bold">latency per target (ms, log scale): '
             "line min..max, box p50..p90, tick p99, dot p50</text>"]
    bottom = top + row_h * len(rows)
    for v in scale.ticks():
        x = scale(v)
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{bottom}" '
                     'stroke="#e5e5e5"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">'
                     f"{_tick_label(v)}</text>")
    for i, (label, target, color, s) in enumerate(rows):
        y = top + i * row_h + row_h / 2
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{_e(target)} · {_e(label)}</text>")
        parts.append(f'<line x1="{scale(s.min_ms):.1f}" y1="{y:.1f}" x2="{scale(s.max_ms):.1f}" '
                     f'y2="{y:.1f}" stroke="{color}" stroke-width="1.2"/>')
        x50, x90 = scale(s.p50_ms), scale(s.p90_ms)
        parts.append(f'<rect x="{x50:.1f}" y="{y - 6:.1f}" width="{max(x90 - x50, 1.5):.1f}" '
                     f'height="12" fill="{color}" fill-opacity="0.35" stroke="{color}"/>')
        parts.append(f'<circle cx="{x50:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>')
        x99 = scale(s.p99_ms)
        parts.append(f'<line x1="{x99:.1f}" y1="{y - 7:.1f}" x2="{x99:.1f}" y2="{y + 7:.1f}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{right + 8}" y="{y + 4:.1f}">p50 {_fmt_ms(s.p50_ms)} · '
                     f"p99 {_fmt_ms(s.p99_ms)}</text>")
    return _svg(right + 150, height, parts, "latency-per-target")


# --- latency vs size -------------------------------------------------------------------------


def growth_plots(report: ProfileReport) -> list[str]:
    """One log-log plot per axis that takes two or more sizes, a series per (target, others)."""
    series_by_axis: dict[str, list] = {}
    for index, target in enumerate(report.ran()):
        for fit in target.growth():
            p90 = {
                p.sizes[fit.axis]: p.stats.p90_ms
                for p in target.points
                if p.stats and all(p.sizes.get(k) == v for k, v in fit.fixed.items())
                and fit.axis in p.sizes
            }
            series_by_axis.setdefault(fit.axis, []).append((target.target, _color(index), fit, p90))
    return [_growth_plot(axis, series) for axis, series in series_by_axis.items()]


def _growth_plot(axis: str, series) -> str:
    left, right, top, bottom = 70, 640, 30, 330
    xs = [x for _, _, fit, _ in series for x in fit.sizes]
    ys = [y for _, _, fit, p90 in series for y in [*fit.latencies_ms, *p90.values()]]
    sx = _LogScale(min(xs), max(xs), left, right)
    sy = _LogScale(min(ys), max(ys), bottom, top)
    parts = [f'<text x="{left}" y="16" font-weight="bold">p50 latency vs {_e(axis)} (log-log; '
             "bars to p90; dashed: fitted power law; dotted grey: linear growth)</text>"]
    for v in sx.ticks():
        x = sx(v)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">'
                     f"{_tick_label(v)}</text>")
    for v in sy.ticks():
        y = sy(v)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{_tick_label(v)}</text>")
    parts.append(f'<text x="{(left + right) / 2}" y="{bottom + 32}" text-anchor="middle">'
                 f"{_e(axis)}</text>")
    parts.append(f'<text x="16" y="{(top + bottom) / 2}" transform="rotate(-90 16 '
                 f'{(top + bottom) / 2})" text-anchor="middle">ms</text>')
    legend_y = top + 4
    for target, color, fit, p90 in series:
        first_x, first_y = fit.sizes[0], fit.latencies_ms[0]
        last_x = fit.sizes[-1]
        # linear reference through the first point
        ref_y = first_y * last_x / first_x
        parts.append(f'<line x1="{sx(first_x):.1f}" y1="{sy(first_y):.1f}" x2="{sx(last_x):.1f}" '
                     f'y2="{sy(max(ref_y, 1e-9)):.1f}" stroke="#999" stroke-dasharray="2 3"/>')
        # fitted power law through the geometric centre of the points
        cx = sum(math.log(x) for x in fit.sizes) / len(fit.sizes)
        cy = sum(math.log(y) for y in fit.latencies_ms) / len(fit.latencies_ms)

        def fitted(x, cx=cx, cy=cy, k=fit.exponent):
            return math.exp(cy + k * (math.log(x) - cx))

        parts.append(f'<line x1="{sx(first_x):.1f}" y1="{sy(fitted(first_x)):.1f}" '
                     f'x2="{sx(last_x):.1f}" y2="{sy(fitted(last_x)):.1f}" stroke="{color}" '
                     'stroke-dasharray="6 4"/>')
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in
                          zip(fit.sizes, fit.latencies_ms, strict=True))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" '
                     'stroke-width="1.5"/>')
        for x, y in zip(fit.sizes, fit.latencies_ms, strict=True):
            if x in p90:
                parts.append(f'<line x1="{sx(x):.1f}" y1="{sy(y):.1f}" x2="{sx(x):.1f}" '
                             f'y2="{sy(p90[x]):.1f}" stroke="{color}"/>')
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">'
                         f"<title>{_e(target)} {_e(axis)}={x}: p50 {y:.3f} ms</title></circle>")
        fixed = " ".join(f"{k}={v}" for k, v in fit.fixed.items())
        label = f"{target}{' (' + fixed + ')' if fixed else ''}: exponent {fit.exponent:.2f}"
        parts.append(f'<line x1="{right + 14}" y1="{legend_y}" x2="{right + 34}" y2="{legend_y}" '
                     f'stroke="{color}" stroke-width="3"/>')
        parts.append(f'<text x="{right + 40}" y="{legend_y + 4}">{_e(label)}</text>')
        legend_y += 18
    return _svg(1000, bottom + 45, parts, f"growth-{axis}")


# --- per-op ----------------------------------------------------------------------------------


def ops_plot(target: TargetProfile, *, top: int = 10, depth: int | None = DEFAULT_MODULE_DEPTH
             ) -> str:
    """Two bar lists: top op types and top modules of the target's engine profile."""
    if target.ops is None:
        return ""
    panels = [("op type", target.ops.by_op_type()[:top]),
              ("module", target.ops.by_module(depth)[:top])]
    bar_left, bar_w, row_h = 200, 170, 18
    rows = max(len(p[1]) for p in panels)
    height = 40 + rows * row_h
    parts = []
    for column, (title, folded) in enumerate(panels):
        x0 = column * 500
        parts.append(f'<text x="{x0 + 8}" y="16" font-weight="bold">{_e(target.target)}: '
                     f"time by {title}</text>")
        longest = max((f.time_ms for f in folded), default=1.0) or 1.0
        for i, f in enumerate(folded):
            y = 30 + i * row_h
            width = bar_w * f.time_ms / longest
            parts.append(f'<text x="{x0 + bar_left - 6}" y="{y + 12}" text-anchor="end">'
                         f"{_e(_clip(f.key, 30))}</text>")
            parts.append(f'<rect x="{x0 + bar_left}" y="{y + 2}" width="{width:.1f}" height="13" '
                         f'fill="{_color(column)}" fill-opacity="0.7"><title>{_e(f.key)}: '
                         f"{f.time_ms:.3f} ms</title></rect>")
            parts.append(f'<text x="{x0 + bar_left + width + 5:.1f}" y="{y + 12}">'
                         f"{f.time_ms:.3f} ms ({f.share:.0%})</text>")
    return _svg(1000, height, parts, f"ops-{target.target}")


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _svg(width: int, height: float, parts: Sequence[str], name: str) -> str:
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-plot="{_e(name)}" '
            f'width="{width}" height="{height:.0f}" viewBox="0 0 {width} {height:.0f}" '
            f'role="img">\n{body}\n</svg>')


# --- page ------------------------------------------------------------------------------------


def render_html(report: ProfileReport, *, top: int = 10,
                module_depth: int | None = DEFAULT_MODULE_DEPTH) -> str:
    """The whole report as one HTML page (no external resources)."""
    env = report.environment
    info = report.model_info
    title = f"Latency profile: {info.get('mechanism') or report.model}"
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    facts = [
        ("model", f"{report.model} ({report.model_bytes or 0:,} bytes)"),
        ("model info", ", ".join(f"{k}: {v}" for k, v in info.items()
                                 if k in ("mechanism", "preset", "precision", "attention",
                                          "opset"))),
        ("machine", f"{env.get('cpu', '?')}; {env.get('physical_cores', '?')} physical cores, "
                    f"{env.get('usable_cpus', '?')} usable CPUs; flags "
                    f"{' '.join(env.get('cpu_flags', []))}; {env.get('platform', '?')}"),
        ("versions", f"python {env.get('python', '?')}, {versions}"),
        ("method", report.method()),
        ("created", report.created),
    ]
    out.append("<table>")
    out += [f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>' for k, v in facts]
    out.append("</table>")
    for t in report.skipped() + report.failed():
        out.append(f'<p class="skip"><b>{_e(t.target)} {_e(t.status)}:</b> {_e(t.reason)}</p>')

    out.append("<h2>Latency per target</h2>")
    out.append(latency_plot(report))
    out.append(_latency_table(report))
    out += _split_table(report)
    plots = growth_plots(report)
    if plots:
        out.append("<h2>Latency vs size</h2>")
        out += plots
        out.append(_growth_table(report))
    out.append("<h2>Engines, memory and GEMM peak</h2>")
    out.append(_engine_table(report))
    for t in report.ran():
        if t.ops is None:
            continue
        point = SweepPoint.of(t.ops.point).label()
        out.append(f"<h2>Per-op time: {_e(t.target)} at {_e(point)}</h2>")
        out.append(f'<p class="small">{_e(t.ops.source)}, mean of {t.ops.runs} profiled runs, '
                   f"{t.ops.total_ms:.3f} ms in nodes; {t.ops.module_coverage():.0%} of it "
                   "traced to a PyTorch module.</p>")
        out.append(ops_plot(t, top=top, depth=module_depth))
        for note in t.ops.notes:
            out.append(f'<p class="warn">{_e(note)}</p>')
    warnings = report.warnings + [f"{t.target}: {w}" for t in report.targets for w in t.warnings]
    warnings += [f"{t.target} {p.label()}: {w}" for t in report.targets for p in t.rows()
                 for w in p.warnings]
    if warnings:
        out.append("<h2>Warnings</h2><ul>")
        out += [f'<li class="warn">{_e(w)}</li>' for w in warnings]
        out.append("</ul>")
    out.append("<h2>Data</h2><p class=\"small\">The full report (the source of truth):</p>")
    data = json.dumps(report.to_dict(), indent=1).replace("</", "<\\/")
    out.append(f'<details><summary>JSON</summary><pre class="small">{_e(data)}</pre></details>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _latency_table(report: ProfileReport) -> str:
    head = ["target", "shape", "runs", "min", "p50", "p90", "p99", "max", "mean", "std",
            "runs/s", "GFLOP", "GFLOP/s", "% GEMM peak"]
    rows = []
    for t in report.ran():
        for p in t.rows():
            s = p.stats
            if s is None:
                rows.append([t.target, p.label(), f"failed: {p.error}"] + [""] * 11)
                continue
            rate = p.achieved_flops_per_s
            share = p.fraction_of_peak
            gflop = "-" if p.flops is None else f"{p.flops / 1e9:.3g}"
            if p.flops is not None and not p.flops_exact:
                gflop += " (bound)"
            rows.append([t.target, p.label(), s.runs, f"{s.min_ms:.3f}", f"{s.p50_ms:.3f}",
                         f"{s.p90_ms:.3f}", f"{s.p99_ms:.3f}", f"{s.max_ms:.3f}",
                         f"{s.mean_ms:.3f}", f"{s.std_ms:.3f}", f"{s.throughput_per_s:.1f}",
                         gflop, "-" if rate is None else f"{rate / 1e9:.1f}",
                         "-" if share is None else f"{share:.0%}"])
    return _table(head, rows, left=2)


def _split_table(report: ProfileReport) -> list[str]:
    """A split model's graphs side by side (``TargetProfile.split``); nothing for others."""
    rows = [[t.target, r.label(), _ms(r.full_ms), _ms(r.encode_ms), _ms(r.query_ms),
             "-" if r.per_query_speedup is None else f"{r.per_query_speedup:.2f}×",
             "-" if r.break_even is None else r.break_even,
             "?" if r.context_bytes is None else f"{r.context_bytes:,}"]
            for t in report.ran() for r in t.split_summary()]
    if not rows:
        return []
    return ["<h2>Split model: encode once, query per question</h2>",
            '<p class="small">p50 in ms. The query rows time the query graph against one '
            "context, computed once and untimed beforehand.</p>",
            _table(["target", "shape", "full graph", "encode", "query", "full / query",
                    "queries to break even", "context bytes"], rows, left=2)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _growth_table(report: ProfileReport) -> str:
    rows = []
    for t in report.ran():
        for g in t.growth():
            rows.append([t.target, g.axis, " ".join(f"{k}={v}" for k, v in g.fixed.items()),
                         " → ".join(map(str, g.sizes)),
                         " → ".join(f"{v:.3f}" for v in g.latencies_ms),
                         f"{g.exponent:.2f}", f"{g.r2:.3f}"])
    return _table(["target", "axis", "at", "sizes", "p50 ms", "exponent", "r²"], rows, left=5)


def _engine_table(report: ProfileReport) -> str:
    rows = []
    for t in report.ran():
        peak = t.gemm_peak
        mem = t.memory
        rows.append([
            t.target,
            "-" if t.load_s is None else f"{t.load_s:.3f}",
            t.threads or "?",
            _mib(mem.get("peak_rss_bytes")),
            _mib(mem.get("rss_after_load_bytes")),
            "-" if peak is None else f"{peak.flops_per_s / 1e9:.1f} ({peak.size}³)",
            ", ".join(f"{k}={v}" for k, v in t.engine_options.items()),
        ])
    return _table(["target", "load s", "threads", "peak RSS MiB", "RSS after load MiB",
                   "GEMM GFLOP/s", "engine options"], rows, left=1, last_left=True)


def _mib(value) -> str:
    return "?" if value is None else f"{value / (1 << 20):.1f}"


def _table(head, rows, *, left: int = 1, last_left: bool = False) -> str:
    def cell(tag, i, value):
        align = ' class="l"' if i < left or (last_left and i == len(head) - 1) else ""
        return f"<{tag}{align}>{_e(value)}</{tag}>"

    out = ["<table>", "<tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "\n".join(out)

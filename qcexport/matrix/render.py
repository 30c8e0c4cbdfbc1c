"""The merged matrix as Markdown (a pull-request comment), JUnit XML, JSON and one offline HTML
page with a latency plot per device (inline SVG, drawn by ``qcrun.report_html``)."""

from __future__ import annotations

import html
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from qcrun.report_html import latency_plot
from qcrun.schema import dump

from qcexport.matrix.merge import LABELS, CellOutcome, Latency, MatrixReport

ICONS = {"pass": "✅", "fail": "❌", "error": "💥", "stale": "⚠️", "missing": "❓"}
#: The page uses glyphs every system font has (a headless browser may have no emoji font).
GLYPHS = {"pass": "✓", "fail": "✗", "error": "✗", "stale": "≠", "missing": "?"}
COLORS = {"pass": "#d9f2d9", "fail": "#f8d0d0", "error": "#f8d0d0", "stale": "#fde9c4",
          "missing": "#e8e8e8"}


def to_json(report: MatrixReport) -> str:
    return json.dumps(dump(report), indent=2) + "\n"


def _grid(report: MatrixReport) -> tuple[list[tuple[str, str]], list[str],
                                         dict[tuple[str, str, str], CellOutcome]]:
    rows = list(dict.fromkeys((c.model, c.precision) for c in report.cells))
    targets = list(dict.fromkeys(c.target for c in report.cells))
    return rows, targets, {(c.model, c.precision, c.target): c for c in report.cells}


def _p50(cell: CellOutcome) -> str:
    points = [p for c in cell.checks for p in c.latency]
    return f"{min(p.p50_ms for p in points):.3g} ms" if points else ""


# --- Markdown --------------------------------------------------------------------------------


def to_markdown(report: MatrixReport) -> str:
    rows, targets, at = _grid(report)
    verdict = "passed" if report.passed else "FAILED"
    lines = [f"## qcexport parity matrix: {verdict}", "",
             f"{report.verdict_line()}.", "",
             "| model | precision | " + " | ".join(targets) + " |",
             "| --- | --- | " + " | ".join("---" for _ in targets) + " |"]
    for model, precision in rows:
        entries = []
        for target in targets:
            cell = at.get((model, precision, target))
            if cell is None:
                entries.append("")
                continue
            text = f"{ICONS[cell.status]} {LABELS[cell.status]}"
            text += f" · p50 {_p50(cell)}" if _p50(cell) else ""
            entries.append(text + ("" if cell.required else " (optional)"))
        lines.append(f"| {model} | {precision} | " + " | ".join(entries) + " |")
    problems = [c for c in report.cells if c.status != "pass"]
    if problems:
        lines += ["", "### Cells that did not pass", ""]
        for cell in problems:
            lines.append(f"- **{cell.cell}**{'' if cell.required else ' (optional)'}: "
                         + "; ".join(_md(p) for p in cell.problems))
    lines += _md_devices(report)
    lines += _md_files(report)
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_devices(report: MatrixReport) -> list[str]:
    if not report.devices:
        return []
    lines = ["", "### Devices", "", "| device | cpu | board | cells | engines |",
             "| --- | --- | --- | --- | --- |"]
    for name, device in report.devices.items():
        cells = [c.cell for c in report.cells if c.device == name]
        engines = ", ".join(f"{k} {v}" for k, v in report.engines.get(name, {}).items())
        lines.append(f"| {_md(name)} | {_md(device.cpu)} | {_md(device.board or '')} | "
                     f"{len(cells)} | {_md(engines)} |")
    return lines


def _md_files(report: MatrixReport) -> list[str]:
    lines = []
    for title, issues in (("Result files that could not be read", report.unreadable),
                          ("Results for cells not in the plan (ignored)", report.unplanned)):
        if issues:
            lines += ["", f"### {title}", ""]
            lines += [f"- `{i.path}`: {_md(i.problem)}" for i in issues]
    return lines


# --- JUnit -----------------------------------------------------------------------------------


def to_junit(report: MatrixReport) -> str:
    """A testsuite per target, a testcase per cell: a required cell that did not pass is a
    failure (its type the status: fail, error, stale, missing), an optional one is skipped."""
    targets = list(dict.fromkeys(c.target for c in report.cells))
    bad = report.failing()
    root = ET.Element("testsuites", name="qcexport matrix", tests=str(len(report.cells)),
                      failures=str(len(bad)), errors="0",
                      skipped=str(sum(not c.required and c.status != "pass"
                                      for c in report.cells)))
    for target in targets:
        cells = [c for c in report.cells if c.target == target]
        suite = ET.SubElement(root, "testsuite", name=target, tests=str(len(cells)),
                              failures=str(sum(c in bad for c in cells)), errors="0",
                              skipped=str(sum(not c.required and c.status != "pass"
                                              for c in cells)))
        for cell in cells:
            case = ET.SubElement(suite, "testcase", classname=f"matrix.{target}", name=cell.cell)
            message = "; ".join(cell.problems)
            if cell.status == "pass":
                continue
            if cell.required:
                ET.SubElement(case, "failure", message=message, type=cell.status).text = message
            else:
                ET.SubElement(case, "skipped", message=f"optional: {message}")
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto;
       max-width: 1300px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em;
  border-bottom: 1px solid #ddd; }
.verdict { font-size: 1.1em; padding: 0.4em 0.8em; border-radius: 4px; display: inline-block; }
.ok { background: #d9f2d9; } .bad { background: #f8d0d0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.cell { min-width: 150px; } td.cell b { display: block; } .small { color: #555; font-size: 12px; }
svg { display: block; margin: 0.5em 0; } svg text { font: 11px system-ui, sans-serif; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def to_html(report: MatrixReport) -> str:
    """One page, nothing loaded from anywhere: the matrix, the problems, each device with
    its latency plot, and the files that were not results."""
    verdict = "passed" if report.passed else "failed"
    body = ["<h1>qcexport parity matrix</h1>",
            f'<p class="verdict {"ok" if report.passed else "bad"}">{verdict}: '
            f"{_e(report.verdict_line())}</p>",
            f'<p class="small">plan sha256 {_e(report.plan_sha256[:16])}… · merged '
            f"{_e(report.created[:19])} UTC</p>",
            "<h2>Matrix</h2>", _html_grid(report)]
    problems = [c for c in report.cells if c.status != "pass"]
    if problems:
        body.append("<h2>Cells that did not pass</h2><ul>")
        body += [f"<li><b>{_e(c.cell)}</b>{'' if c.required else ' (optional)'}: "
                 f"{_e('; '.join(c.problems))}</li>" for c in problems]
        body.append("</ul>")
    body += _html_devices(report)
    for title, issues in (("Result files that could not be read", report.unreadable),
                          ("Results for cells not in the plan (ignored)", report.unplanned)):
        if issues:
            body.append(f"<h2>{_e(title)}</h2><ul>")
            body += [f"<li><code>{_e(i.path)}</code>: {_e(i.problem)}</li>" for i in issues]
            body.append("</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>qcexport parity matrix</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_grid(report: MatrixReport) -> str:
    rows, targets, at = _grid(report)
    out = ["<table>", "<tr><th>model</th><th>precision</th>"
           + "".join(f"<th>{_e(t)}</th>" for t in targets) + "</tr>"]
    for model, precision in rows:
        tds = []
        for target in targets:
            cell = at.get((model, precision, target))
            if cell is None:
                tds.append("<td></td>")
                continue
            p50 = _p50(cell)
            note = [f"p50 {p50}" if p50 else "", "" if cell.required else "optional",
                    cell.device or ""]
            tds.append(f'<td class="cell" style="background:{COLORS[cell.status]}" '
                       f'title="{_e("; ".join(cell.problems) or cell.cell)}">'
                       f"<b>{GLYPHS[cell.status]} {_e(LABELS[cell.status])}</b>"
                       f'<span class="small">{_e(" · ".join(n for n in note if n))}</span></td>')
        out.append(f"<tr><td>{_e(model)}</td><td>{_e(precision)}</td>{''.join(tds)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_devices(report: MatrixReport) -> list[str]:
    out = []
    for name, device in report.devices.items():
        cells = [c for c in report.cells if c.device == name]
        engines = ", ".join(f"{k} {v}" for k, v in report.engines.get(name, {}).items())
        memory = f"{device.memory_bytes / 2**30:.1f} GiB" if device.memory_bytes else "?"
        out.append(f"<h2>Device {_e(name)}</h2>")
        out.append(f'<p class="small">{_e(device.board or device.cpu)} · '
                   f"{device.physical_cores or '?'} cores · {memory} · {_e(device.platform)} · "
                   f"Python {_e(device.python)}<br>{_e(engines)}</p>")
        plot = latency_plot(_device_profile(cells))
        out.append(plot or '<p class="small">no latency measured on this device</p>')
        rows = [(c.cell, p.shape, p.runs, p.p50_ms, p.p90_ms, p.p99_ms)
                for c in cells for check in c.checks for p in check.latency]
        if rows:
            out.append("<table><tr><th>cell</th><th>shape</th><th>runs</th><th>p50 ms</th>"
                       "<th>p90 ms</th><th>p99 ms</th></tr>" + "".join(
                           f"<tr><td>{_e(cell)}</td><td>{_e(shape)}</td><td>{runs}</td>"
                           + "".join(f"<td>{v:.3g}</td>" for v in values) + "</tr>"
                           for cell, shape, runs, *values in rows) + "</table>")
    return out


@dataclass(frozen=True)
class _Point:
    stats: Latency

    def label(self) -> str:
        return self.stats.shape


@dataclass(frozen=True)
class _Series:
    target: str
    points: list[_Point]


@dataclass(frozen=True)
class _DeviceProfile:
    """What ``qcrun.report_html.latency_plot`` reads of a profile (``ran()``, ``sweep``), with
    the device's cells as its series, so the matrix draws latency as ``qcrun profile --html``
    does: min..max line, p50..p90 box, p99 tick, on a log axis."""

    series: list[_Series]
    sweep: dict = field(default_factory=dict)

    def ran(self) -> list[_Series]:
        return self.series


def _device_profile(cells: list[CellOutcome]) -> _DeviceProfile:
    series = [_Series(f"{c.model} {c.precision} {c.target}",
                      [_Point(p) for check in c.checks for p in check.latency]) for c in cells]
    return _DeviceProfile([s for s in series if s.points])

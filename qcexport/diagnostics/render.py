"""Rendering the diagnostics: PNG heatmaps (Pillow) and one offline HTML page.

Output directory::

    index.html          every figure and table, with relative links only (works offline)
    metrics.json        the numbers (``qcrun.diagnostics.analyse``), the source of truth
    img/<case>/<map>/q000.png ...   one heatmap per query over the visual token grid
    img/<case>/<map>/sheet.png      all queries of the map on one sheet
    img/<case>/<map>/heads.png      per head (with --map-heads each)
    img/<case>/*_cosine.png         pairwise cosine matrices

A heatmap is drawn over the patch grid of the visual tokens (a CLS token, when there is one,
is reported in the caption), overlaid on the image when one is given; the brightest cell is
the query's maximum and is outlined. Token counts that form no grid are drawn as a 1-D strip.
Each heatmap is scaled to its own maximum, printed in the caption.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qcrun.diagnostics import BRANCH_CHOICES, Grid, Run, token_grid
from qcrun.errors import UserError
from qcrun.files import write_atomic

from qcexport.diagnostics.inputs import require_pillow
from qcexport.replace import replace_dir

TILE = 144  # pixels on the long side of a grid heatmap
STRIP_WIDTH = 576
MAX_QUERY_FILES = 64  # per map; the sheet still shows every query
GENERATOR = "qcexport inspect"
MARKER = ".qcexport-inspect"  # in img/: the folder is ours to replace on the next run

# matplotlib's viridis at 9 evenly spaced points (perceptually uniform, colour-blind safe).
_VIRIDIS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)
_MISSING = (128, 128, 128)


def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (NaN: grey) -> uint8 RGB, viridis."""
    v = np.asarray(values, dtype=np.float64)
    missing = ~np.isfinite(v)
    pos = np.clip(np.where(missing, 0, v), 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(pos).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (pos - low)[..., None]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac
    rgb[missing] = _MISSING
    return rgb.round().astype(np.uint8)


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def heatmap(values: np.ndarray, grid: Grid, *, image=None, peak: bool = True):
    """One query's weights over the visual tokens ([tokens], CLS first when the grid has one)
    as an RGB image: the patch grid (over ``image`` when given) or a 1-D strip."""
    Image = require_pillow()
    from PIL import ImageDraw

    values = np.asarray(values, dtype=np.float64)
    if grid.rows is not None:
        cells = values[1:] if grid.cls else values
        rows, cols = grid.rows, grid.cols
        cell_w = cell_h = max(4, TILE // max(rows, cols))
    else:
        cells, rows, cols = values, 1, len(values)
        cell_w = max(1, min(24, STRIP_WIDTH // max(cols, 1)))
        cell_h = 24
    top = cells.max() if cells.size else 0.0
    scaled = cells / top if top > 0 else np.zeros_like(cells)
    grid_values = scaled.reshape(rows, cols)
    colours = colorize(grid_values)  # [rows, cols, 3]
    width, height = cols * cell_w, rows * cell_h
    heat = Image.fromarray(colours, "RGB").resize((width, height), Image.Resampling.NEAREST)
    if image is not None and grid.rows is not None:
        base = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR),
                          dtype=np.float64)
        alpha = 0.2 + 0.65 * np.kron(grid_values, np.ones((cell_h, cell_w)))[..., None]
        mixed = base * (1 - alpha) + np.asarray(heat, dtype=np.float64) * alpha
        heat = Image.fromarray(mixed.round().clip(0, 255).astype(np.uint8), "RGB")
    if peak and top > 0:
        r, c = divmod(int(cells.argmax()), cols)
        draw = ImageDraw.Draw(heat)
        box = (c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1)
        draw.rectangle(box, outline=(255, 255, 255))
        if cell_w > 4 and cell_h > 4:
            draw.rectangle((box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1), outline=(0, 0, 0))
    return heat


def captioned(tile, lines: Sequence[str]):
    """``tile`` under a white band of caption lines."""
    Image = require_pillow()
    from PIL import ImageDraw

    font = _font()
    line_h = 13
    width = max(tile.width, 96)
    out = Image.new("RGB", (width, tile.height + line_h * len(lines) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((2, 1 + i * line_h), line, fill=(20, 20, 20), font=font)
    out.paste(tile, (0, line_h * len(lines) + 3))
    return out


def blank(width: int, height: int, text: str):
    Image = require_pillow()
    from PIL import ImageDraw

    out = Image.new("RGB", (width, height), (225, 225, 225))
    ImageDraw.Draw(out).text((4, height // 2 - 6), text, fill=(90, 90, 90), font=_font())
    return out


def sheet(tiles: Sequence, columns: int = 8, gap: int = 6):
    """Tiles in rows of ``columns`` on a white sheet."""
    Image = require_pillow()
    columns = max(1, min(columns, len(tiles)))
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    out = Image.new("RGB", (columns * (w + gap) + gap, rows * (h + gap) + gap), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out.paste(tile, (gap + c * (w + gap), gap + r * (h + gap)))
    return out


def matrix(values: np.ndarray, title: str):
    """A [Q, Q] cosine matrix as an image: -1 dark, +1 bright, NaN grey."""
    Image = require_pillow()
    from PIL import ImageDraw

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    cell = max(4, min(24, 288 // max(n, 1)))
    colours = colorize((values + 1) / 2)
    img = Image.fromarray(colours, "RGB").resize((n * cell, n * cell), Image.Resampling.NEAREST)
    margin = 22
    out = Image.new("RGB", (img.width + margin + 4, img.height + margin + 16), (255, 255, 255))
    out.paste(img, (margin, margin))
    draw = ImageDraw.Draw(out)
    font = _font(10)
    draw.text((2, 2), title, fill=(20, 20, 20), font=font)
    step = max(1, -(-n // 12))
    for i in range(0, n, step):
        draw.text((margin + i * cell + 1, margin + img.height + 2), str(i), fill=(60, 60, 60),
                  font=font)
        draw.text((2, margin + i * cell), str(i), fill=(60, 60, 60), font=font)
    return out


# --- the report ------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _visual_rows(entry: Mapping[str, Any], metrics: Mapping[str, Any], p: np.ndarray,
                 tokens: int) -> list[np.ndarray | None]:
    """Per query: its weights over the visual tokens it can see, or None (sees nothing)."""
    keys = entry["keys"]
    rows: list[np.ndarray | None] = []
    for q in range(p.shape[0]):
        if keys == "visual+latents":
            rows.append(p[q, :tokens])
        elif keys == "media":
            media = metrics["media"][q]
            rows.append(None if media is None else p[q].reshape(-1, tokens)[media - 1])
        else:
            rows.append(p[q])
    return rows


def _caption(metrics: Mapping[str, Any], q: int, prefix: str) -> list[str]:
    peak, weight = metrics["peak_token"][q], metrics["peak_weight"][q]
    h = metrics["normalized_entropy"][q]
    first = f"{prefix}{q}"
    if metrics.get("media"):
        first += f" -> image {metrics['media'][q]}" if metrics["media"][q] else " (no image)"
    if peak is None:
        return [first, "sees nothing"]
    where = metrics.get("peak_cell") and metrics["peak_cell"][q]
    second = f"max {weight:.2f} @ " + (f"r{where[0]}c{where[1]}" if where else f"#{peak}")
    extra = []
    if metrics.get("cls_weight") is not None:
        extra.append(f"CLS {metrics['cls_weight'][q]:.2f}")
    if metrics.get("latent_weight") is not None:
        extra.append(f"lat {metrics['latent_weight'][q]:.2f}")
    if h is not None:
        extra.append(f"H {h:.2f}")
    return [first, second, "  ".join(extra)]


def check_output_dir(out_dir: str | Path) -> None:
    """Refuse a directory whose img/ is someone else's: a report replaces img/ wholesale."""
    old_img = Path(out_dir) / "img"
    if old_img.exists():
        _require_ours(old_img)


def _require_ours(img: Path) -> None:
    if not (img / MARKER).exists():
        raise UserError(f"{img} exists and was not written by {GENERATOR}; it would be "
                        "replaced", stage="inspect",
                        hint="choose an empty or new output directory with -o")


class _Writer:
    """Collects files under a staging directory; ``commit`` moves them into place."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        check_output_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".inspect-"))
        self.write(f"img/{MARKER}", b"written by qcexport inspect; replaced on every run\n")

    def write(self, relative: str, data: bytes) -> str:
        write_atomic(self.stage / relative, data)
        return relative

    def commit(self) -> None:
        """Replace img/ (ours, from an earlier run) and the top files, each by a rename."""
        if (self.stage / "img").exists():
            replace_dir(self.stage / "img", self.out_dir / "img", _require_ours)
        for name in ("metrics.json", "index.html"):  # the page last: it points at the rest
            if (self.stage / name).exists():
                os.replace(self.stage / name, self.out_dir / name)
        shutil.rmtree(self.stage, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def render_report(
    out_dir: str | Path,
    analysis: Mapping[str, Any],
    runs: Sequence[Run],
    descriptor: Mapping[str, Any],
    *,
    image=None,
    grid: tuple[int, int] | None = None,
    title: str = "",
    context: Mapping[str, Any] | None = None,
) -> Path:
    """Write PNGs, metrics.json and index.html into ``out_dir``; returns index.html's path."""
    out_dir = Path(out_dir)
    writer = _Writer(out_dir)
    try:
        figures = _render_figures(writer, analysis, runs, descriptor, image=image, grid=grid)
        writer.write("metrics.json", (json.dumps(analysis, indent=1) + "\n").encode())
        page = _html(analysis, descriptor, figures, title=title, context=context or {})
        writer.write("index.html", page.encode())
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return out_dir / "index.html"


def _render_figures(writer: _Writer, analysis, runs, descriptor, *, image, grid) -> dict:
    """{(case, map output) -> {"sheet", "queries": [...], "heads"}, (case, "cosine") -> ...}"""
    figures: dict = {}
    prefix = descriptor.get("query_prefix") or "q"
    sample = analysis["sample"]
    by_case = {r.case: r for r in runs}
    for case in analysis["cases"]:
        run = by_case[case["case"]]
        layout = token_grid(case["visual_tokens"], grid)
        case_dir = f"img/{_slug(case['case'])}"
        for entry, metrics in zip(descriptor["maps"], case["maps"], strict=True):
            array = np.asarray(run.outputs[entry["output"]])[sample]
            heads = array if array.ndim == 3 else None
            p = array.mean(axis=0) if heads is not None else array
            map_grid = Grid(0) if entry["keys"] == "latents" else layout
            backdrop = image if entry["keys"] != "latents" else None
            map_dir = f"{case_dir}/{_slug(entry['core'])}"
            if not metrics["ran"]:  # a routed branch that did not run: all zeros, nothing to draw
                figures[(case["case"], entry["output"])] = None
                continue
            tiles, files = [], []
            for q, row in enumerate(_visual_rows(entry, metrics, p, case["visual_tokens"])):
                if row is None:
                    tile = blank(TILE, TILE if map_grid.rows else 24, "no image")
                else:
                    row_grid = map_grid if map_grid.rows else Grid(len(row))
                    tile = heatmap(row, row_grid, image=backdrop)
                tile = captioned(tile, _caption(metrics, q, prefix))
                tiles.append(tile)
                if q < MAX_QUERY_FILES:
                    files.append(writer.write(f"{map_dir}/q{q:03d}.png", _png(tile)))
            entry_figs = {"sheet": writer.write(f"{map_dir}/sheet.png", _png(sheet(tiles))),
                          "queries": files, "skipped": max(0, len(tiles) - MAX_QUERY_FILES)}
            if heads is not None:
                head_tiles = []
                for h in range(heads.shape[0]):
                    rows = _visual_rows(entry, metrics, heads[h], case["visual_tokens"])
                    for q, row in enumerate(rows):
                        if row is None:
                            tile = blank(TILE, TILE if map_grid.rows else 24, "no image")
                        else:
                            tile = heatmap(row, map_grid if map_grid.rows else Grid(len(row)),
                                           image=backdrop)
                        head_tiles.append(captioned(tile, [f"head {h} {prefix}{q}"]))
                entry_figs["heads"] = writer.write(
                    f"{map_dir}/heads.png", _png(sheet(head_tiles, columns=p.shape[0])))
            figures[(case["case"], entry["output"])] = entry_figs
        spec = case["specialisation"]
        if spec:
            figs = {"output": writer.write(
                f"{case_dir}/output_cosine.png",
                _png(matrix(_nan(spec["output_cosine"]), f"cosine of {spec['output']}")))}
            if spec["attention_cosine"] is not None:
                figs["attention"] = writer.write(
                    f"{case_dir}/attention_cosine.png",
                    _png(matrix(_nan(spec["attention_cosine"]), "cosine of attention maps")))
            figures[(case["case"], "cosine")] = figs
    return figures


def _nan(values) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ccc;margin-top:32px}
h3{font-size:15px;margin-bottom:4px} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f4f4} td.l,th.l{text-align:left} .warn{background:#fff4d6;padding:8px;
border:1px solid #e8c75a} .tiles{display:flex;flex-wrap:wrap;gap:6px} .tiles img{border:1px
solid #eee} .bar{display:inline-block;height:10px;background:#3b528b;vertical-align:middle}
.muted{color:#777} .chosen{background:#d7f0dd} .ranx{background:#f0f0f0} figure{margin:0}
figcaption{font-size:12px;color:#555}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, spec: str = ".3f") -> str:
    return "&ndash;" if value is None else format(value, spec)


def _bar(value: float | None, scale: float = 1.0, width: int = 80) -> str:
    if value is None:
        return ""
    w = int(round(max(0.0, min(1.0, value / scale)) * width))
    return f'<span class="bar" style="width:{w}px"></span>'


def _html(analysis, descriptor, figures, *, title: str, context: Mapping[str, Any]) -> str:
    mech = analysis.get("mechanism") or "?"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'>"
             f"<meta name='generator' content='{GENERATOR}'>"
             f"<title>{_e(title or mech)} - query-conditioning diagnostics</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Query-conditioning diagnostics: {_e(title or mech)}</h1>"]
    facts = {"mechanism": mech, **context, "heads": analysis.get("heads"),
             "queries": analysis.get("queries"), "sample": analysis.get("sample"),
             "near-duplicate threshold": analysis.get("threshold")}
    parts.append("<table>" + "".join(f"<tr><th class=l>{_e(k)}</th><td class=l>{_e(v)}</td></tr>"
                                     for k, v in facts.items() if v is not None) + "</table>")
    parts.append("<p>Numbers: <a href='metrics.json'>metrics.json</a>. Each heatmap is scaled to "
                 "its own maximum (caption: max weight and its cell, normalised entropy H, 1 = "
                 "uniform); the outlined cell is the maximum.</p>")
    for warning in analysis.get("warnings", []):
        parts.append(f"<p class=warn>warning: {_e(warning)}</p>")
    if analysis.get("routing_table"):
        parts.append(_branch_table_html(analysis["routing_table"]))
    if analysis.get("sweep"):
        parts.append(_sweep_html(analysis["sweep"]))
    for case in analysis["cases"]:
        parts.append(_case_html(case, descriptor, figures))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _case_html(case, descriptor, figures) -> str:
    grid = case["grid"]
    where = (f"{grid['rows']}x{grid['cols']} patch grid" + (" + CLS token" if grid["cls"] else "")
             if grid["rows"] else "a 1-D strip (no patch grid)")
    out = [f"<h2>Case {_e(case['case'])}</h2>",
           f"<p>{case['visual_tokens']} visual tokens, drawn as {_e(where)}.</p>"]
    if case.get("gates"):
        out.append(_gates_html(case["gates"]))
    if case.get(BRANCH_CHOICES):
        r = case[BRANCH_CHOICES]
        cells = "".join(f"<tr><td>{e['layer']}</td><td class=l>{_e(e['chosen'])}</td>"
                        f"<td class=l>{_e(e.get('ran') or '')}</td><td class=l>"
                        f"{' '.join(_num(w, '.2f') for w in e['weights'])}</td></tr>"
                        for e in r["layers"])
        out.append(f"<h3>Routing ({_e(r['mode'])})</h3><table><tr><th>layer</th>"
                   f"<th class=l>chosen</th><th class=l>ran (If)</th><th class=l>weights "
                   f"{_e(' / '.join(r['branches']))}</th></tr>{cells}</table>")
    spec = case.get("specialisation")
    if spec:
        out.append(_specialisation_html(spec, figures.get((case["case"], "cosine"), {})))
    for entry, metrics in zip(descriptor["maps"], case["maps"], strict=True):
        figs = figures[(case["case"], entry["output"])]
        out.append(f"<h3>{_e(entry['output'])} &middot; layer {entry['layer']} &middot; "
                   f"{_e(entry['label'])}</h3>")
        if figs is None:
            out.append("<p class=muted>This branch did not run for this case: its map is all "
                       "zeros.</p>")
            continue
        out.append(f"<p class=muted>mean entropy {_num(metrics['mean_entropy'], '.3f')} nats "
                   f"({_num(metrics['mean_normalized_entropy'], '.3f')} of uniform); "
                   f"<a href='{_e(figs['sheet'])}'>sheet</a>"
                   + (f", <a href='{_e(figs['heads'])}'>per head</a>" if figs.get("heads") else "")
                   + (f"; {figs['skipped']} more queries on the sheet only" if figs["skipped"]
                      else "") + "</p>")
        if figs.get("heads"):
            out.append(f"<figure><img src='{_e(figs['heads'])}' alt='per-head maps'>"
                       "<figcaption>per head</figcaption></figure>")
        out.append("<div class=tiles>" + "".join(
            f"<img src='{_e(f)}' alt='query {i}'>" for i, f in enumerate(figs["queries"]))
            + "</div>")
        out.append(_entropy_table(metrics))
    return "\n".join(out)


def _entropy_table(m) -> str:
    head = ("<tr><th>query</th><th>entropy (nats)</th><th class=l>of uniform</th>"
            "<th>peak token</th><th>peak weight</th>")
    extra_keys = [(k, label) for k, label in (("cls_weight", "CLS"), ("latent_weight", "latents"),
                                              ("media", "image")) if m.get(k) is not None]
    head += "".join(f"<th>{label}</th>" for _, label in extra_keys) + "</tr>"
    rows = []
    for q in range(m["queries"]):
        cells = [str(q), _num(m["entropy"][q]),
                 f"{_bar(m['normalized_entropy'][q])} {_num(m['normalized_entropy'][q], '.2f')}",
                 _num(m["peak_token"][q], "d"), _num(m["peak_weight"][q])]
        for key, _ in extra_keys:
            v = m[key][q]
            cells.append(_num(v, "d") if key == "media" else _num(v))
        rows.append("<tr>" + "".join(
            f"<td{' class=l' if i == 2 else ''}>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    return f"<details><summary>per-query numbers</summary><table>{head}{''.join(rows)}</table>" \
           "</details>"


def _specialisation_html(spec, figs) -> str:
    out = [f"<h3>Query specialisation ({_e(spec['output'])}, {spec['queries']} queries)</h3>",
           f"<p>mean pairwise cosine: outputs {_num(spec['mean_output_cosine'])}, attention "
           f"{_num(spec['mean_attention_cosine'])} (over {spec['maps']} maps). Near-duplicates: "
           f"pairs whose outputs and attention both have cosine &ge; {spec['threshold']}.</p>"]
    imgs = "".join(f"<figure><img src='{_e(path)}' alt='{_e(kind)} cosine'><figcaption>{_e(kind)}"
                   f" cosine (dark -1, bright +1)</figcaption></figure>"
                   for kind, path in figs.items())
    out.append(f"<div class=tiles>{imgs}</div>")
    dups = spec["near_duplicates"]
    if dups:
        rows = "".join(f"<tr><td>{d['i']}</td><td>{d['j']}</td><td>{_num(d['output_cosine'], '.4f')}"
                       f"</td><td>{_num(d['attention_cosine'], '.4f')}</td></tr>" for d in dups)
        out.append(f"<table><tr><th>query</th><th>query</th><th>output cosine</th>"
                   f"<th>attention cosine</th></tr>{rows}</table>")
    else:
        out.append("<p>No near-duplicate queries.</p>")
    return "\n".join(out)


def _gates_html(gates) -> str:
    rows = "".join(
        f"<tr><td>{g['layer']}</td><td>{_num(g.get('attention_gate'))}</td>"
        f"<td>{_num(g.get('ff_gate'))}</td><td class=l>{_bar(g.get('visual_share'))} "
        f"{_num(g.get('visual_share'))}</td><td>{_num(g.get('visual_share_max'))}</td></tr>"
        for g in gates["layers"])
    return ("<h3>Gates</h3><p>tanh(alpha) per layer, and the share of each text token's output "
            "that the block added through the gated visual path, |update| / (|h_in| + |update|),"
            " over the text tokens that see an image "
            f"({gates.get('tokens_seeing_media')}). Overall share: "
            f"{_num(gates.get('overall_visual_share'))}.</p><table><tr><th>layer</th>"
            "<th>tanh(alpha) attention</th><th>tanh(alpha) ff</th><th class=l>visual share"
            f"</th><th>max</th></tr>{rows}</table>")


def _branch_table_html(table) -> str:
    layers = max((len(r["chosen"]) for r in table["rows"]), default=0)
    head = "".join(f"<th class=l>layer {i}</th>" for i in range(layers))
    rows = []
    for r in table["rows"]:
        cells = []
        for chosen, ran in zip(r["chosen"], r["ran"], strict=True):
            note = f" <span class=muted>(ran {ran})</span>" if ran and ran != chosen else ""
            cells.append(f"<td class='l chosen'>{_e(chosen)}{note}</td>")
        rows.append(f"<tr><td class=l>{_e(r['case'])}</td>{''.join(cells)}</tr>")
    return (f"<h2>Routing</h2><p>Branch chosen by each layer for each task query "
            f"(routing {_e(table['mode'])}; branches: {_e(', '.join(table['branches']))}).</p>"
            f"<table><tr><th class=l>case</th>{head}</tr>{''.join(rows)}</table>")


def _sweep_html(sweep) -> str:
    rows = "".join(
        f"<tr><td>{r['m']}</td><td class=l>{_bar(r['relative_change'])} "
        f"{_num(r['relative_change'])}</td><td>{_num(r['pooled_cosine'], '.4f')}</td>"
        f"<td>{_num(r['first_query_cosine'], '.4f')}</td><td>{_num(r.get('mean_entropy'))}</td>"
        "</tr>" for r in sweep["rows"])
    return (f"<h2>Outputs as m grows</h2><p>Case {_e(sweep['case'])}: the first m queries' "
            f"outputs against the same queries at m = {sweep['reference_m']} (relative change "
            "of the [m, D] block), cosine of the mean-pooled output, cosine of query 0, and the "
            "mean attention entropy.</p><table><tr><th>m</th><th class=l>relative change</th>"
            "<th>pooled cosine</th><th>query-0 cosine</th><th>entropy</th></tr>"
            f"{rows}</table>")

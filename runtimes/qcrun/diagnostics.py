"""Query-conditioning diagnostics from a model's attention-map outputs, with numpy only.

A model exported with ``qcexport convert ... --with-attention-maps`` returns, after its regular
outputs, the cross-attention weights of every layer (``attn_map.<core>``: [rows, queries,
keys], or [rows, heads, queries, keys] per head) and its manifest describes them under
``attention_maps`` (the *descriptor*). From those outputs this module computes, for one sample
of each case:

- per map and query: attention entropy (nats, and as a fraction of the uniform entropy over the
  keys the query may see), the visual token with the most weight and its cell in the patch
  grid, the weight on a CLS token, on latents (Perceiver Resampler) or on each media item
  (Flamingo);
- query specialisation: pairwise cosine similarity of the query outputs and of the attention
  distributions, and the near-duplicate pairs (both cosines at or above a threshold);
- ``flamingo-xattn``: tanh(alpha) of both gates per layer and the share of the output that came
  through the gated visual path, |update| / (|h_in| + |update|), averaged over the text tokens
  that see an image;
- ``routing``: the branch each layer chose (and, with ``cond`` routing, the one that ran);
- ``matryoshka``: how the outputs move as the number of queries m grows.

The same code runs on the host (``qcexport inspect``) and on a device (``qcrun inspect``), so
both report the same numbers. The result is plain JSON-ready data; NaN becomes null.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from qcrun.errors import UserError
from qcrun.schema import dump

FORMAT = 1
DEFAULT_THRESHOLD = 0.95
# The key, in the map descriptor and in the analysis, of the branch each routed layer chose
# (a key of the manifest's and the report's formats, kept as written).
BRANCH_CHOICES = "routing"
REEXPORT_HINT = "re-export it with `qcexport convert NAME ... --with-attention-maps`"


@dataclass(frozen=True)
class Run:
    """One feed and every output the model gave for it."""

    case: str
    feed: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]


# --- the patch grid --------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """How a count of visual tokens lies on the image: a patch grid, optionally after a CLS
    token (ViT order: CLS first), or a 1-D strip when the count forms no grid."""

    WRITE_NULLS: ClassVar[bool] = True
    DERIVED: ClassVar[dict[str, Callable]] = {"layout": lambda grid: grid.layout}

    tokens: int
    rows: int | None = None
    cols: int | None = None
    cls: bool = False
    note: str | None = None  # why the tokens are drawn as a strip

    @property
    def layout(self) -> str:
        if self.rows is None:
            return "strip"
        return "grid+cls" if self.cls else "grid"

    def describe(self) -> str:
        if self.rows is None:
            return f"{self.tokens} tokens as a 1-D strip"
        return f"{self.rows}x{self.cols} patch grid" + (" + CLS token" if self.cls else "")


def parse_grid(text: str | None) -> tuple[int, int] | None:
    """'16x24' -> (16, 24); None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or 0 in (int(match.group(1)), int(match.group(2))):
        raise UserError(f"--grid {text!r} is not ROWSxCOLS", hint="e.g. --grid 16x16 or 24x32")
    return int(match.group(1)), int(match.group(2))


def token_grid(tokens: int, grid: tuple[int, int] | None = None) -> Grid:
    """The patch grid of ``tokens`` visual tokens: ``grid`` (rows, cols) when given, else a
    square; either exactly, or after one CLS token. Otherwise a strip, with a note saying so."""
    if grid is not None:
        rows, cols = grid
        if tokens == rows * cols:
            return Grid(tokens, rows, cols)
        if tokens == rows * cols + 1:
            return Grid(tokens, rows, cols, cls=True)
        return Grid(tokens, note=f"{tokens} visual tokens do not fill the {rows}x{cols} grid "
                    f"given with --grid (nor {rows}x{cols} + 1 CLS token); drawn as a 1-D strip")
    side = math.isqrt(tokens)
    if side * side == tokens:
        return Grid(tokens, side, side)
    side = math.isqrt(tokens - 1) if tokens > 1 else 0
    if side >= 2 and side * side == tokens - 1:
        return Grid(tokens, side, side, cls=True)
    return Grid(tokens, note=f"{tokens} visual tokens do not form a square patch grid (nor a "
                "square plus one CLS token); drawn as a 1-D strip (pass --grid ROWSxCOLS for a "
                "rectangular grid)")


# --- metrics ---------------------------------------------------------------------------------


def entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each distribution on the last axis; NaN where a row is all zero
    (a query that may see nothing)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
        h = -(p * logs).sum(axis=-1)
    return np.where(total > 0, h, np.nan)


def normalized_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy as a fraction of the uniform entropy over the keys a row gives weight to
    (1 = uniform, 0 = one key); a row with one visible key is 0, an empty row NaN."""
    p = np.asarray(p, dtype=np.float64)
    visible = (p > 0).sum(axis=-1)
    h = entropy(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(visible > 1, h / np.log(np.maximum(visible, 2)),
                        np.where(visible == 1, 0.0, np.nan))


def pairwise_cosine(x: np.ndarray) -> np.ndarray:
    """[Q, D] -> [Q, Q] cosine similarity of the rows; NaN for a row of zeros."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    norms = np.linalg.norm(x, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = x / norms[:, None]
        cos = np.clip(unit @ unit.T, -1.0, 1.0)
    bad = norms == 0
    cos[bad, :] = np.nan
    cos[:, bad] = np.nan
    return cos


def near_duplicates(
    output_cosine: np.ndarray | None, attention_cosine: np.ndarray | None, threshold: float
) -> list[dict[str, Any]]:
    """Pairs of queries (i < j) that are redundant: every available view (outputs, attention)
    has cosine >= ``threshold``. A view that is NaN for the pair (an empty attention row) does
    not count as agreement."""
    views = [v for v in (output_cosine, attention_cosine) if v is not None]
    if not views:
        return []
    n = len(views[0])
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            values = [v[i, j] for v in views]
            if all(np.isfinite(x) and x >= threshold for x in values):
                pairs.append({
                    "i": i, "j": j,
                    "output_cosine": None if output_cosine is None else float(output_cosine[i, j]),
                    "attention_cosine": (None if attention_cosine is None
                                         else float(attention_cosine[i, j])),
                })
    return pairs


def _offdiag_mean(cos: np.ndarray | None) -> float | None:
    if cos is None or len(cos) < 2:
        return None
    values = cos[~np.eye(len(cos), dtype=bool)]
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _cos(a: np.ndarray, b: np.ndarray) -> float | None:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.clip(a @ b / denom, -1, 1)) if denom > 0 else None


# --- reading the model's outputs -------------------------------------------------------------


def require_maps(manifest, output_names: Sequence[str], source: str) -> dict:
    """The attention-map descriptor of a model (``manifest``: a ``qcrun.files.ModelManifest``),
    or a UserError saying how to get one."""
    descriptor = manifest.attention_maps
    hint = REEXPORT_HINT
    if manifest.builtin:
        hint = (f"re-export it with `qcexport convert {manifest.mechanism} --preset "
                f"{manifest.preset or 'tiny'} --with-attention-maps`")
    if not descriptor:
        raise UserError(
            f"{source} has no attention-map outputs (its outputs: {', '.join(output_names)})",
            stage="inspect",
            hint=hint,
        )
    if descriptor.get("format") != FORMAT:
        raise UserError(f"{source}: attention-map descriptor format {descriptor.get('format')!r}"
                        f"; this qcrun reads format {FORMAT}", stage="inspect", hint=hint)
    wanted = [m["output"] for m in descriptor["maps"]]
    for key in ("gates", "visual_share", BRANCH_CHOICES):
        if descriptor.get(key):
            wanted.append(descriptor[key]["output"])
    missing = [n for n in wanted if n not in output_names]
    if missing:
        raise UserError(
            f"{source}: the manifest lists attention-map outputs the model lacks: "
            f"{', '.join(missing)}",
            stage="inspect",
            hint=hint,
        )
    return dict(descriptor)


def random_feed(
    inputs: Sequence[Mapping[str, Any]],
    descriptor: Mapping[str, Any],
    *,
    sizes: Mapping[str, int] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Inputs from the manifest's input specs by qcrun's one input rule
    (:func:`qcrun.inputs.make_inputs`), with the swept 0-d input (a query count) at its
    largest value. Symbolic axes take ``sizes``, else the sizes of the mechanism's example
    that the descriptor records."""
    from qcrun.inputs import make_inputs

    sizes = {**(descriptor.get("example_sizes") or {}), **(sizes or {})}
    feed = make_inputs(inputs, sizes, seed)
    sweep = descriptor.get("sweep") or {}
    if sweep.get("input") in feed:
        name = sweep["input"]
        feed[name] = np.full(np.shape(feed[name]), max(sweep["values"]), dtype=feed[name].dtype)
    return feed


def sweep_feeds(descriptor: Mapping[str, Any], feed: Mapping[str, np.ndarray]):
    """[(value, feed)] for the descriptor's sweep (Matryoshka: every m of interest), or []."""
    sweep = descriptor.get("sweep")
    if not sweep or sweep["input"] not in feed:
        return []
    dtype = np.asarray(feed[sweep["input"]]).dtype
    return [(int(v), {**feed, sweep["input"]: np.asarray(v, dtype=dtype)})
            for v in sweep["values"]]


def visual_tokens(descriptor: Mapping[str, Any], feed: Mapping[str, np.ndarray]) -> int:
    return int(np.shape(feed[descriptor["visual_input"]])[descriptor["token_axis"]])


def _row_count(descriptor, run: Run) -> int:
    first = descriptor["maps"][0]["output"]
    return int(np.shape(run.outputs[first])[0])


def _map_metrics(entry, array: np.ndarray, descriptor, tokens: int, grid: Grid) -> dict:
    """Metrics of one map for one row: array [Q, K] or [H, Q, K]."""
    per_head = array if array.ndim == 3 else None
    p = np.asarray(array.mean(axis=0) if per_head is not None else array, dtype=np.float64)
    q_count, k_count = p.shape
    keys = entry["keys"]
    result: dict[str, Any] = {
        "output": entry["output"], "core": entry["core"], "layer": entry["layer"],
        "label": entry["label"], "keys": keys, "queries": q_count, "key_count": k_count,
        "ran": bool(np.any(p > 0)),
    }
    if keys == "visual+latents":
        visual = p[:, :tokens]
        result["latent_weight"] = p[:, tokens:].sum(axis=1)
    elif keys == "media":
        media = k_count // tokens
        by_media = p.reshape(q_count, media, tokens)  # [Q, M, N]
        mass = by_media.sum(axis=2)  # [Q, M]
        seen = mass.sum(axis=1) > 0
        chosen = mass.argmax(axis=1)
        visual = by_media[np.arange(q_count), chosen]  # [Q, N]: the media item it attends to
        result["media"] = [int(c) + 1 if s else None for c, s in zip(chosen, seen, strict=True)]
        result["media_weight"] = mass
    else:
        visual = p
    row_has = visual.sum(axis=1) > 0
    result["entropy"] = entropy(p)
    result["normalized_entropy"] = normalized_entropy(p)
    finite = result["entropy"][np.isfinite(result["entropy"])]
    result["mean_entropy"] = float(finite.mean()) if finite.size else None
    nfinite = result["normalized_entropy"][np.isfinite(result["normalized_entropy"])]
    result["mean_normalized_entropy"] = float(nfinite.mean()) if nfinite.size else None
    peak = visual.argmax(axis=1)
    result["peak_token"] = [int(t) if h else None for t, h in zip(peak, row_has, strict=True)]
    result["peak_weight"] = [float(visual[i, t]) if h else None
                             for i, (t, h) in enumerate(zip(peak, row_has, strict=True))]
    if keys != "latents" and grid.rows is not None:
        offset = 1 if grid.cls else 0
        patches = visual[:, offset:]
        cell = patches.argmax(axis=1)
        result["peak_cell"] = [list(divmod(int(c), grid.cols)) if h else None
                               for c, h in zip(cell, row_has, strict=True)]
        if grid.cls:
            result["cls_weight"] = visual[:, 0]
    if per_head is not None:
        result["head_entropy"] = entropy(per_head)  # [H, Q]
    result["attention_cosine"] = pairwise_cosine(p)
    return result


def _specialisation(descriptor, run: Run, maps: list[dict], sample: int, threshold: float):
    name = descriptor.get("query_output")
    if not name:
        return None
    out = np.asarray(run.outputs[name])
    queries = out.shape[-2]
    rows = out.reshape(-1, queries, out.shape[-1])  # [rows, Q, D] (batch*media for a resampler)
    output_cos = pairwise_cosine(rows[sample])
    same = [m["attention_cosine"] for m in maps
            if m["same_queries"] and m["ran"] and m["queries"] == queries]
    attention_cos = None
    if same:
        with warnings.catch_warnings():  # a pair no map saw is all-NaN: NaN is the answer
            warnings.simplefilter("ignore", RuntimeWarning)
            attention_cos = np.nanmean(np.stack(same), axis=0)
    return {
        "output": name,
        "queries": queries,
        "maps": len(same),
        "output_cosine": output_cos,
        "attention_cosine": attention_cos,
        "mean_output_cosine": _offdiag_mean(output_cos),
        "mean_attention_cosine": _offdiag_mean(attention_cos),
        "near_duplicates": near_duplicates(output_cos, attention_cos, threshold),
        "threshold": threshold,
    }


def _gates(descriptor, run: Run, sample: int):
    gates = descriptor.get("gates")
    share = descriptor.get("visual_share")
    if not gates:
        return None
    values = np.asarray(run.outputs[gates["output"]], dtype=np.float64)  # [layers, 2]
    result: dict[str, Any] = {"columns": gates["columns"], "layers": []}
    shares = seeing = None
    if share:
        shares = np.asarray(run.outputs[share["output"]], dtype=np.float64)[sample]  # [L, T]
        seeing = np.asarray(run.feed[share["token_input"]])[sample] > 0  # [T]
    for layer, row in enumerate(values):
        entry = {"layer": layer, **{f"{c}_gate": float(v) for c, v in zip(
            ("attention", "ff"), row, strict=False)}}
        if shares is not None:
            entry["visual_share"] = float(shares[layer][seeing].mean()) if seeing.any() else None
            entry["visual_share_max"] = float(shares[layer][seeing].max()) if seeing.any() else None
        result["layers"].append(entry)
    if share and share.get("residual"):
        h_in = np.asarray(run.feed[share["residual"]["input"]], np.float64)[sample]
        h_out = np.asarray(run.outputs[share["residual"]["output"]], np.float64)[sample]
        added = np.linalg.norm(h_out - h_in, axis=-1)
        kept = np.linalg.norm(h_in, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            token_share = np.where(added + kept > 0, added / (added + kept), 0.0)
        result["overall_visual_share"] = (float(token_share[seeing].mean())
                                          if seeing is not None and seeing.any() else None)
        result["tokens_seeing_media"] = int(seeing.sum()) if seeing is not None else None
    return result


def _branch_choices(descriptor, run: Run, sample: int):
    choices = descriptor.get(BRANCH_CHOICES)
    if not choices:
        return None
    weights = np.asarray(run.outputs[choices["output"]], dtype=np.float64)  # [B, L, branches]
    branches = choices["branches"]
    layers = []
    for layer in range(weights.shape[1]):
        entry = {"layer": layer, "chosen": branches[int(weights[sample, layer].argmax())],
                 "weights": weights[sample, layer]}
        if choices["mode"] == "cond":  # the If runs the batch's choice
            entry["ran"] = branches[int(weights[:, layer].sum(axis=0).argmax())]
        layers.append(entry)
    return {"mode": choices["mode"], "branches": branches, "layers": layers}


def analyse_case(
    descriptor: Mapping[str, Any],
    run: Run,
    *,
    sample: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Every metric of one case (one row ``sample`` of it)."""
    rows = _row_count(descriptor, run)
    if not 0 <= sample < rows:
        raise UserError(f"case {run.case} has {rows} rows ({descriptor.get('rows', 'batch')}); "
                        f"there is no sample {sample}", stage="inspect",
                        hint=f"pass --sample from 0 to {rows - 1}")
    tokens = visual_tokens(descriptor, run.feed)
    layout = token_grid(tokens, grid)
    maps = []
    for entry in descriptor["maps"]:
        array = np.asarray(run.outputs[entry["output"]])[sample]
        metrics = _map_metrics(entry, array, descriptor, tokens, layout)
        metrics["same_queries"] = entry["same_queries"]
        maps.append(metrics)
    choices = _branch_choices(descriptor, run, sample)
    if choices:
        branch_of = descriptor[BRANCH_CHOICES].get("map_branch", {})
        for m in maps:
            m["branch"] = branch_of.get(m["output"])
    return {
        "case": run.case,
        "sample": sample,
        "visual_tokens": tokens,
        "grid": dump(layout),
        "maps": maps,
        "specialisation": _specialisation(descriptor, run, maps, sample, threshold),
        "gates": _gates(descriptor, run, sample),
        BRANCH_CHOICES: choices,
    }


def analyse_sweep(descriptor, runs: Sequence[tuple[int, Run]], *, sample: int = 0):
    """How the swept output (Matryoshka: query_outputs) changes with the swept value m:
    relative change of the first m queries against the largest m, cosine of the mean-pooled
    output, cosine of query 0, and the mean attention entropy of the first map."""
    sweep = descriptor.get("sweep")
    if not sweep or not runs:
        return None
    values = [v for v, _ in runs]
    outs = [np.asarray(r.outputs[sweep["output"]], np.float64)[sample] for _, r in runs]
    ref = outs[int(np.argmax(values))]
    first_map = descriptor["maps"][0]["output"] if descriptor["maps"] else None
    rows = []
    for value, out, (_, run) in zip(values, outs, runs, strict=True):
        m = out.shape[0]
        diff = np.linalg.norm(out - ref[:m])
        base = np.linalg.norm(ref[:m])
        row = {"m": value, "queries": m,
               "relative_change": float(diff / base) if base > 0 else None,
               "pooled_cosine": _cos(out.mean(axis=0), ref.mean(axis=0)),
               "first_query_cosine": _cos(out[0], ref[0])}
        if first_map:
            p = np.asarray(run.outputs[first_map])[sample]
            p = p.mean(axis=0) if p.ndim == 3 else p
            h = entropy(p)
            row["mean_entropy"] = float(np.nanmean(h)) if np.isfinite(h).any() else None
        rows.append(row)
    return {"input": sweep["input"], "output": sweep["output"], "reference_m": max(values),
            "case": runs[0][1].case.split("@")[0], "rows": rows}


def analyse(
    descriptor: Mapping[str, Any],
    runs: Sequence[Run],
    *,
    sweep: Sequence[tuple[int, Run]] = (),
    sample: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    grid: tuple[int, int] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The full diagnostics of ``runs`` (and of a sweep, when the model has one), as plain
    JSON-ready data."""
    notes = []
    rows = {r.case: _row_count(descriptor, r) for r in runs}
    usable = [r for r in runs if sample < rows[r.case]]
    if runs and not usable:
        analyse_case(descriptor, runs[0], sample=sample)  # raises: no such sample
    for r in runs:
        if r not in usable:
            notes.append(f"case {r.case} has {rows[r.case]} rows: no sample {sample}, skipped")
    cases = [analyse_case(descriptor, r, sample=sample, threshold=threshold, grid=grid)
             for r in usable]
    sweep_ok = not sweep or sample < _row_count(descriptor, sweep[0][1])
    if not sweep_ok:
        notes.append(f"the {descriptor['sweep']['input']} sweep ran on {sweep[0][1].case}, "
                     f"which has no sample {sample}: skipped")
    for case in cases:
        note = case["grid"]["note"]
        has_grid_maps = any(m["keys"] != "latents" for m in case["maps"])
        if note and has_grid_maps:
            notes.append(f"case {case['case']}: {note}")
    branch_table = None
    if descriptor.get(BRANCH_CHOICES):
        described = descriptor[BRANCH_CHOICES]
        branch_table = {
            "mode": described["mode"],
            "branches": described["branches"],
            "rows": [{"case": c["case"],
                      "chosen": [entry["chosen"] for entry in c[BRANCH_CHOICES]["layers"]],
                      "ran": [entry.get("ran") for entry in c[BRANCH_CHOICES]["layers"]]}
                     for c in cases],
        }
    result = {
        "format": FORMAT,
        "source": source,
        "mechanism": descriptor.get("mechanism"),
        "heads": descriptor.get("heads"),
        "queries": descriptor.get("queries"),
        "rows": descriptor.get("rows"),
        "sample": sample,
        "threshold": threshold,
        "cases": cases,
        "routing_table": branch_table,
        "sweep": analyse_sweep(descriptor, sweep, sample=sample) if sweep_ok else None,
        "warnings": notes,
    }
    return to_plain(result)


def run_all(
    descriptor: Mapping[str, Any],
    cases: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
) -> tuple[list[Run], list[tuple[int, Run]]]:
    """Run every case, and the descriptor's sweep on the case whose swept input is largest
    (the one that shows every query), with ``run(feed)``."""
    runs = [Run(name, feed, run(feed)) for name, feed in cases]
    sweep = []
    if cases:
        name, feed = sweep_base_first(descriptor, cases)[0]
        sweep = [(v, Run(f"{name}@{v}", f, run(f))) for v, f in sweep_feeds(descriptor, feed)]
    return runs, sweep


def sweep_base_first(descriptor: Mapping[str, Any], cases):
    """``cases`` with the one whose swept input is largest first."""
    sweep = descriptor.get("sweep")
    if not sweep or not cases:
        return list(cases)

    def value(item):
        feed = item[1]
        return int(np.max(feed[sweep["input"]])) if sweep["input"] in feed else -1

    best = max(range(len(cases)), key=lambda i: value(cases[i]))
    return [cases[best], *cases[:best], *cases[best + 1:]]


def to_plain(value: Any) -> Any:
    """numpy arrays and scalars -> lists and Python numbers; NaN and Inf -> None."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# --- a text summary --------------------------------------------------------------------------


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_summary(analysis: Mapping[str, Any]) -> str:
    """A short human-readable account of ``analyse``'s result."""
    lines = []
    for case in analysis["cases"]:
        grid = case["grid"]
        where = (f"{grid['rows']}x{grid['cols']} grid" + (" + CLS" if grid["cls"] else "")
                 if grid["rows"] else "1-D strip")
        lines.append(f"case {case['case']} (sample {case['sample']}): "
                     f"{case['visual_tokens']} visual tokens, {where}")
        for m in case["maps"]:
            state = "" if m["ran"] else "  (branch did not run)"
            lines.append(f"  {m['output']:<36} entropy {_fmt(m['mean_entropy'], '.2f')} nats "
                         f"({_fmt(m['mean_normalized_entropy'], '.2f')} of uniform), "
                         f"peak tokens {_peaks(m['peak_token'])}{state}")
        spec = case["specialisation"]
        if spec:
            found = spec["near_duplicates"]
            dups = ", ".join(f"q{d['i']}~q{d['j']}" for d in found[:10]) or "none"
            if len(found) > 10:
                dups = f"{len(found)} pairs: {dups}, ..."
            lines.append(f"  specialisation ({spec['output']}, {spec['queries']} queries): mean "
                         f"pairwise cosine outputs {_fmt(spec['mean_output_cosine'])}, attention "
                         f"{_fmt(spec['mean_attention_cosine'])}; near-duplicates "
                         f"(>= {spec['threshold']}): {dups}")
        gates = case["gates"]
        if gates:
            for g in gates["layers"]:
                lines.append(f"  layer {g['layer']}: tanh(alpha) attention "
                             f"{_fmt(g.get('attention_gate'))}, ff {_fmt(g.get('ff_gate'))}; "
                             f"visual share {_fmt(g.get('visual_share'))}")
            lines.append(f"  overall visual share {_fmt(gates.get('overall_visual_share'))} "
                         f"over {gates.get('tokens_seeing_media')} text tokens that see an image")
    table = analysis.get("routing_table")
    if table:
        lines.append(f"routing ({table['mode']}): branch chosen per layer")
        for row in table["rows"]:
            ran = ""
            if any(r is not None for r in row["ran"]):
                ran = f"  (ran: {', '.join(str(r) for r in row['ran'])})"
            lines.append(f"  {row['case']:<16} {', '.join(row['chosen'])}{ran}")
    sweep = analysis.get("sweep")
    if sweep:
        lines.append(f"{sweep['input']} sweep on {sweep['case']} (against m = "
                     f"{sweep['reference_m']}):")
        for row in sweep["rows"]:
            lines.append(f"  m={row['m']:<4} relative change {_fmt(row['relative_change'])}  "
                         f"pooled cosine {_fmt(row['pooled_cosine'], '.4f')}  query-0 cosine "
                         f"{_fmt(row['first_query_cosine'], '.4f')}")
    for w in analysis.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _peaks(tokens: Sequence[int | None], limit: int = 12) -> str:
    shown = ["-" if t is None else str(t) for t in tokens[:limit]]
    more = f" ... ({len(tokens)} queries)" if len(tokens) > limit else ""
    return "[" + " ".join(shown) + "]" + more


# --- a model on disk -------------------------------------------------------------------------


@dataclass(frozen=True)
class InspectSource:
    """A model directory (or unpacked bundle) ready to inspect."""

    directory: Any  # pathlib.Path
    model: Any  # pathlib.Path of the .onnx file
    manifest: Any  # qcrun.files.ModelManifest
    golden_dir: Any = None  # pathlib.Path of the golden set the directory holds, if any
    files: Any = None  # qcrun.ir.ModelFiles: ONNX and/or OpenVINO IR
    checked: Any = None  # the qcrun.files.ModelDir (a split model's graphs and cut)

    def model_for(self, target) -> Any:
        """The file ``target``'s engine reads (OpenVINO: the IR, when there is one)."""
        from qcrun.engines import model_file

        return model_file(self.files, target) if self.files is not None else self.model


def open_source(path) -> InspectSource:
    """The checked model and manifest of a model directory, or of a bundle (directory or
    archive, verified first when ``qcrun.bundle`` is there to read it)."""
    from pathlib import Path

    from qcrun.files import check_model_dir, read_model_dir

    directory = Path(path)
    try:
        from qcrun.bundle import is_bundle, resolve_model
    except ImportError:  # a qcrun without bundle support: directories only
        is_bundle = None
    if is_bundle is not None and directory.exists() and is_bundle(directory):
        model, data = resolve_model(directory)  # checks every file's hash
        checked = check_model_dir(model.parent, data, where=f"bundle {directory}",
                                  stage="inspect")
        return InspectSource(checked.path, checked.model, checked.manifest,
                             checked.golden_dir(), checked.model_files(), checked)
    if not directory.is_dir():
        hint = ("unpack the bundle archive first (tar xzf) and pass its directory"
                if str(directory).endswith((".tar.gz", ".tgz")) else
                "pass the output directory of `qcexport convert ... --with-attention-maps` or "
                "a bundle directory")
        raise UserError(f"{directory} is not a directory", stage="inspect", hint=hint)
    checked = read_model_dir(directory, stage="inspect")
    return InspectSource(checked.path, checked.model, checked.manifest, checked.golden_dir(),
                         checked.model_files(), checked)


def golden_feeds(golden, names: Sequence[str] = ()) -> list[tuple[str, dict[str, np.ndarray]]]:
    """[(case, inputs)] of a loaded golden set; ``names`` picks cases (default every case)."""
    if names and "all" not in names:
        return [(n, dict(golden.case(n).inputs)) for n in dict.fromkeys(names)]
    return [(c.name, dict(c.inputs)) for c in golden.cases]


def parse_sizes(items: Sequence[str]) -> dict[str, int]:
    """['tokens=257', 'batch=2'] -> {'tokens': 257, 'batch': 2}."""
    sizes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"--size {item!r} is not AXIS=N", stage="inspect",
                            hint="e.g. --size tokens=257 (axis names as in the manifest)")
        sizes[name.strip()] = int(value)
    return sizes

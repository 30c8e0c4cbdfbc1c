"""What a profile measured, as dataclasses that save to JSON and load back.

``ProfileReport`` is the source of truth: JSON with the environment (CPU model, cores, engine
versions), from which the Markdown table (``markdown``) and the HTML report
(``qcrun.report_html``) are rendered. Serialisation is ``qcrun.schema``'s one helper: fields
are written as they are, values computed from them (statistics, totals, folds) are listed in
each class's ``DERIVED`` and written for readers, and ignored when read back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from qcrun.errors import UserError
from qcrun.latency import Growth, LatencyStats, SweepPoint, fit_growth, summarize
from qcrun.profiling.markdown import render_markdown
from qcrun.schema import dump, parse

FORMAT = 1
KIND = "qcrun.profile"
DEFAULT_MODULE_DEPTH = 2
TOP_LEVEL = "(top level)"
NO_METADATA = "(no module metadata)"
ENGINE_INTERNAL = "(engine-internal)"
#: What a latency row timed: the model as one graph, or a split model's context graph (one
#: ``encode``) or query graph (one ``query`` against a context computed once, untimed).
FULL, CONTEXT, QUERY = "full", "context", "query"
Graph = Literal["full", "context", "query"]
GRAPHS = {FULL: "full graph", CONTEXT: "encode: context graph",
          QUERY: "query: cached context"}


def plain(value):
    """JSON-safe copy of option values (engine enums and types become strings)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass(frozen=True)
class GemmPeak:
    """The engine's fp32 GEMM rate: n x n x n MatMul models timed in this process.

    The peak is the fastest run of the best size: what the engine can reach. (The median is
    recorded too; on a shared machine a neighbour's burst slows the median, and a peak read from
    it would be too low and flatter every model measured against it.) ``rates`` holds the best
    rate of every size tried, in FLOP/s.
    """

    DERIVED: ClassVar[dict[str, Callable]] = {
        "flops_per_s": lambda g: g.flops_per_s,
        "median_flops_per_s": lambda g: g.median_flops_per_s,
    }

    size: int
    flops: int
    runs: int
    p50_ms: float
    min_ms: float
    rates: dict[int, float] = field(default_factory=dict, hash=False)

    @property
    def flops_per_s(self) -> float:
        return self.flops / (self.min_ms / 1e3)

    @property
    def median_flops_per_s(self) -> float:
        return self.flops / (self.p50_ms / 1e3)


@dataclass(frozen=True)
class NodeTime:
    """One executed engine node: its mean time per run and the ONNX node / module behind it.

    ``mapped`` says how it was traced to the ONNX graph: "name" (same node), "output" (it
    computes that ONNX node's output: a fusion), "downstream" (an engine helper traced to the
    next ONNX node it feeds), or "" (not traced).
    """

    WRITE_NULLS: ClassVar[bool] = True

    name: str
    op_type: str
    time_ms: float
    kernel: str = ""
    onnx_node: str | None = None
    onnx_op: str | None = None
    scopes: tuple[str, ...] | None = None
    mapped: str = ""

    def module(self, depth: int | None = None) -> str:
        if self.onnx_node is None:
            return ENGINE_INTERNAL
        if self.scopes is None:
            return NO_METADATA
        if not self.scopes:
            return TOP_LEVEL
        index = len(self.scopes) if depth is None else min(depth, len(self.scopes))
        return self.scopes[index - 1]


@dataclass(frozen=True)
class Folded:
    key: str
    time_ms: float
    share: float
    nodes: int


@dataclass
class OpBreakdown:
    """Per-node engine times of ``runs`` profiled runs at one sweep point."""

    DERIVED: ClassVar[dict[str, Callable]] = {
        "total_ms": lambda o: o.total_ms,
        "module_coverage": lambda o: o.module_coverage(),
        "by_op_type": lambda o: o.by_op_type(),
        "by_module": lambda o: o.by_module(),
    }

    source: str
    point: dict[str, int]
    runs: int
    nodes: list[NodeTime]
    module_metadata: bool
    notes: list[str] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(n.time_ms for n in self.nodes)

    def _fold(self, key: Callable[[NodeTime], str]) -> list[Folded]:
        times: dict[str, float] = {}
        counts: dict[str, int] = {}
        for node in self.nodes:
            k = key(node)
            times[k] = times.get(k, 0.0) + node.time_ms
            counts[k] = counts.get(k, 0) + 1
        total = self.total_ms or 1.0
        return sorted(
            (Folded(k, t, t / total, counts[k]) for k, t in times.items()),
            key=lambda f: -f.time_ms,
        )

    def by_op_type(self) -> list[Folded]:
        return self._fold(lambda n: n.op_type)

    def by_module(self, depth: int | None = DEFAULT_MODULE_DEPTH) -> list[Folded]:
        return self._fold(lambda n: n.module(depth))

    def module_coverage(self) -> float:
        """The share of the time traced to a named PyTorch module."""
        total = self.total_ms
        if not total:
            return 0.0
        named = sum(n.time_ms for n in self.nodes if n.scopes is not None and n.onnx_node)
        return named / total


@dataclass
class PointResult:
    """One sweep point on one target: its shapes, raw samples, statistics and FLOP rate."""

    WRITE_NULLS: ClassVar[bool] = True
    DERIVED: ClassVar[dict[str, Callable]] = {
        "latency": lambda p: p.stats,
        "achieved_flops_per_s": lambda p: p.achieved_flops_per_s,
        "fraction_of_peak": lambda p: p.fraction_of_peak,
    }

    sizes: dict[str, int]
    input_shapes: dict[str, list[int]]
    samples_ms: list[float] = field(default_factory=list)
    warmup: int = 0
    budget_s: float | None = None
    flops: int | None = None
    flops_exact: bool = False
    peak_flops_per_s: float | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    # which graph of a split model was timed (``GRAPHS``); "full" for every unsplit model
    graph: Graph = FULL
    # bytes of one context (the boundary tensors) at this shape: context and query rows only
    context_bytes: int | None = None

    @property
    def stats(self) -> LatencyStats | None:
        return summarize([s / 1e3 for s in self.samples_ms]) if self.samples_ms else None

    @property
    def achieved_flops_per_s(self) -> float | None:
        stats = self.stats
        if self.flops is None or stats is None or stats.p50_ms <= 0:
            return None
        return self.flops / (stats.p50_ms / 1e3)

    @property
    def fraction_of_peak(self) -> float | None:
        achieved = self.achieved_flops_per_s
        if achieved is None or not self.peak_flops_per_s:
            return None
        return achieved / self.peak_flops_per_s

    def label(self) -> str:
        """The shape, and for a split model's context and query rows the graph timed."""
        shape = SweepPoint.of(self.sizes).label()
        return shape if self.graph == FULL else f"{shape} [{GRAPHS[self.graph]}]"


@dataclass(frozen=True)
class SplitRow:
    """One shape of a split model on one target: p50 of the full graph, of the context graph
    (``encode``: once per image) and of the query graph against a cached context (per query).

    ``per_query_speedup`` is full / query; ``break_even`` the fewest queries per image for
    which encode once + N queries beats N full runs (None: the query is not faster)."""

    DERIVED: ClassVar[dict[str, Callable]] = {
        "per_query_speedup": lambda r: r.per_query_speedup,
        "break_even": lambda r: r.break_even,
    }

    sizes: dict[str, int]
    full_ms: float | None
    encode_ms: float | None
    query_ms: float | None
    context_bytes: int | None

    @property
    def per_query_speedup(self) -> float | None:
        if self.full_ms is None or not self.query_ms:
            return None
        return self.full_ms / self.query_ms

    @property
    def break_even(self) -> int | None:
        if None in (self.full_ms, self.encode_ms, self.query_ms) \
                or self.query_ms >= self.full_ms:
            return None
        # smallest N with encode + N * query < N * full
        return math.floor(self.encode_ms / (self.full_ms - self.query_ms)) + 1

    def label(self) -> str:
        return SweepPoint.of(self.sizes).label()


@dataclass
class TargetProfile:
    """Everything measured on one target; ``status`` ok, skipped (with the reason) or failed."""

    WRITE_NULLS: ClassVar[bool] = True
    DERIVED: ClassVar[dict[str, Callable]] = {"growth": lambda t: t.growth(),
                                              "split": lambda t: t.split_summary()}

    target: str
    engine: str
    status: str
    reason: str = ""
    load_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)
    # what the engine computed floating-point operations in, read back from it after loading
    # (None: the engine computes the graph's own types)
    inference_precision: str | None = None
    threads: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    gemm_peak: GemmPeak | None = None
    # the file the engine read (model.onnx, or OpenVINO's model.xml); None in older reports
    model_file: str | None = None
    points: list[PointResult] = field(default_factory=list)
    ops: OpBreakdown | None = None
    warnings: list[str] = field(default_factory=list)
    # a split model's context graph (encode) and query graph (cached context) rows, per shape;
    # ``points`` stays the model as one graph, which the growth fits and plots read
    split_points: list[PointResult] = field(default_factory=list)

    def __post_init__(self):
        self.options = plain(self.options)
        self.engine_options = plain(self.engine_options)

    def growth(self) -> list[Growth]:
        return fit_growth((p.sizes, p.stats.p50_ms) for p in self.points if p.stats)

    def rows(self) -> list[PointResult]:
        """Every timed row, a shape's context and query rows after its full-graph row."""
        order = {SweepPoint.of(p.sizes): i for i, p in enumerate(self.points)}
        return sorted([*self.points, *self.split_points], key=lambda p: (
            order.get(SweepPoint.of(p.sizes), len(order)), list(GRAPHS).index(p.graph)))

    def split_summary(self) -> list[SplitRow]:
        """Per shape of a split model: full graph, encode and per-query p50 side by side."""
        def p50(graph: str, sizes) -> float | None:
            rows = self.points if graph == FULL else self.split_points
            found = [p for p in rows if p.graph == graph and p.sizes == sizes and p.stats]
            return found[0].stats.p50_ms if found else None

        shapes = [p for p in self.split_points if p.graph == CONTEXT]
        return [SplitRow(p.sizes, p50(FULL, p.sizes), p50(CONTEXT, p.sizes),
                         p50(QUERY, p.sizes), p.context_bytes) for p in shapes]


@dataclass
class ProfileReport:
    """A profile of one model on several targets. JSON (``to_json``) is the source of truth."""

    WRITE_NULLS: ClassVar[bool] = True

    model: str
    targets: list[TargetProfile]
    sweep: dict[str, list[int]] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    flops: dict[str, dict[str, Any]] = field(default_factory=dict)  # point label -> FlopCount
    model_bytes: int | None = None
    model_info: dict[str, Any] = field(default_factory=dict)  # mechanism, preset, precision...
    environment: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.plan = plain(self.plan)
        self.model_info = plain(self.model_info)

    def ran(self) -> list[TargetProfile]:
        return [t for t in self.targets if t.status == "ok"]

    def failed(self) -> list[TargetProfile]:
        return [t for t in self.targets if t.status == "failed"]

    def skipped(self) -> list[TargetProfile]:
        return [t for t in self.targets if t.status == "skipped"]

    def target(self, name: str) -> TargetProfile:
        for t in self.targets:
            if t.target == name:
                return t
        raise KeyError(name)

    def method(self) -> str:
        """How the timed runs were taken, in words."""
        plan = self.plan
        runs, budget = plan.get("runs"), plan.get("budget_s")
        if runs and budget:
            how = f"{runs} timed runs or {budget:g} s, whichever ends first"
        elif runs:
            how = f"{runs} timed runs"
        else:
            how = f"timed runs for {budget:g} s"
        return (f"{plan.get('warmup')} untimed warm-up runs, then {how}, per shape and target; "
                "session creation timed separately; garbage collector off while timing")

    # -- JSON -----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": KIND, **dump(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileReport:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT \
                or data.get("kind") != KIND:
            got = data if isinstance(data, Mapping) else {}
            raise UserError(
                f"not a qcrun profile (format {got.get('format')!r}, kind {got.get('kind')!r})",
                stage="profile",
                hint=f"pass a JSON file written by `qcrun profile --json` (format {FORMAT})",
            )
        body = {k: v for k, v in data.items() if k not in ("format", "kind")}
        return parse(cls, body, where="profile JSON", stage="profile")

    @classmethod
    def from_json(cls, text: str) -> ProfileReport:
        return cls.from_dict(json.loads(text))

    def to_markdown(self, *, top: int = 8, module_depth: int | None = DEFAULT_MODULE_DEPTH) -> str:
        """A Markdown summary: environment, the latency table, FLOP rates, skips, per-op tops."""
        return render_markdown(self, top=top, module_depth=module_depth)

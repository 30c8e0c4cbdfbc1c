"""Latency profiles: what a model costs on each target, as a record that saves to JSON.

``profile_model`` does, for every target (an unavailable one is skipped with the reason):

1. session creation / compilation, timed on its own (never inside a timed run);
2. per sweep point: untimed warm-up, then timed runs or a time budget (``qcrun.latency``);
3. memory: resident set size before and after loading, and the peak while running;
4. a per-op breakdown from a second session with the engine's profiler on (onnxruntime's
   profiling trace, OpenVINO's performance counters), folded to op types and to the PyTorch
   module that produced each node (the dynamo exporter writes module scopes into node
   ``metadata_props``; nodes the engine fused or created are traced to the ONNX node whose
   output they compute, else to the next such node downstream);
5. the engine's measured GEMM peak: a square fp32 MatMul model run in this process, on the same
   engine with the same options; achieved FLOP/s = graph FLOPs (``qcrun.flops``) / p50, and its
   fraction of that peak.

The profiled session and the calibration session are separate from the timed one, so neither
the profiler's overhead nor the calibration disturbs the latency numbers. Engine options are
recorded twice: as requested, and as the engine reports them after loading (threads, hints,
providers). For OpenVINO, profiling uses the engine's performance defaults (parity runs set
EXECUTION_MODE_HINT=ACCURACY instead); when that makes it compute an fp32 model in bf16/f16,
the profile says so.

``ProfileReport`` is the source of truth: JSON with the environment (CPU model, cores, engine
versions), from which the Markdown table (here) and the HTML report (``qcrun.report_html``)
are rendered.
"""

from __future__ import annotations

import ast
import datetime as _dt
import functools
import json
import os
import platform
import re
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcrun.adapters import (
    Adapter,
    LoadFailed,
    OpenVinoAdapter,
    OrtAdapter,
    RunFailed,
    TargetUnavailable,
    adapter_for,
)
from qcrun.errors import UserError
from qcrun.flops import FlopCount, count_flops, observe_shapes
from qcrun.latency import (
    DEFAULT_BUDGET_S,
    DEFAULT_WARMUP,
    Growth,
    LatencyStats,
    SweepPoint,
    check_plan,
    fit_growth,
    summarize,
    time_calls,
    time_load,
)
from qcrun.parity import environment as _base_environment
from qcrun.targets import Target, availability, get_target, import_engine

FORMAT = 1
DEFAULT_OP_RUNS = 10
#: GEMM sizes of the peak calibration: powers of two alone understate it (cache-set
#: conflicts cost up to a third on some CPUs), so the best of a few sizes is the peak.
DEFAULT_GEMM_SIZES = (1024, 1536, 2048)
DEFAULT_MODULE_DEPTH = 2
TOP_LEVEL = "(top level)"
NO_METADATA = "(no module metadata)"
ENGINE_INTERNAL = "(engine-internal)"

Feeds = Callable[[SweepPoint], Mapping[str, np.ndarray]]
Progress = Callable[[str], None]


# --- environment and memory ------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (base / "physical_package_id").read_text().strip()
            core = (base / "core_id").read_text().strip()
        except OSError:
            return len(cpus) or os.cpu_count() or 1
        cores.add((package, core))
    return len(cores) or os.cpu_count() or 1


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
              "avx_vnni", "neon", "asimd", "sve")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    match = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    present = set(match.group(2).split()) if match else set()
    return [f for f in wanted if f in present]


def _memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def environment() -> dict[str, Any]:
    """Where a profile was taken: the parity environment plus CPU model, cores and memory."""
    env = _base_environment()
    env.update(
        {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "physical_cores": physical_cores(),
            "cpu_flags": _cpu_flags(),
            "memory_bytes": _memory_total(),
            "hostname": platform.node(),
        }
    )
    return env


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), or None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (since start, or since ``reset_peak_rss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if platform.system() == "Darwin" else peak * 1024


def _max_known(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused,
    in which case ``peak_rss_bytes`` keeps meaning the peak since the process started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def model_files(model_path: str | Path) -> list[Path]:
    """The model file and its external data files (``<model>.*.data`` beside it)."""
    path = Path(model_path)
    files = [path]
    files += sorted(p for p in path.parent.glob(f"{path.name}.*") if p.suffix == ".data")
    files += [p for p in [path.parent / f"{path.name}.data"] if p.is_file() and p not in files]
    return files


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmPeak:
    """The engine's fp32 GEMM rate: n x n x n MatMul models timed in this process.

    The peak is the fastest run of the best size: what the engine can reach. (The median is
    recorded too; on a shared machine a neighbour's burst slows the median, and a peak read from
    it would be too low and flatter every model measured against it.) ``rates`` holds the best
    rate of every size tried, in FLOP/s.
    """

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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rates"] = {str(k): v for k, v in self.rates.items()}
        return {
            **data,
            "flops_per_s": self.flops_per_s,
            "median_flops_per_s": self.median_flops_per_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GemmPeak:
        values = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        values["rates"] = {int(k): float(v) for k, v in data.get("rates", {}).items()}
        return cls(**values)


@dataclass(frozen=True)
class NodeTime:
    """One executed engine node: its mean time per run and the ONNX node / module behind it.

    ``mapped`` says how it was traced to the ONNX graph: "name" (same node), "output" (it
    computes that ONNX node's output: a fusion), "downstream" (an engine helper traced to the
    next ONNX node it feeds), or "" (not traced).
    """

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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scopes"] = None if self.scopes is None else list(self.scopes)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeTime:
        data = dict(data)
        if data.get("scopes") is not None:
            data["scopes"] = tuple(data["scopes"])
        return cls(**{f: data.get(f) for f in cls.__dataclass_fields__ if f in data})


@dataclass(frozen=True)
class Folded:
    key: str
    time_ms: float
    share: float
    nodes: int


@dataclass
class OpBreakdown:
    """Per-node engine times of ``runs`` profiled runs at one sweep point."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "point": dict(self.point),
            "runs": self.runs,
            "total_ms": self.total_ms,
            "module_metadata": self.module_metadata,
            "module_coverage": self.module_coverage(),
            "notes": list(self.notes),
            "by_op_type": [asdict(f) for f in self.by_op_type()],
            "by_module": [asdict(f) for f in self.by_module()],
            "nodes": [n.to_dict() for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpBreakdown:
        return cls(
            source=data["source"],
            point={k: int(v) for k, v in data["point"].items()},
            runs=int(data["runs"]),
            nodes=[NodeTime.from_dict(n) for n in data["nodes"]],
            module_metadata=bool(data["module_metadata"]),
            notes=list(data.get("notes", [])),
        )


@dataclass
class PointResult:
    """One sweep point on one target: its shapes, raw samples, statistics and FLOP rate."""

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
        return SweepPoint.of(self.sizes).label()

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "sizes": dict(self.sizes),
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "warmup": self.warmup,
            "budget_s": self.budget_s,
            "latency": stats.to_dict() if stats else None,
            "samples_ms": list(self.samples_ms),
            "flops": self.flops,
            "flops_exact": self.flops_exact,
            "achieved_flops_per_s": self.achieved_flops_per_s,
            "peak_flops_per_s": self.peak_flops_per_s,
            "fraction_of_peak": self.fraction_of_peak,
            "error": self.error,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PointResult:
        return cls(
            sizes={k: int(v) for k, v in data["sizes"].items()},
            input_shapes={k: list(v) for k, v in data.get("input_shapes", {}).items()},
            samples_ms=[float(s) for s in data.get("samples_ms", [])],
            warmup=int(data.get("warmup", 0)),
            budget_s=data.get("budget_s"),
            flops=data.get("flops"),
            flops_exact=bool(data.get("flops_exact", False)),
            peak_flops_per_s=data.get("peak_flops_per_s"),
            error=data.get("error"),
            warnings=list(data.get("warnings", [])),
        )


@dataclass
class TargetProfile:
    """Everything measured on one target; ``status`` ok, skipped (with the reason) or failed."""

    target: str
    engine: str
    status: str
    reason: str = ""
    load_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    gemm_peak: GemmPeak | None = None
    points: list[PointResult] = field(default_factory=list)
    ops: OpBreakdown | None = None
    warnings: list[str] = field(default_factory=list)

    def growth(self) -> list[Growth]:
        return fit_growth((p.sizes, p.stats.p50_ms) for p in self.points if p.stats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "engine": self.engine,
            "status": self.status,
            "reason": self.reason,
            "load_s": self.load_s,
            "options": _plain(self.options),
            "engine_options": _plain(self.engine_options),
            "threads": self.threads,
            "memory": dict(self.memory),
            "gemm_peak": self.gemm_peak.to_dict() if self.gemm_peak else None,
            "points": [p.to_dict() for p in self.points],
            "growth": [g.to_dict() for g in self.growth()],
            "ops": self.ops.to_dict() if self.ops else None,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetProfile:
        return cls(
            target=data["target"],
            engine=data["engine"],
            status=data["status"],
            reason=data.get("reason", ""),
            load_s=data.get("load_s"),
            options=dict(data.get("options", {})),
            engine_options=dict(data.get("engine_options", {})),
            threads=data.get("threads"),
            memory=dict(data.get("memory", {})),
            gemm_peak=GemmPeak.from_dict(data["gemm_peak"]) if data.get("gemm_peak") else None,
            points=[PointResult.from_dict(p) for p in data.get("points", [])],
            ops=OpBreakdown.from_dict(data["ops"]) if data.get("ops") else None,
            warnings=list(data.get("warnings", [])),
        )


def _plain(value):
    """JSON-safe copy of option values (engine enums and types become strings)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class ProfileReport:
    """A profile of one model on several targets. JSON (``to_json``) is the source of truth."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "qcrun.profile",
            "created": self.created,
            "model": self.model,
            "model_bytes": self.model_bytes,
            "model_info": _plain(self.model_info),
            "sweep": {k: list(v) for k, v in self.sweep.items()},
            "plan": _plain(self.plan),
            "flops": self.flops,
            "environment": self.environment,
            "warnings": list(self.warnings),
            "targets": [t.to_dict() for t in self.targets],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileReport:
        if data.get("format") != FORMAT or data.get("kind") != "qcrun.profile":
            raise UserError(
                f"not a qcrun profile (format {data.get('format')!r}, kind {data.get('kind')!r})",
                stage="profile",
                hint=f"pass a JSON file written by `qcrun profile --json` (format {FORMAT})",
            )
        return cls(
            model=data["model"],
            targets=[TargetProfile.from_dict(t) for t in data["targets"]],
            sweep={k: [int(v) for v in vs] for k, vs in data.get("sweep", {}).items()},
            plan=dict(data.get("plan", {})),
            flops={k: dict(v) for k, v in data.get("flops", {}).items()},
            model_bytes=data.get("model_bytes"),
            model_info=dict(data.get("model_info", {})),
            environment=dict(data.get("environment", {})),
            created=data.get("created", ""),
            warnings=list(data.get("warnings", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> ProfileReport:
        return cls.from_dict(json.loads(text))

    # -- text -----------------------------------------------------------------------------------

    def to_markdown(self, *, top: int = 8, module_depth: int | None = DEFAULT_MODULE_DEPTH) -> str:
        """A Markdown summary: environment, the latency table, FLOP rates, skips, per-op tops."""
        env = self.environment
        info = self.model_info
        lines = [f"# Latency profile: {info.get('mechanism') or Path(self.model).parent.name}", ""]
        what = ", ".join(
            f"{k} {info[k]}"
            for k in ("mechanism", "preset", "precision", "attention")
            if info.get(k)
        )
        size = _bytes(self.model_bytes) if self.model_bytes is not None else "?"
        lines.append(f"- model: `{self.model}` ({size}{', ' + what if what else ''})")
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        lines.append(
            f"- machine: {env.get('cpu', '?')}, {env.get('physical_cores', '?')} physical cores "
            f"({env.get('usable_cpus', '?')} usable CPUs), {_bytes(env.get('memory_bytes'))} RAM, "
            f"{env.get('platform', '?')}"
        )
        lines.append(f"- versions: python {env.get('python', '?')}, {versions}")
        lines.append(f"- method: {self.method()}")
        lines += ["", "| target | shape | runs | min | p50 | p90 | p99 | max | mean | std | "
                  "runs/s | GFLOP | GFLOP/s | % GEMM peak |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
                  "---: | ---: | ---: |"]
        for t in self.ran():
            for p in t.points:
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
        lines += ["", "Times in ms. GFLOP: matrix FLOPs (multiply-add = 2) of the graph at that "
                  "shape; % GEMM peak: achieved FLOP/s (FLOPs / p50) over the engine's measured "
                  "fp32 GEMM rate.", ""]
        lines += ["| target | load s | threads | peak RSS | RSS after load | GEMM peak | "
                  "options |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for t in self.ran():
            peak = t.gemm_peak
            gemm = f"{peak.flops_per_s / 1e9:.1f} GFLOP/s ({peak.size}^3)" if peak else "-"
            mem = t.memory
            lines.append(
                f"| {t.target} | {_num(t.load_s, '{:.3f}')} | {t.threads or '?'} | "
                f"{_bytes(mem.get('peak_rss_bytes'))} | {_bytes(mem.get('rss_after_load_bytes'))} "
                f"| {gemm} | {_options_text(t.engine_options)} |"
            )
        growth = [(t.target, g) for t in self.ran() for g in t.growth()]
        if growth:
            lines += ["", "| target | growth along | at | sizes | exponent | r^2 |",
                      "| --- | --- | --- | --- | ---: | ---: |"]
            for name, g in growth:
                fixed = " ".join(f"{k}={v}" for k, v in g.fixed.items()) or "-"
                lines.append(
                    f"| {name} | {g.axis} | {fixed} | {' -> '.join(map(str, g.sizes))} | "
                    f"{g.exponent:.2f} | {g.r2:.3f} |"
                )
        for t in self.skipped() + self.failed():
            lines += ["", f"**{t.target} {t.status}:** {t.reason}"]
        for t in self.ran():
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
        notes = self.warnings + [f"{t.target}: {w}" for t in self.targets for w in t.warnings]
        notes += [f"{t.target} {p.label()}: {w}" for t in self.targets for p in t.points
                  for w in p.warnings]
        if notes:
            lines += ["", "Warnings:", ""] + [f"- {w}" for w in notes]
        return "\n".join(lines) + "\n"


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


# --- provenance: ONNX node -> PyTorch module ------------------------------------------------


@dataclass
class Provenance:
    """What the exporter recorded about each ONNX node, and the graph around it."""

    ops: dict[str, str] = field(default_factory=dict)  # node -> ONNX op type
    scopes: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # node -> modules
    producer: dict[str, str] = field(default_factory=dict)  # tensor -> node

    @property
    def has_metadata(self) -> bool:
        return any(s is not None for s in self.scopes.values())


def parse_scopes(metadata: Mapping[str, str]) -> tuple[tuple[str, ...], bool] | None:
    """Module scopes of one node from its exporter metadata, and whether they are absolute.

    ``pkg.torch.onnx.name_scopes`` is a list like ``['', 'layers.0', 'layers.0.attn', 'view']``:
    the root module (''), the modules down to the op, and the op's own name (dropped). Inside a
    ``torch.cond`` branch the list is relative to the branch (no leading ''). ``namespace``
    (``": pkg.Root/layers.0: pkg.Layer/view: aten.view"``) carries the same names.
    """
    raw = metadata.get("pkg.torch.onnx.name_scopes")
    names = None
    if raw:
        try:
            names = [str(n) for n in ast.literal_eval(raw)]
        except (ValueError, SyntaxError):
            names = None
    if names is None and metadata.get("namespace"):
        names = [segment.split(": ")[0] for segment in metadata["namespace"].split("/")]
    if not names:
        return None
    # Size queries of the inputs sit under a placeholder "module": the top level.
    absolute = names[0] == "" or names[0].startswith("_empty_nn_module_stack")
    modules = names[1:-1] if absolute else names[:-1]
    return tuple(n for n in modules if n), absolute


def provenance(model) -> Provenance:
    """Node names, op types, module scopes and tensor producers of an ONNX model (every
    subgraph included; a branch's relative scopes are put under its ``If`` node's module)."""
    onnx = import_engine("onnx")
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    result = Provenance()

    def walk(graph, parent: tuple[str, ...] | None):
        for node in graph.node:
            parsed = parse_scopes({p.key: p.value for p in node.metadata_props})
            if parsed is None:
                scopes = None
            else:
                names, absolute = parsed
                scopes = names if absolute or parent is None else parent + names
            result.ops.setdefault(node.name, node.op_type)
            result.scopes.setdefault(node.name, scopes)
            for out in node.output:
                if out:
                    result.producer.setdefault(out, node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, scopes if scopes is not None else parent)

    walk(model.graph, None)
    return result


class _Tracer:
    """Traces engine node names to ONNX nodes: same name, else the ONNX node whose output it
    computes, else (for helpers the engine added) the first traceable node downstream."""

    def __init__(self, prov: Provenance, outputs: Mapping[str, Sequence[str]] | None = None,
                 consumers: Mapping[str, Sequence[str]] | None = None):
        self.prov = prov
        self.outputs = outputs or {}
        self.consumers = consumers or {}
        self._cache: dict[str, tuple[str | None, str]] = {}

    def _direct(self, name: str) -> tuple[str | None, str]:
        if name in self.prov.ops:
            return name, "name"
        base = name.split("/")[0]
        if base in self.prov.ops:
            return base, "name"
        for tensor in self.outputs.get(name, ()):
            node = self.prov.producer.get(tensor)
            if node is not None:
                return node, "output"
        return None, ""

    def trace(self, name: str) -> tuple[str | None, str]:
        if name in self._cache:
            return self._cache[name]
        found = self._direct(name)
        if found[0] is None:
            seen, queue = {name}, deque(self.consumers.get(name, ()))
            while queue and len(seen) < 200:
                nxt = queue.popleft()
                if nxt in seen:
                    continue
                seen.add(nxt)
                node, _ = self._direct(nxt)
                if node is not None:
                    found = (node, "downstream")
                    break
                queue.extend(self.consumers.get(nxt, ()))
        self._cache[name] = found
        return found

    def node_time(self, name, op_type, time_ms, kernel="") -> NodeTime:
        onnx_node, how = self.trace(name)
        return NodeTime(
            name=name,
            op_type=op_type,
            time_ms=time_ms,
            kernel=kernel,
            onnx_node=onnx_node,
            onnx_op=self.prov.ops.get(onnx_node) if onnx_node else None,
            scopes=self.prov.scopes.get(onnx_node) if onnx_node else None,
            mapped=how,
        )


# --- onnxruntime profiling -------------------------------------------------------------------


class OrtProfilingAdapter(OrtAdapter):
    """OrtAdapter whose session writes a profiling trace and its optimised graph to
    ``profile_dir`` (weights of the optimised graph go to a side file that is never read)."""

    known_options = OrtAdapter.known_options | {"profile_dir"}

    def _session_options(self, ort, level: str | None = None):
        options = super()._session_options(ort, level)
        if level is None:  # the session itself, not the TensorRT shape probe
            directory = Path(self.options["profile_dir"])
            options.enable_profiling = True
            options.profile_file_prefix = str(directory / "ort-profile")
            options.optimized_model_filepath = str(directory / "optimized.onnx")
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "optimized.data"
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
        return options

    def end_profiling(self) -> Path:
        return Path(self._session.end_profiling())


def parse_ort_trace(events: Sequence[Mapping[str, Any]], skip_runs: int = 0):
    """Node kernel events of an onnxruntime trace, per run: [[(node, op, provider, us)]].

    Events are assigned to runs by time (each ``model_run`` event spans its nodes); the first
    ``skip_runs`` runs (warm-up) are dropped.
    """
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"
    )
    per_run: list[list[tuple[str, str, str, float]]] = [[] for _ in runs]
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        for index, (start, end) in enumerate(runs):
            if start <= e["ts"] <= end:
                args = e.get("args", {})
                per_run[index].append(
                    (name[: -len("_kernel_time")], args.get("op_name", "?"),
                     args.get("provider", ""), float(e["dur"]))
                )
                break
    return per_run[skip_runs:]


def _graph_links(onnx, model) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """node -> output tensors, node -> consumer nodes, over every (sub)graph."""
    outputs, consumers_of_tensor = {}, {}
    graphs = deque([model.graph])
    while graphs:
        graph = graphs.popleft()
        for node in graph.node:
            outputs[node.name] = [o for o in node.output if o]
            for tensor in node.input:
                consumers_of_tensor.setdefault(tensor, []).append(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
    consumers = {
        name: [c for t in outs for c in consumers_of_tensor.get(t, [])]
        for name, outs in outputs.items()
    }
    return outputs, consumers


def _ort_breakdown(adapter: OrtProfilingAdapter, prov: Provenance | None, warmup: int,
                   runs: int, point, feed) -> OpBreakdown:
    for _ in range(warmup + runs):
        adapter.run(feed)
    trace = json.loads(adapter.end_profiling().read_text())
    per_run = parse_ort_trace(trace, skip_runs=warmup)
    totals: dict[tuple[str, str, str], float] = {}
    for events in per_run:
        for node, op, provider, us in events:
            key = (node, op, provider)
            totals[key] = totals.get(key, 0.0) + us
    notes = []
    tracer = None
    if prov is not None:
        outputs, consumers = {}, {}
        optimized = Path(adapter.options["profile_dir"]) / "optimized.onnx"
        try:
            onnx = import_engine("onnx")
            outputs, consumers = _graph_links(onnx, onnx.load(str(optimized),
                                                              load_external_data=False))
        except Exception as e:  # the optimised graph only refines the mapping
            notes.append(f"could not read onnxruntime's optimised graph ({e}); fused nodes "
                         "are not traced to modules")
        tracer = _Tracer(prov, outputs, consumers)
    nodes = []
    count = max(len(per_run), 1)
    for (node, op, provider), us in totals.items():
        ms = us / 1e3 / count
        if tracer is None:
            nodes.append(NodeTime(node, op, ms, provider))
        else:
            nodes.append(tracer.node_time(node, op, ms, provider))
    nodes.sort(key=lambda n: -n.time_ms)
    return OpBreakdown("onnxruntime profiling", point.as_dict(), len(per_run), nodes,
                       bool(prov and prov.has_metadata), notes)


# --- OpenVINO performance counters -----------------------------------------------------------


def _ov_breakdown(adapter: OvProfilingAdapter, prov: Provenance | None, warmup: int, runs: int,
                  point, feed) -> OpBreakdown:
    for _ in range(warmup):
        adapter.run(feed)
    totals: dict[str, list] = {}
    request = adapter._request
    for _ in range(runs):
        adapter.run(feed)
        for info in request.get_profiling_info():
            if not str(info.status).endswith("EXECUTED"):
                continue
            entry = totals.setdefault(info.node_name, [info.node_type, info.exec_type, 0.0])
            entry[2] += info.real_time.total_seconds() * 1e3
    notes = []
    tracer = None
    if prov is not None:
        try:
            tracer = _ov_tracer(adapter, prov)
        except Exception as e:  # the runtime graph only refines the mapping
            notes.append(f"could not read OpenVINO's runtime graph ({e}); nodes are traced by "
                         "name only")
            tracer = _Tracer(prov)
    nodes = []
    for name, (op_type, kernel, ms) in totals.items():
        ms /= max(runs, 1)
        if tracer is None:
            nodes.append(NodeTime(name, op_type, ms, kernel))
        else:
            nodes.append(tracer.node_time(name, op_type, ms, kernel))
    nodes.sort(key=lambda n: -n.time_ms)
    return OpBreakdown("OpenVINO performance counters", point.as_dict(), runs, nodes,
                       bool(prov and prov.has_metadata), notes)


def _ov_consumers(op) -> list[str]:
    return [
        t.get_node().get_friendly_name() for out in op.outputs() for t in out.get_target_inputs()
    ]


_OV_TYPES = r"(?:f64|f32|bf16|f16|f8e4m3|f8e5m2|i64|i32|i16|i8|i4|u64|u32|u16|u8|u4|u1|boolean)"
_OV_REORDER = re.compile(rf"^(.+?)_{_OV_TYPES}_{_OV_TYPES}_(.+)$", re.IGNORECASE)


def _ov_tracer(adapter: OvProfilingAdapter, prov: Provenance) -> _Tracer:
    """OpenVINO names: the compiled graph's nodes list the read model's ops they were built
    from (``originalLayersNames``); the read model's ops carry ONNX node names, or, for ops a
    decomposition added (MVN of a LayerNormalization, the SDPA of an Attention), feed the op
    that carries the name. Precision reorders ("a_f32_bf16_b") belong to their consumer b."""
    read = adapter.read_model
    read_outputs, read_consumers = {}, {}
    for op in read.get_ordered_ops():
        name = op.get_friendly_name()
        read_outputs[name] = [n for out in op.outputs() for n in out.get_names()]
        read_consumers[name] = _ov_consumers(op)
    read_tracer = _Tracer(prov, read_outputs, read_consumers)

    originals: dict[str, list[str]] = {}
    consumers: dict[str, list[str]] = {}
    for op in adapter._compiled.get_runtime_model().get_ordered_ops():
        name = op.get_friendly_name()
        info = op.get_rt_info()
        if "originalLayersNames" in info:
            originals[name] = [n for n in info["originalLayersNames"].astype(str).split(",") if n]
        consumers[name] = _ov_consumers(op)

    class _OvTracer(_Tracer):
        def _direct(self, name):
            if name in read_outputs:
                found = read_tracer.trace(name)
                if found[0] is not None:
                    return found
            for original in originals.get(name, ()):
                found = read_tracer.trace(original)
                if found[0] is not None:
                    return found
            match = _OV_REORDER.match(name)
            if match and match.group(2) != name:
                return self.trace(match.group(2))
            return None, ""

    return _OvTracer(prov, consumers=consumers)


# --- OpenVINO options ------------------------------------------------------------------------

_OV_PROPERTIES = (
    "PERFORMANCE_HINT",
    "EXECUTION_MODE_HINT",
    "INFERENCE_PRECISION_HINT",
    "INFERENCE_NUM_THREADS",
    "NUM_STREAMS",
    "ENABLE_HYPER_THREADING",
    "ENABLE_CPU_PINNING",
    "PERF_COUNT",
)


class OvProfilingAdapter(OpenVinoAdapter):
    """OpenVinoAdapter compiled with PERF_COUNT on, for ``get_profiling_info``; it keeps the
    model it read, whose generated op names the compiled graph refers to."""

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self.read_model = None

    def _config(self):
        return {**super()._config(), "PERF_COUNT": True}

    def _close(self):
        super()._close()
        self.read_model = None


def engine_options(adapter: Adapter) -> tuple[dict[str, Any], int | None]:
    """The options the loaded engine reports, and its thread count."""
    if isinstance(adapter, OrtAdapter) and adapter._session is not None:
        session = adapter._session
        so = session.get_session_options()
        threads = so.intra_op_num_threads or physical_cores()
        return {
            "providers": list(session.get_providers()),
            "graph_optimization_level": str(so.graph_optimization_level).split(".")[-1],
            "intra_op_num_threads": so.intra_op_num_threads or "default (physical cores)",
            "inter_op_num_threads": so.inter_op_num_threads or "default",
            "execution_mode": str(so.execution_mode).split(".")[-1],
        }, threads
    if isinstance(adapter, OpenVinoAdapter) and adapter._compiled is not None:
        values = {}
        for key in _OV_PROPERTIES:
            try:
                value = adapter._compiled.get_property(key)
                # ov.Type prints as "<Type: 'bfloat16'>"; its short name is "bf16"
                text = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
                values[key] = text.split(".")[-1]
            except Exception:  # a property this device or version does not have
                continue
        values["device"] = adapter.target.device
        try:
            threads = int(values.get("INFERENCE_NUM_THREADS", 0)) or None
        except ValueError:
            threads = None
        return values, threads
    return {}, None


def _precision_warning(values: Mapping[str, Any], precision: str | None) -> str | None:
    hint = str(values.get("INFERENCE_PRECISION_HINT", "")).lower()
    if precision in (None, "fp32") and hint and "f32" not in hint:
        return (f"OpenVINO computes this fp32 model in {hint} (its performance default on this "
                "CPU): timings are for reduced precision, and parity runs (ACCURACY) are "
                "slower; pass --accuracy for fp32 timings")
    return None


# --- GEMM peak -------------------------------------------------------------------------------


def gemm_model(path: str | Path, size: int, seed: int = 0) -> Path:
    """A MatMul model: y[n, n] = x[n, n] @ w (a constant [n, n] weight, as in a Linear)."""
    onnx = import_engine("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((size, size)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="gemm")],
        "gemm_peak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = Path(path)
    onnx.save(model, str(path))
    return path


def gemm_peak(
    target: str | Target,
    options: Mapping[str, Any] | None = None,
    *,
    sizes: int | Sequence[int] = DEFAULT_GEMM_SIZES,
    warmup: int = 3,
    runs: int = 10,
    adapter_factory=adapter_for,
) -> GemmPeak:
    """The engine's fp32 GEMM peak on ``target`` with ``options`` (the ones the model runs
    with): n^3 MatMul models for every n in ``sizes``, run in this process; the fastest wins."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    if not sizes or any(n <= 0 for n in sizes):
        raise UserError(f"GEMM sizes must be positive, not {sizes}", stage="profile",
                        hint="pass e.g. --gemm-sizes 1024,1536,2048")
    best: GemmPeak | None = None
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="qcrun-gemm-") as tmp:
        for size in sizes:
            path = gemm_model(Path(tmp) / f"gemm{size}.onnx", size)
            adapter = adapter_factory(path, target, **dict(options or {}))
            adapter.load()
            try:
                x = np.random.default_rng(1).standard_normal((size, size)).astype(np.float32)
                feed = adapter.check_feed({"x": x})
                run = functools.partial(adapter.run, feed)
                stats = time_calls(run, warmup=warmup, runs=runs).stats
            finally:
                adapter.close()
            peak = GemmPeak(size, 2 * size**3, stats.runs, stats.p50_ms, stats.min_ms)
            rates[size] = peak.flops_per_s
            if best is None or peak.flops_per_s > best.flops_per_s:
                best = peak
    return GemmPeak(best.size, best.flops, best.runs, best.p50_ms, best.min_ms, rates)


# --- profiling -------------------------------------------------------------------------------


def profile_options(target: Target, *, threads: int | None = None, accuracy: bool = False,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Adapter options for a profile on ``target``: the engine's performance defaults (OpenVINO
    without the ACCURACY hint parity uses, unless ``accuracy``), ``threads`` if given."""
    options: dict[str, Any] = {}
    if target.engine == "openvino":
        options["accuracy"] = accuracy
        if threads:
            options["num_threads"] = threads
    elif target.engine == "onnxruntime" and threads:
        options["intra_op_threads"] = threads
    options.update(extra or {})
    return options


def _profiling_adapter(model_path, target: Target, options, tmp: str) -> Adapter | None:
    if target.engine == "onnxruntime":
        return OrtProfilingAdapter(model_path, target, **options, profile_dir=tmp)
    if target.engine == "openvino":
        return OvProfilingAdapter(model_path, target, **options)
    return None


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
) -> ProfileReport:
    """Profile ``model_path`` on every target at every sweep point (see the module docstring).

    ``feeds(point)`` gives the inputs of a point (built once, shared by every target).
    ``op_runs`` profiled runs at ``points[op_point]`` give the per-op breakdown (0: none);
    ``gemm_sizes`` None skips the GEMM peak; ``count`` False skips FLOP counting.
    ``options`` maps a target name to adapter options laid over ``profile_options``.
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
    say = progress or (lambda _text: None)
    info = dict(model_info or {})
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

    prov = None
    if op_runs:
        try:
            prov = provenance(model_path)
        except UserError as e:  # onnx missing: op types still fold, modules do not
            report.warnings.append(f"module attribution is off: {e}")
        else:
            if not prov.has_metadata:
                report.warnings.append(
                    "the model's nodes carry no module metadata (namespace / "
                    "pkg.torch.onnx.name_scopes), so per-module times are not available; the "
                    "dynamo exporter writes it, and a simplifier or optimiser that rebuilds "
                    "nodes drops it"
                )

    for target in resolved:
        ok, reason = availability(target)
        if not ok:
            say(f"{target.name}: skipped ({reason})")
            report.targets.append(TargetProfile(target.name, target.engine, "skipped", reason))
            continue
        opts = profile_options(target, threads=threads, accuracy=accuracy,
                               extra=(options or {}).get(target.name))
        report.targets.append(
            _profile_target(model_path, target, opts, points, feed_cache, flop_counts,
                            warmup=warmup, runs=runs, budget_s=budget_s, op_runs=op_runs,
                            op_point=op_point, gemm_sizes=gemm_sizes, prov=prov,
                            precision=info.get("precision"), adapter_factory=adapter_factory,
                            say=say)
        )
    return report


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
            except UserError:  # no onnxruntime here: shapes from inference only
                pass
            except Exception as e:  # the model fails to run at this shape: timed runs say why
                report.warnings.append(f"{point.label()}: shapes not observed ({e})")
            count = count_flops(model_path, shapes, observed=observed)
        except UserError as e:
            report.warnings.append(f"FLOPs not counted: {e}")
            return {}
        counts[point] = count
        report.flops[point.label()] = count.to_dict()
        say(f"{point.label()}: {count.total / 1e9:.3f} GFLOP"
            + ("" if count.exact else " (not exact: see the JSON)"))
    return counts


def _profile_target(model_path, target, opts, points, feed_cache, flop_counts, *, warmup, runs,
                    budget_s, op_runs, op_point, gemm_sizes, prov, precision, adapter_factory,
                    say) -> TargetProfile:
    result = TargetProfile(target.name, target.engine, "ok", options=dict(opts))
    reset = reset_peak_rss()
    rss_before = current_rss_bytes()
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
    say(f"{target.name}: loaded in {result.load_s:.3f} s")
    try:
        result.engine_options, result.threads = engine_options(adapter)
        rss_loaded = current_rss_bytes()
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
        "peak_rss_bytes": _max_known(peak_rss_bytes(), rss_loaded, current_rss_bytes()),
        "peak_scope": "since this target's load" if reset else "process lifetime",
    }
    if target.engine == "openvino":
        warning = _precision_warning(result.engine_options, precision)
        if warning:
            result.warnings.append(warning)
    if any(p.error for p in result.points) and not any(p.samples_ms for p in result.points):
        result.status = "failed"
        result.reason = "; ".join(p.error for p in result.points if p.error)

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
            for p in result.points:
                p.peak_flops_per_s = result.gemm_peak.flops_per_s
    return result


def _time_point(adapter, point, feed, count, warmup, runs, budget_s, say, name) -> PointResult:
    result = PointResult(
        sizes=point.as_dict(),
        input_shapes={k: list(v.shape) for k, v in feed.items()},
        warmup=warmup,
        budget_s=budget_s,
        flops=count.total if count else None,
        flops_exact=bool(count and count.exact),
    )
    checked = adapter.check_feed(feed)
    try:
        timing = time_calls(lambda: adapter.run(checked), warmup=warmup, runs=runs,
                            budget_s=budget_s)
    except RunFailed as e:
        result.error = str(e)
        say(f"{name} {point.label()}: failed ({e})")
        return result
    result.samples_ms = [s * 1e3 for s in timing.samples_s]
    result.budget_s = timing.budget_s
    result.warnings += timing.warnings
    stats = timing.stats
    say(f"{name} {point.label()}: p50 {stats.p50_ms:.3f} ms, p90 {stats.p90_ms:.3f} ms "
        f"({stats.runs} runs)")
    return result


def _op_breakdown(model_path, target, opts, point, feed, prov, warmup, op_runs, result,
                  say) -> OpBreakdown | None:
    with tempfile.TemporaryDirectory(prefix="qcrun-ops-") as tmp:
        adapter = _profiling_adapter(model_path, target, opts, tmp)
        if adapter is None:
            result.warnings.append(f"no per-op profiler for the {target.engine} engine")
            return None
        try:
            adapter.load()
            checked = adapter.check_feed(feed)
            if target.engine == "onnxruntime":
                ops = _ort_breakdown(adapter, prov, max(warmup, 1), op_runs, point, checked)
            else:
                ops = _ov_breakdown(adapter, prov, max(warmup, 1), op_runs, point, checked)
        except (LoadFailed, RunFailed) as e:
            result.warnings.append(f"per-op profile failed: {e}")
            return None
        finally:
            adapter.close()
    say(f"{target.name}: per-op profile of {op_runs} runs, {ops.total_ms:.3f} ms in nodes")
    return ops


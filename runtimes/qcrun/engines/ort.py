"""onnxruntime: availability, the adapter, its profiler trace and shape observation.

One ``InferenceSession`` serves concurrent calls: ``InferenceSession.run`` is thread-safe.
"""

from __future__ import annotations

import importlib
import json
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcrun.engines.base import (
    Adapter,
    Dim,
    Engine,
    ObservedShapes,
    TargetUnavailable,
    TensorInfo,
    missing,
)
from qcrun.errors import UserError, import_engine, unknown_choice
from qcrun.graphs import load_graph_only, walk_graphs
from qcrun.machine import physical_cores
from qcrun.profiling.provenance import Provenance, Tracer, graph_links
from qcrun.profiling.records import NodeTime, OpBreakdown
from qcrun.targets import (
    Target,
    axis_ranges_from_shapes,
    default_cache_dir,
    get_target,
    tensorrt_provider_options,
)

NAME = "onnxruntime"

# A serialized ONNX model (ir 8, opset 13, y = Identity(x), x: float[1]) used to probe whether
# an execution provider really attaches to a session. It is embedded as bytes so that probing
# needs neither the onnx package nor a model file; tests rebuild it with onnx.helper and compare.
PROBE_MODEL = bytes.fromhex(
    "08081205716372756e3a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a"
    "0a08080112040a020801620f0a0179120a0a08080112040a02080142040a00100d"
)

_TRT_EP = "TensorrtExecutionProvider"
_GPU_PROVIDER_HINTS = {
    "CUDAExecutionProvider": "install onnxruntime-gpu on a CUDA host (pip install "
    "'qcrun[ort-gpu]' after uninstalling onnxruntime)",
    _TRT_EP: "install onnxruntime-gpu built with TensorRT, and the TensorRT libraries "
    "(JetPack on Jetson)",
}

_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_TYPE = re.compile(r"^tensor\((\w+)\)$")
_DTYPES = {"float": "float32", "double": "float64"}


def _info(node) -> TensorInfo:
    match = _TYPE.match(node.type)
    dtype = None
    if match:
        name = _DTYPES.get(match.group(1), match.group(1))
        dtype = name if _is_numpy_dtype(name) else None
    shape = None if node.shape is None else tuple(_dim(d) for d in node.shape)
    return TensorInfo(node.name, dtype, shape)


def _dim(d) -> Dim:
    if isinstance(d, int) and d >= 0:
        return d
    return d if isinstance(d, str) and d else None


def _is_numpy_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def _tensorrt_options(specs: Mapping[str, Sequence[Dim]], ranges: Mapping[str, Sequence[int]],
                      cache_dir: Path, options: Mapping[str, Any]) -> dict[str, str]:
    return tensorrt_provider_options(
        specs,
        ranges,
        cache_dir=cache_dir,
        fp16=bool(options.get("trt_fp16", False)),
        workspace_bytes=int(options.get("trt_workspace_bytes", 2 << 30)),
        cache=bool(options.get("trt_cache", True)),
    )


def _provider_list(target: Target, tensorrt, extra: Mapping[str, Mapping] | None = None) -> list:
    """The target's providers with their options; ``tensorrt()`` gives TensorRT's."""
    providers = []
    for name in target.providers:
        options = dict(tensorrt()) if name == _TRT_EP else {}
        options.update((extra or {}).get(name, {}))
        providers.append((name, options) if options else name)
    return providers


class OrtAdapter(Adapter):
    """onnxruntime with the target's execution providers.

    For TensorRT targets, ``load`` first reads the input shapes with a plain CPU session, then
    builds the TensorRT profile from ``profile_shapes`` (axis -> (min, opt, max)) or, failing
    that, from ``profile_feeds`` (example feeds, e.g. the golden inputs).
    """

    engine = NAME
    concurrency = "concurrent calls on one thread-safe InferenceSession"
    known_options = frozenset(
        {
            "graph_optimization_level",  # disable | basic | extended | all
            "intra_op_threads",  # 0 or None: onnxruntime's default
            "provider_options",  # {provider: {key: value}} merged over ours
            "trt_fp16",
            "trt_workspace_bytes",
            "trt_cache",
            "cache_dir",  # engine and timing caches; default default_cache_dir()/<target>
            "profile_shapes",
            "profile_feeds",
            "fix_axes",  # {symbolic axis: size}: free-dimension overrides
            "input_shapes",  # the spec's shapes (read by engines that keep no axis names)
        }
    )

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self._session = None

    def _session_options(self, ort, level: str | None = None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        level = level or self.options.get("graph_optimization_level", "all")
        if level not in _LEVELS:
            raise unknown_choice("graph optimization level", level, _LEVELS)
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
        threads = self.options.get("intra_op_threads")
        if threads:
            options.intra_op_num_threads = int(threads)
        # Fixed shapes let the optimiser plan for one size instead of symbolic axes.
        for axis, size in (self.options.get("fix_axes") or {}).items():
            options.add_free_dimension_override_by_name(axis, int(size))
        return options

    def _providers(self, ort) -> list:
        return _provider_list(self.target, lambda: self._tensorrt_options(ort),
                              self.options.get("provider_options"))

    def _tensorrt_options(self, ort) -> dict[str, str]:
        probe = ort.InferenceSession(
            str(self.model_path),
            sess_options=self._session_options(ort, "disable"),
            providers=["CPUExecutionProvider"],
        )
        specs = {i.name: tuple(_dim(d) for d in i.shape) for i in probe.get_inputs()}
        del probe
        ranges = self.options.get("profile_shapes")
        if ranges is None:
            feeds = self.options.get("profile_feeds") or []
            ranges = axis_ranges_from_shapes(
                specs, [{k: np.shape(v) for k, v in f.items()} for f in feeds]
            )
        cache_dir = Path(self.options.get("cache_dir") or default_cache_dir() / self.target.name)
        if self.options.get("trt_cache", True):
            try:
                (cache_dir / "trt-engines").mkdir(parents=True, exist_ok=True)
                (cache_dir / "trt-timing").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(
                    f"cannot create the TensorRT cache directory {cache_dir}: {e}",
                    stage="load",
                    hint="set QCRUN_CACHE_DIR to a writable directory",
                ) from None
        return _tensorrt_options(specs, ranges, cache_dir, self.options)

    def _load(self):
        ort = import_engine("onnxruntime")
        session = ort.InferenceSession(
            str(self.model_path),
            sess_options=self._session_options(ort),
            providers=self._providers(ort),
        )
        attached = session.get_providers()
        lost = [p for p in self.target.accelerator_providers if p not in attached]
        if lost:
            raise TargetUnavailable(
                f"target {self.target.name} is unavailable: onnxruntime dropped "
                f"{', '.join(lost)} and would run on {', '.join(attached)}",
                stage="load",
                hint="check the CUDA / cuDNN / TensorRT libraries that onnxruntime-gpu needs",
            )
        self._session = session
        return [_info(i) for i in session.get_inputs()], [_info(o) for o in session.get_outputs()]

    def _run(self, feed):
        names = [o.name for o in self._outputs]
        return dict(zip(names, self._session.run(names, feed), strict=True))

    def _close(self):
        self._session = None

    def reported_options(self) -> tuple[dict[str, Any], int | None]:
        if self._session is None:
            return {}, None
        so = self._session.get_session_options()
        threads = so.intra_op_num_threads or physical_cores()
        return {
            "providers": list(self._session.get_providers()),
            "graph_optimization_level": str(so.graph_optimization_level).split(".")[-1],
            "intra_op_num_threads": so.intra_op_num_threads or "default (physical cores)",
            "inter_op_num_threads": so.inter_op_num_threads or "default",
            "execution_mode": str(so.execution_mode).split(".")[-1],
        }, threads


class OrtProfilingAdapter(OrtAdapter):
    """OrtAdapter whose session writes a profiling trace and its optimised graph to
    ``profile_dir`` (weights of the optimised graph go to a side file that is never read;
    ``optimized_graph=False`` writes the trace only)."""

    known_options = OrtAdapter.known_options | {"profile_dir", "optimized_graph"}

    def _session_options(self, ort, level: str | None = None):
        options = super()._session_options(ort, level)
        if level is None:  # the session itself, not the TensorRT shape probe
            directory = Path(self.options["profile_dir"])
            options.enable_profiling = True
            options.profile_file_prefix = str(directory / "ort-profile")
            if not self.options.get("optimized_graph", True):
                return options
            options.optimized_model_filepath = str(directory / "optimized.onnx")
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", "optimized.data"
            )
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
            )
        return options

    def end_profiling(self) -> list[dict[str, Any]]:
        """The trace events of every run so far (profiling stops)."""
        return json.loads(Path(self._session.end_profiling()).read_text())


# --- the profiling trace ---------------------------------------------------------------------


def node_events(events: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(node name, event) for every node kernel event of an onnxruntime trace."""
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            yield name[: -len("_kernel_time")], event


def parse_ort_trace(events: Sequence[Mapping[str, Any]], skip_runs: int = 0):
    """Node kernel events of an onnxruntime trace, per run: [[(node, op, provider, us)]].

    Events are assigned to runs by time (each ``model_run`` event spans its nodes); the first
    ``skip_runs`` runs (warm-up) are dropped.
    """
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"
    )
    per_run: list[list[tuple[str, str, str, float]]] = [[] for _ in runs]
    for node, e in node_events(events):
        for index, (start, end) in enumerate(runs):
            if start <= e["ts"] <= end:
                args = e.get("args", {})
                per_run[index].append(
                    (node, args.get("op_name", "?"), args.get("provider", ""), float(e["dur"]))
                )
                break
    return per_run[skip_runs:]


def _breakdown(adapter: OrtProfilingAdapter, prov: Provenance | None, warmup: int, runs: int,
               point: Mapping[str, int], feed) -> OpBreakdown:
    for _ in range(warmup + runs):
        adapter.run(feed)
    per_run = parse_ort_trace(adapter.end_profiling(), skip_runs=warmup)
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
            outputs, consumers = graph_links(load_graph_only(optimized))
        except Exception as e:  # the optimised graph only refines the mapping
            notes.append(f"could not read onnxruntime's optimised graph ({e}); fused nodes "
                         "are not traced to modules")
        tracer = Tracer(prov, outputs, consumers)
    nodes = []
    count = max(len(per_run), 1)
    for (node, op, provider), us in totals.items():
        ms = us / 1e3 / count
        if tracer is None:
            nodes.append(NodeTime(node, op, ms, provider))
        else:
            nodes.append(tracer.node_time(node, op, ms, provider))
    nodes.sort(key=lambda n: -n.time_ms)
    return OpBreakdown("onnxruntime profiling", dict(point), len(per_run), nodes,
                       bool(prov and prov.has_metadata), notes)


def _observe(model_path: Path, feed: Mapping[str, Any]) -> ObservedShapes:
    model = load_graph_only(model_path)
    outputs_of: dict[str, list[str]] = {}
    duplicated: set[str] = set()
    for graph, _ in walk_graphs(model.graph):
        for node in graph.node:
            if node.name in outputs_of:
                duplicated.add(node.name)
            outputs_of[node.name] = [o for o in node.output if o]
    # Optimisations off, so that every node keeps its name and its tensors.
    with tempfile.TemporaryDirectory(prefix="qcrun-shapes-") as tmp:
        adapter = OrtProfilingAdapter(model_path, get_target("ort-cpu"),
                                      graph_optimization_level="disable", profile_dir=tmp,
                                      optimized_graph=False)
        with adapter:
            adapter.run(feed)
            trace = adapter.end_profiling()
    tensors = {name: tuple(int(d) for d in getattr(value, "shape", ()))
               for name, value in feed.items()}
    executed: set[str] = set()
    for node, event in node_events(trace):
        executed.add(node)
        if node in duplicated or node not in outputs_of:
            continue
        shapes = [
            tuple(int(d) for d in next(iter(entry.values())))
            for entry in event.get("args", {}).get("output_type_shape", [])
        ]
        if len(shapes) == len(outputs_of[node]):
            tensors.update(zip(outputs_of[node], shapes, strict=True))
    return ObservedShapes(tensors, executed, duplicated)


# --- the engine ------------------------------------------------------------------------------


class OrtEngine(Engine):
    name = NAME
    adapter = OrtAdapter

    def availability(self, target: Target) -> tuple[bool, str]:
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as e:
            return missing("onnxruntime", e)
        installed = list(ort.get_available_providers())
        version = getattr(ort, "__version__", "?")
        for provider in target.providers:
            if provider not in installed:
                return False, (
                    f"onnxruntime {version} has no {provider} (installed: "
                    f"{', '.join(installed)}); "
                    f"{_GPU_PROVIDER_HINTS.get(provider, 'install an onnxruntime build with it')}"
                )
        if not target.accelerator_providers:
            return True, f"onnxruntime {version} with {', '.join(target.providers)}"
        return _probe(ort, target, version)

    def profile_options(self, target, *, threads, accuracy):
        return {"intra_op_threads": threads} if threads else {}

    def op_breakdown(self, model_path, target, options, feed, *, prov, warmup, runs, point):
        with tempfile.TemporaryDirectory(prefix="qcrun-ops-") as tmp:
            with OrtProfilingAdapter(model_path, target, **options, profile_dir=tmp) as adapter:
                return _breakdown(adapter, prov, warmup, runs, point, adapter.check_feed(feed))

    def observe_shapes(self, model_path, feed):
        return _observe(Path(model_path), feed)

    def providers(self, target, *, input_shapes, profile_shapes, cache_dir):
        return _provider_list(target, lambda: _tensorrt_options(
            input_shapes, profile_shapes, cache_dir, target.options))


def _probe(ort, target: Target, version: str) -> tuple[bool, str]:
    # onnxruntime-gpu lists CUDA even when libcudart / cuDNN cannot be loaded, and then quietly
    # builds a CPU-only session: only a real session tells the truth.
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            PROBE_MODEL, sess_options=options, providers=list(target.providers)
        )
        attached = list(session.get_providers())
    except Exception as e:  # the engine's own failure is the reason we report
        return False, f"onnxruntime could not create a {target.providers[0]} session: {e}"
    for provider in target.accelerator_providers:
        if provider not in attached:
            return False, (
                f"onnxruntime lists {provider} but a session fell back to "
                f"{', '.join(attached)}; its libraries (CUDA, cuDNN, TensorRT) are missing or "
                "do not match this onnxruntime-gpu build: check LD_LIBRARY_PATH and the "
                "onnxruntime log"
            )
    return True, f"onnxruntime {version} with {', '.join(attached)}"


ENGINE = OrtEngine()

"""OpenVINO: availability, the adapter with its request pool, performance counters.

An ``InferRequest`` holds its input and output tensors and must not be shared, so the adapter
keeps a pool of requests of the one compiled model: a call takes an idle request (or creates
one) and returns it after copying its outputs.
"""

from __future__ import annotations

import importlib
import queue
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from qcrun.engines.base import Adapter, Dim, Engine, TensorInfo, missing
from qcrun.errors import import_engine
from qcrun.profiling.provenance import Provenance, Tracer
from qcrun.profiling.records import NodeTime, OpBreakdown
from qcrun.targets import Target

NAME = "openvino"


class OpenVinoAdapter(Adapter):
    """OpenVINO ``Core.read_model`` + ``compile_model`` on the target's device.

    ``accuracy`` (default on) sets ``EXECUTION_MODE_HINT=ACCURACY``: Intel GPUs otherwise run
    fp32 models in f16. Input and output names are the ONNX names read before compilation;
    compiled ports are matched through all their names, because compilation can merge a no-op
    Cast into an input and change the name it reports first.
    """

    engine = NAME
    concurrency = "one InferRequest per concurrent call, from a pool"
    known_options = frozenset({"accuracy", "num_threads", "config"})

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self._compiled = None
        self._in_ports: dict[str, Any] = {}
        self._out_ports: dict[str, Any] = {}
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self._created = 0
        self._count_lock = threading.Lock()

    def _config(self) -> dict[str, Any]:
        config = {}
        if self.options.get("accuracy", True):
            config["EXECUTION_MODE_HINT"] = "ACCURACY"
        if self.options.get("num_threads"):
            config["INFERENCE_NUM_THREADS"] = int(self.options["num_threads"])
        config.update(self.options.get("config") or {})
        return config

    def _load(self):
        ov = import_engine("openvino")
        core = ov.Core()
        return self._compile(core, core.read_model(str(self.model_path)))

    def _compile(self, core, model):
        compiled = core.compile_model(model, self.target.device, self._config())
        inputs, self._in_ports = _match_ports(model.inputs, compiled.inputs)
        outputs, self._out_ports = _match_ports(model.outputs, compiled.outputs)
        self._compiled = compiled
        self._pool = queue.SimpleQueue()
        self._pool.put(compiled.create_infer_request())
        self._created = 1
        return inputs, outputs

    @property
    def requests_created(self) -> int:
        return self._created

    def _acquire(self):
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            with self._count_lock:
                self._created += 1
            return self._compiled.create_infer_request()

    def _release(self, request) -> None:
        self._pool.put(request)

    def _run(self, feed):
        request = self._acquire()
        try:
            results = request.infer({self._in_ports[k]: v for k, v in feed.items()})
            # The request reuses its output buffers on its next call: copy before releasing it.
            return {name: np.array(results[port], copy=True)
                    for name, port in self._out_ports.items()}
        finally:
            self._release(request)

    def _close(self):
        self._compiled = None
        self._in_ports, self._out_ports = {}, {}
        self._pool = queue.SimpleQueue()

    def reported_options(self) -> tuple[dict[str, Any], int | None]:
        if self._compiled is None:
            return {}, None
        values = {}
        for key in _PROPERTIES:
            try:
                value = self._compiled.get_property(key)
            except Exception:  # a property this device or version does not have
                continue
            # ov.Type prints as "<Type: 'bfloat16'>"; its short name is "bf16"
            text = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
            values[key] = text.split(".")[-1]
        values["device"] = self.target.device
        try:
            threads = int(values.get("INFERENCE_NUM_THREADS", 0)) or None
        except ValueError:
            threads = None
        return values, threads


_PROPERTIES = (
    "PERFORMANCE_HINT",
    "EXECUTION_MODE_HINT",
    "INFERENCE_PRECISION_HINT",
    "INFERENCE_NUM_THREADS",
    "NUM_STREAMS",
    "ENABLE_HYPER_THREADING",
    "ENABLE_CPU_PINNING",
    "PERF_COUNT",
)


def _match_ports(model_ports, compiled_ports) -> tuple[list[TensorInfo], dict[str, Any]]:
    infos, ports = [], {}
    for index, port in enumerate(model_ports):
        names = set(port.get_names())
        name = port.get_any_name()
        match = next((c for c in compiled_ports if names & set(c.get_names())), None)
        if match is None:  # no shared name at all: fall back to position, same graph order
            match = compiled_ports[index]
        aliases = tuple(sorted((set(match.get_names()) | names) - {name}))
        infos.append(TensorInfo(name, _dtype(match), _shape(match), aliases))
        ports[name] = match
    return infos, ports


def _dtype(port) -> str | None:
    try:
        return str(np.dtype(port.get_element_type().to_dtype()))
    except Exception:  # dynamic or exotic element types have no numpy equivalent
        return None


def _shape(port) -> tuple[Dim, ...] | None:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        return None
    # OpenVINO keeps no names for dynamic axes.
    return tuple(d.get_length() if d.is_static else None for d in shape)


# --- performance counters --------------------------------------------------------------------


class OvProfilingAdapter(OpenVinoAdapter):
    """OpenVinoAdapter compiled with PERF_COUNT on, for ``get_profiling_info``, running every
    call on one request (whose counters are read); it keeps the model it read, whose generated
    op names the compiled graph refers to."""

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self.read_model = None

    def _config(self):
        return {**super()._config(), "PERF_COUNT": True}

    def _compile(self, core, model):
        self.read_model = model
        loaded = super()._compile(core, model)
        self.request = self._pool.get_nowait()
        return loaded

    def _acquire(self):
        return self.request

    def _release(self, request) -> None:
        pass  # the one request stays with the adapter

    def _close(self):
        super()._close()
        self.read_model = self.request = None


def _breakdown(adapter: OvProfilingAdapter, prov: Provenance | None, warmup: int, runs: int,
               point: Mapping[str, int], feed) -> OpBreakdown:
    for _ in range(warmup):
        adapter.run(feed)
    totals: dict[str, list] = {}
    for _ in range(runs):
        adapter.run(feed)
        for info in adapter.request.get_profiling_info():
            if not str(info.status).endswith("EXECUTED"):
                continue
            entry = totals.setdefault(info.node_name, [info.node_type, info.exec_type, 0.0])
            entry[2] += info.real_time.total_seconds() * 1e3
    notes = []
    tracer = None
    if prov is not None:
        try:
            tracer = _tracer(adapter, prov)
        except Exception as e:  # the runtime graph only refines the mapping
            notes.append(f"could not read OpenVINO's runtime graph ({e}); nodes are traced by "
                         "name only")
            tracer = Tracer(prov)
    nodes = []
    for name, (op_type, kernel, ms) in totals.items():
        ms /= max(runs, 1)
        if tracer is None:
            nodes.append(NodeTime(name, op_type, ms, kernel))
        else:
            nodes.append(tracer.node_time(name, op_type, ms, kernel))
    nodes.sort(key=lambda n: -n.time_ms)
    return OpBreakdown("OpenVINO performance counters", dict(point), runs, nodes,
                       bool(prov and prov.has_metadata), notes)


def _consumers(op) -> list[str]:
    return [
        t.get_node().get_friendly_name() for out in op.outputs() for t in out.get_target_inputs()
    ]


_TYPES = r"(?:f64|f32|bf16|f16|f8e4m3|f8e5m2|i64|i32|i16|i8|i4|u64|u32|u16|u8|u4|u1|boolean)"
_REORDER = re.compile(rf"^(.+?)_{_TYPES}_{_TYPES}_(.+)$", re.IGNORECASE)


def _tracer(adapter: OvProfilingAdapter, prov: Provenance) -> Tracer:
    """OpenVINO names: the compiled graph's nodes list the read model's ops they were built
    from (``originalLayersNames``); the read model's ops carry ONNX node names, or, for ops a
    decomposition added (MVN of a LayerNormalization, the SDPA of an Attention), feed the op
    that carries the name. Precision reorders ("a_f32_bf16_b") belong to their consumer b."""
    read_outputs, read_consumers = {}, {}
    for op in adapter.read_model.get_ordered_ops():
        name = op.get_friendly_name()
        read_outputs[name] = [n for out in op.outputs() for n in out.get_names()]
        read_consumers[name] = _consumers(op)
    read_tracer = Tracer(prov, read_outputs, read_consumers)

    originals: dict[str, list[str]] = {}
    consumers: dict[str, list[str]] = {}
    for op in adapter._compiled.get_runtime_model().get_ordered_ops():
        name = op.get_friendly_name()
        info = op.get_rt_info()
        if "originalLayersNames" in info:
            originals[name] = [n for n in info["originalLayersNames"].astype(str).split(",") if n]
        consumers[name] = _consumers(op)

    class _OvTracer(Tracer):
        def _direct(self, name):
            if name in read_outputs:
                found = read_tracer.trace(name)
                if found[0] is not None:
                    return found
            for original in originals.get(name, ()):
                found = read_tracer.trace(original)
                if found[0] is not None:
                    return found
            match = _REORDER.match(name)
            if match and match.group(2) != name:
                return self.trace(match.group(2))
            return None, ""

    return _OvTracer(prov, consumers=consumers)


# --- the engine ------------------------------------------------------------------------------


class OpenVinoEngine(Engine):
    name = NAME
    adapter = OpenVinoAdapter

    def availability(self, target: Target) -> tuple[bool, str]:
        try:
            ov = importlib.import_module("openvino")
        except ImportError as e:
            return missing("openvino", e)
        try:
            devices = list(ov.Core().available_devices)
        except Exception as e:  # the engine's own failure is the reason we report
            return False, f"OpenVINO could not list devices: {e}"
        version = getattr(ov, "__version__", "?").split("-")[0]
        matching = [d for d in devices
                    if d == target.device or d.startswith(f"{target.device}.")]
        if not matching:
            hint = (
                "install the Intel GPU compute runtime (intel-opencl-icd, level-zero) and add "
                "the user to the render group"
                if target.device == "GPU"
                else "check the OpenVINO installation"
            )
            return False, (
                f"OpenVINO {version} sees no {target.device} device "
                f"(available: {', '.join(devices) or 'none'}); {hint}"
            )
        return True, f"OpenVINO {version} on {', '.join(matching)}"

    def profile_options(self, target, *, threads, accuracy):
        # Profiles use OpenVINO's performance defaults unless asked for parity's ACCURACY.
        options: dict[str, Any] = {"accuracy": accuracy}
        if threads:
            options["num_threads"] = threads
        return options

    def op_breakdown(self, model_path, target, options, feed, *, prov, warmup, runs, point):
        with OvProfilingAdapter(model_path, target, **options) as adapter:
            return _breakdown(adapter, prov, warmup, runs, point, adapter.check_feed(feed))

    def profile_warnings(self, reported, precision):
        hint = str(reported.get("INFERENCE_PRECISION_HINT", "")).lower()
        if precision in (None, "fp32") and hint and "f32" not in hint:
            return [f"OpenVINO computes this fp32 model in {hint} (its performance default on "
                    "this CPU): timings are for reduced precision, and parity runs (ACCURACY) "
                    "are slower; pass --accuracy for fp32 timings"]
        return []


ENGINE = OpenVinoEngine()

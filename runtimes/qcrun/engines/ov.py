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

from qcrun.choices import FLOAT_PRECISION
from qcrun.engines.base import (
    Adapter,
    Dim,
    Engine,
    Held,
    TargetUnavailable,
    TensorInfo,
    missing,
)
from qcrun.errors import import_engine
from qcrun.profiling.provenance import Provenance, Tracer
from qcrun.profiling.records import NodeTime, OpBreakdown
from qcrun.targets import Target

NAME = "openvino"


class OpenVinoAdapter(Adapter):
    """OpenVINO ``Core.read_model`` + ``compile_model`` on the target's device.

    ``INFERENCE_PRECISION_HINT`` is always set from the declared precision (``precision``)
    and read back after compilation: on CPUs with AVX-512 BF16 or AMX the CPU plugin computes
    fp32 models in bf16 by default, and Intel GPUs in f16. A compiled model that reports
    another precision than the one asked for is refused (``TargetUnavailable``), so that no
    run times or judges an undeclared precision. ``accuracy`` (default on) also sets
    ``EXECUTION_MODE_HINT=ACCURACY``. Input and output names are the ONNX names read before compilation;
    compiled ports are matched through all their names, because compilation can merge a no-op
    Cast into an input and change the name it reports first.
    """

    engine = NAME
    concurrency = "one InferRequest per concurrent call, from a pool"
    known_options = frozenset({"accuracy", "num_threads", "config", "fix_axes", "input_shapes",
                               "compiled_blob", "compiled_config"})

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self._compiled = None
        self._in_ports: dict[str, Any] = {}
        self._out_ports: dict[str, Any] = {}
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        self._created = 0
        self._count_lock = threading.Lock()
        self._inference: str | None = None
        self._blob = None  # the mapped compiled model, kept while the imported model lives
        self.cache_state = "none"  # the compiled-model cache: none | used | not used: why

    def _config(self) -> dict[str, Any]:
        config = {"INFERENCE_PRECISION_HINT": _hint(self.precision, self.target.device)}
        if self.options.get("accuracy", True):
            config["EXECUTION_MODE_HINT"] = "ACCURACY"
        if self.options.get("num_threads"):
            config["INFERENCE_NUM_THREADS"] = int(self.options["num_threads"])
        config.update(self.options.get("config") or {})
        return config

    def _load(self):
        ov = import_engine("openvino")
        core = ov.Core()
        imported = self._import(core)
        if imported is not None:
            return self._compile(core, None, imported)
        model = core.read_model(str(self.model_path))
        shapes = _fixed_port_shapes(model, self.options)
        if shapes:
            model.reshape(shapes)
        return self._compile(core, model)

    def _import(self, core):
        """The compiled model from the bundle's compiled-model cache (``compiled_blob``, whose
        hash the bundle checked), when it was compiled with this adapter's settings; else None
        and ``cache_state`` says why: a cache only ever saves time."""
        blob = self.options.get("compiled_blob")
        if not blob:
            self.cache_state = "none"
            return None
        wanted = cache_settings(self._config(), self.options.get("fix_axes"), self.target.device)
        if dict(self.options.get("compiled_config") or {}) != wanted:
            self.cache_state = ("not used: compiled with other settings "
                                f"({self.options.get('compiled_config')}, not {wanted})")
            return None
        try:
            self._blob = _mapped_blob(blob)
            return core.import_model(self._blob, self.target.device, self._config())
        except Exception as e:  # another OpenVINO version or CPU: compile from the IR instead
            self._blob = None
            self.cache_state = f"not used: OpenVINO refused it ({' '.join(str(e).split())[:200]})"
            return None

    def _compile(self, core, model, imported=None):
        compiled = imported or core.compile_model(model, self.target.device, self._config())
        if imported is not None:
            self.cache_state = "used"
            model = compiled  # an imported model's ports carry the model's names
        self._check_precision(compiled)
        inputs, self._in_ports = _match_ports(model.inputs, compiled.inputs)
        outputs, self._out_ports = _match_ports(model.outputs, compiled.outputs)
        self._compiled = compiled
        self._pool = queue.SimpleQueue()
        self._pool.put(compiled.create_infer_request())
        self._created = 1
        return inputs, outputs

    def _check_precision(self, compiled) -> None:
        wanted = _hint(self.precision, self.target.device)
        got = _read_hint(compiled)
        if got != wanted:
            raise TargetUnavailable(
                f"{self.target.name}: OpenVINO compiled {self.model_path.name} to compute in "
                f"{got}, not the {wanted} that its declared precision {self.precision} asks "
                f"for (this {self.target.device} device cannot compute {wanted}, or an option "
                "overrode INFERENCE_PRECISION_HINT)", stage="load",
                hint="run the fp32 model here, or the declared precision on a device that "
                "computes it (bf16: a CPU with AVX-512 BF16 or AMX)")
        self._inference = _PRECISION_NAMES[got]

    def inference_precision(self) -> str | None:
        return self._inference if self._compiled is not None else None

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

    def hold(self, arrays):
        """OpenVINO tensors over the arrays' memory: a run sets them on its request as they
        are, where a numpy input is copied into the request's own tensor on every run."""
        ov = import_engine("openvino")
        kept = {k: np.ascontiguousarray(v) if np.ndim(v) else np.asarray(v)
                for k, v in arrays.items()}
        return Held(kept, {k: ov.Tensor(v, shared_memory=True) for k, v in kept.items()})

    def _close(self):
        self._compiled = self._blob = None
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


#: OpenVINO's element type names of the inference precisions, and qcrun's names for them.
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def _hint(precision: str, device: str | None) -> str:
    """The ``INFERENCE_PRECISION_HINT`` for a model declared ``precision``: its float
    operations' precision (``FLOAT_PRECISION``). An fp16 graph on a CPU is computed in f32 (the
    CPU plugin turns an f16 hint into bf16 on CPUs without fp16 arithmetic)."""
    wanted = FLOAT_PRECISION[precision]
    if wanted == "fp16" and device != "GPU":
        wanted = "fp32"
    return {v: k for k, v in _PRECISION_NAMES.items()}[wanted]


def _read_hint(compiled) -> str:
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


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


def cache_settings(config: Mapping[str, Any], fix_axes, device: str | None) -> dict[str, Any]:
    """What a compiled model depends on besides the IR: the compile config, the fixed axes
    and the device. A compiled-model cache is used only when these are the adapter's."""
    return {"config": {k: str(v) for k, v in sorted(config.items())},
            "fix_axes": dict(sorted((fix_axes or {}).items())), "device": device}


def _mapped_blob(path):
    """A compiled model's file as an OpenVINO tensor over a private memory map. Importing
    ``bytes`` copied the whole blob (weights included) three times: into Python, into a
    stream, into the plugin, and made a cached load slower than compiling the IR; over a map
    the plugin reads the pages it needs in place, and copy-on-write keeps the file as it is."""
    ov = import_engine("openvino")
    return ov.Tensor(np.memmap(path, dtype=np.uint8, mode="c"), shared_memory=True)


def _fixed_port_shapes(model, options: Mapping[str, Any]) -> dict[Any, Any]:
    """``model.reshape`` argument fixing the axes of ``fix_axes`` (label -> size): OpenVINO
    keeps no axis names, so the positions come from ``input_shapes`` (the spec's shapes)."""
    fix, specs = options.get("fix_axes") or {}, options.get("input_shapes") or {}
    if not fix:
        return {}
    shapes = {}
    for port in model.inputs:
        spec = next((specs[n] for n in port.get_names() if n in specs), None)
        if spec is None or not any(isinstance(d, str) and d in fix for d in spec):
            continue
        current = port.get_partial_shape()
        dims = [fix[d] if isinstance(d, str) and d in fix else current[i]
                for i, d in enumerate(spec)]
        shapes[port] = type(current)(dims)
    return shapes


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
    formats = ("ir", "onnx")  # IR: no ONNX parsing and conversion at every load

    def write_compiled_cache(self, model_path, target, options, out):
        with self.open(model_path, target, **options) as adapter:
            blob = adapter._compiled.export_model()
            data = blob.getvalue() if hasattr(blob, "getvalue") else bytes(blob)
            settings = cache_settings(adapter._config(), options.get("fix_axes"), target.device)
        with open(out, "wb") as f:
            f.write(data)
        return settings

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
        # Profiles use OpenVINO's performance mode unless asked for parity's ACCURACY; the
        # inference precision is the declared one either way (the adapter pins it).
        options: dict[str, Any] = {"accuracy": accuracy}
        if threads:
            options["num_threads"] = threads
        return options

    def op_breakdown(self, model_path, target, options, feed, *, prov, warmup, runs, point):
        with OvProfilingAdapter(model_path, target, **options) as adapter:
            return _breakdown(adapter, prov, warmup, runs, point, adapter.check_feed(feed))



ENGINE = OpenVinoEngine()

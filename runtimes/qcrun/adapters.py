"""One small runner per engine, with one lifecycle (after Polygraphy's runners).

``__init__`` only stores the model path, the target and the options; ``load()`` does the heavy
work (session creation, compilation) and reads the input and output metadata; ``run(feed)``
takes and returns arrays by name; ``close()`` releases the engine. Adapters are context
managers (``with open_adapter(...) as a:``) and can be loaded again after ``close()``.

Every feed is checked against the model's inputs before it reaches the engine, so that a wrong
name, dtype or rank is a UserError naming the input instead of an engine stack trace. Engine
failures while loading or running are wrapped in ``LoadFailed`` / ``RunFailed`` (both
UserErrors) carrying the engine's own message, so that a parity run can record them and go on
with the next target.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qcrun.errors import UserError, unknown_choice
from qcrun.targets import (
    Target,
    availability,
    axis_ranges_from_shapes,
    default_cache_dir,
    get_target,
    import_engine,
    tensorrt_provider_options,
)

Dim = int | str | None


class TargetUnavailable(UserError):
    """The target cannot run on this machine (engine missing, no device, silent CPU fallback)."""


class LoadFailed(UserError):
    """The engine refused the model (parse, compile or session creation error)."""


class RunFailed(UserError):
    """The engine failed while running a feed that matched the model's inputs."""


@dataclass(frozen=True)
class TensorInfo:
    """An input or output as the engine sees it.

    ``dtype`` is a numpy dtype string ("float32"), or None for a type numpy cannot name.
    ``shape`` holds ints for static axes and a string (symbolic name) or None for dynamic ones;
    it is None when even the rank is unknown. ``aliases`` are further names the engine accepts
    for the same tensor (OpenVINO merges the names of a no-op Cast into its input).
    """

    name: str
    dtype: str | None
    shape: tuple[Dim, ...] | None
    aliases: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name} {self.dtype or '?'}[rank ?]"
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype or '?'}[{dims}]"


class Adapter:
    """Base runner: the lifecycle, option checking and feed validation shared by all engines."""

    engine: ClassVar[str] = ""
    known_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model_path: str | Path, target: str | Target, **options: Any):
        self.model_path = Path(model_path)
        self.target = get_target(target)
        self.options = {**self.target.options, **options}
        self._inputs: list[TensorInfo] | None = None
        self._outputs: list[TensorInfo] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self._inputs is not None

    def load(self) -> Adapter:
        """Create the engine session; idempotent. Returns self, so ``a = A(...).load()`` reads."""
        if self.is_loaded:
            return self
        for key in self.options:
            if key not in self.known_options:
                raise unknown_choice(f"{self.engine} option", key, self.known_options)
        if not self.model_path.is_file():
            raise UserError(
                f"model file {self.model_path} does not exist",
                stage="load",
                hint="pass the path of an exported .onnx file",
            )
        try:
            inputs, outputs = self._load()
        except UserError:
            raise
        except Exception as e:  # any engine exception: report the engine's own words
            raise LoadFailed(
                f"{self.target.name}: {self.engine} could not load {self.model_path}: "
                f"{_one_paragraph(e)}",
                stage="load",
            ) from e
        self._inputs, self._outputs = inputs, outputs
        return self

    def close(self) -> None:
        self._close()
        self._inputs = self._outputs = None

    def __enter__(self) -> Adapter:
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "loaded" if self.is_loaded else "not loaded"
        return f"{type(self).__name__}({str(self.model_path)!r}, {self.target.name!r}, {state})"

    # -- metadata and running -----------------------------------------------------------------

    @property
    def inputs(self) -> list[TensorInfo]:
        self._require_loaded()
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        self._require_loaded()
        return list(self._outputs)

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one feed; returns every output by its model name."""
        self._require_loaded()
        checked = self.check_feed(feed)
        try:
            return self._run(checked)
        except UserError:
            raise
        except Exception as e:  # any engine exception: report the engine's own words
            raise RunFailed(
                f"{self.target.name}: {self.engine} failed to run {self.model_path.name}: "
                f"{_one_paragraph(e)}",
                stage="run",
            ) from e

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feed keyed by canonical input names, or a UserError listing every mismatch."""
        self._require_loaded()
        by_name = {}
        for info in self._inputs:
            for name in (info.name, *info.aliases):
                by_name[name] = info
        problems, checked = [], {}
        for key, value in feed.items():
            info = by_name.get(key)
            if info is None:
                problems.append(f"input {key!r} is not an input of the model")
                continue
            if info.name in checked:
                problems.append(f"input {info.name!r} is given twice (as {key!r})")
                continue
            array = np.asarray(value)
            if not array.flags.c_contiguous:  # not np.ascontiguousarray: it makes 0-d arrays 1-d
                array = np.ascontiguousarray(array)
            problems += _array_problems(info, array)
            checked[info.name] = array
        for info in self._inputs:
            if info.name not in checked:
                problems.append(f"input {info.name!r} is missing")
        if problems:
            expected = ", ".join(i.describe() for i in self._inputs)
            raise UserError(
                f"feed does not match {self.model_path.name} on {self.target.name}: "
                f"{'; '.join(problems)} (the model expects {expected})",
                stage="run",
                hint="feed arrays with the model's input names, dtypes and ranks",
            )
        return checked

    def _require_loaded(self) -> None:
        if not self.is_loaded:
            raise RuntimeError(f"{self!r}: call load() (or use it as a context manager) first")

    # -- engine hooks -------------------------------------------------------------------------

    def _load(self) -> tuple[list[TensorInfo], list[TensorInfo]]:
        raise NotImplementedError

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


def _array_problems(info: TensorInfo, array: np.ndarray) -> list[str]:
    problems = []
    if info.dtype is not None and str(array.dtype) != info.dtype:
        problems.append(f"input {info.name!r} has dtype {array.dtype}, expected {info.dtype}")
    if info.shape is None:
        return problems
    if array.ndim != len(info.shape):
        problems.append(
            f"input {info.name!r} has rank {array.ndim} (shape {list(array.shape)}), "
            f"expected rank {len(info.shape)} ({info.describe()})"
        )
        return problems
    for axis, (got, want) in enumerate(zip(array.shape, info.shape, strict=True)):
        if isinstance(want, int) and got != want:
            problems.append(
                f"input {info.name!r} axis {axis} has size {got}, expected {want} "
                f"({info.describe()})"
            )
    return problems


def _one_paragraph(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


# --- onnxruntime -----------------------------------------------------------------------------

_ORT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_ORT_TYPE = re.compile(r"^tensor\((\w+)\)$")
_ORT_DTYPES = {"float": "float32", "double": "float64"}


def _ort_info(node) -> TensorInfo:
    match = _ORT_TYPE.match(node.type)
    dtype = None
    if match:
        name = _ORT_DTYPES.get(match.group(1), match.group(1))
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


class OrtAdapter(Adapter):
    """onnxruntime with the target's execution providers.

    For TensorRT targets, ``load`` first reads the input shapes with a plain CPU session, then
    builds the TensorRT profile from ``profile_shapes`` (axis -> (min, opt, max)) or, failing
    that, from ``profile_feeds`` (example feeds, e.g. the golden inputs).
    """

    engine = "onnxruntime"
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
        }
    )

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self._session = None

    def _session_options(self, ort, level: str | None = None):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        level = level or self.options.get("graph_optimization_level", "all")
        if level not in _ORT_LEVELS:
            raise unknown_choice("graph optimization level", level, _ORT_LEVELS)
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[level])
        threads = self.options.get("intra_op_threads")
        if threads:
            options.intra_op_num_threads = int(threads)
        return options

    def _providers(self, ort) -> list:
        extra = self.options.get("provider_options") or {}
        providers = []
        for name in self.target.providers:
            options = {}
            if name == "TensorrtExecutionProvider":
                options = self._tensorrt_options(ort)
            options.update(extra.get(name, {}))
            providers.append((name, options) if options else name)
        return providers

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
        return tensorrt_provider_options(
            specs,
            ranges,
            cache_dir=cache_dir,
            fp16=bool(self.options.get("trt_fp16", False)),
            workspace_bytes=int(self.options.get("trt_workspace_bytes", 2 << 30)),
            cache=bool(self.options.get("trt_cache", True)),
        )

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
        return [_ort_info(i) for i in session.get_inputs()], [
            _ort_info(o) for o in session.get_outputs()
        ]

    def _run(self, feed):
        names = [o.name for o in self._outputs]
        return dict(zip(names, self._session.run(names, feed), strict=True))

    def _close(self):
        self._session = None


# --- OpenVINO --------------------------------------------------------------------------------


class OpenVinoAdapter(Adapter):
    """OpenVINO ``Core.read_model`` + ``compile_model`` on the target's device.

    ``accuracy`` (default on) sets ``EXECUTION_MODE_HINT=ACCURACY``: Intel GPUs otherwise run
    fp32 models in f16. Input and output names are the ONNX names read before compilation;
    compiled ports are matched through all their names, because compilation can merge a no-op
    Cast into an input and change the name it reports first.
    """

    engine = "openvino"
    known_options = frozenset({"accuracy", "num_threads", "config"})

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self._compiled = self._request = None
        self._in_ports: dict[str, Any] = {}
        self._out_ports: dict[str, Any] = {}

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
        model = core.read_model(str(self.model_path))
        compiled = core.compile_model(model, self.target.device, self._config())
        inputs, self._in_ports = _match_ports(model.inputs, compiled.inputs)
        outputs, self._out_ports = _match_ports(model.outputs, compiled.outputs)
        self._compiled, self._request = compiled, compiled.create_infer_request()
        self.read_model = model  # the model as read, for tools that map nodes back (profile)
        return inputs, outputs

    def _run(self, feed):
        results = self._request.infer({self._in_ports[k]: v for k, v in feed.items()})
        # The request reuses its output buffers on the next call: copy.
        return {name: np.array(results[port], copy=True) for name, port in self._out_ports.items()}

    def _close(self):
        self._compiled = self._request = None
        self._in_ports, self._out_ports = {}, {}


def _match_ports(model_ports, compiled_ports) -> tuple[list[TensorInfo], dict[str, Any]]:
    infos, ports = [], {}
    for index, port in enumerate(model_ports):
        names = set(port.get_names())
        name = port.get_any_name()
        match = next((c for c in compiled_ports if names & set(c.get_names())), None)
        if match is None:  # no shared name at all: fall back to position, same graph order
            match = compiled_ports[index]
        aliases = tuple(sorted((set(match.get_names()) | names) - {name}))
        infos.append(TensorInfo(name, _ov_dtype(match), _ov_shape(match), aliases))
        ports[name] = match
    return infos, ports


def _ov_dtype(port) -> str | None:
    try:
        return str(np.dtype(port.get_element_type().to_dtype()))
    except Exception:  # dynamic or exotic element types have no numpy equivalent
        return None


def _ov_shape(port) -> tuple[Dim, ...] | None:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        return None
    # OpenVINO keeps no names for dynamic axes.
    return tuple(d.get_length() if d.is_static else None for d in shape)


# --- onnx.reference --------------------------------------------------------------------------


class ReferenceAdapter(Adapter):
    """``onnx.reference.ReferenceEvaluator``: slow, pure Python, a second opinion on kernels."""

    engine = "onnx-reference"
    known_options = frozenset()

    def __init__(self, model_path, target, **options):
        super().__init__(model_path, target, **options)
        self._evaluator = None

    def _load(self):
        onnx = import_engine("onnx")
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(self.model_path))
        self._evaluator = ReferenceEvaluator(model)
        initializers = {t.name for t in model.graph.initializer}
        inputs = [_onnx_info(onnx, v) for v in model.graph.input if v.name not in initializers]
        return inputs, [_onnx_info(onnx, v) for v in model.graph.output]

    def _run(self, feed):
        names = [o.name for o in self._outputs]
        results = self._evaluator.run(names, feed)
        return {name: np.asarray(r) for name, r in zip(names, results, strict=True)}

    def _close(self):
        self._evaluator = None


def _onnx_info(onnx, value_info) -> TensorInfo:
    tensor = value_info.type.tensor_type
    try:
        dtype = str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)))
    except Exception:  # undefined or exotic element types have no numpy equivalent
        dtype = None
    shape = None
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    return TensorInfo(value_info.name, dtype, shape)


# --- choosing an adapter ---------------------------------------------------------------------

ADAPTERS: dict[str, type[Adapter]] = {
    OrtAdapter.engine: OrtAdapter,
    OpenVinoAdapter.engine: OpenVinoAdapter,
    ReferenceAdapter.engine: ReferenceAdapter,
}


def adapter_for(model_path: str | Path, target: str | Target, **options: Any) -> Adapter:
    """An adapter for ``target``, not loaded (and without checking availability)."""
    target = get_target(target)
    return ADAPTERS[target.engine](model_path, target, **options)


def open_adapter(model_path: str | Path, target_name: str | Target, **options: Any) -> Adapter:
    """A loaded adapter for ``target_name``, or TargetUnavailable saying why it cannot run."""
    target = get_target(target_name)
    ok, reason = availability(target)
    if not ok:
        raise TargetUnavailable(f"target {target.name} is unavailable: {reason}", stage="load")
    return adapter_for(model_path, target, **options).load()


def describe(infos: Sequence[TensorInfo]) -> str:
    return ", ".join(i.describe() for i in infos)

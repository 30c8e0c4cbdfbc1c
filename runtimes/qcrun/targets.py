"""Named target profiles: which engine runs a model, on what, with which options.

A target is data, not code: adding one is adding a ``Target`` to ``_TARGETS``. Adapters read the
engine, device, providers and options from it; the exporter reads the attention forms and the
opset it accepts; the tolerance policy reads its overrides. ``availability`` says whether the
target can run on this machine and, when it cannot, exactly why, so that an unavailable target
is reported as skipped with a reason and never as passed.

Engines are imported lazily (inside functions) because a device has only one of them installed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qcrun.errors import UserError, unknown_choice

ENGINES = ("onnxruntime", "openvino", "onnx-reference")
ATTENTION_FORMS = ("onnx", "ort", "decomposed")
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
TOLERANCE_FIELDS = ("max_abs", "max_rel", "min_cosine")

#: Install hints per importable module, shown when it is missing.
INSTALL_HINTS = {
    "onnxruntime": "pip install 'qcrun[ort]' (or 'qcrun[ort-gpu]' on a CUDA host)",
    "openvino": "pip install 'qcrun[openvino]'",
    "onnx": "pip install 'qcrun[reference]'",
}

# A serialized ONNX model (ir 8, opset 13, y = Identity(x), x: float[1]) used to probe whether
# an execution provider really attaches to a session. It is embedded as bytes so that probing
# needs neither the onnx package nor a model file; tests rebuild it with onnx.helper and compare.
PROBE_MODEL = bytes.fromhex(
    "08081205716372756e3a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a"
    "0a08080112040a020801620f0a0179120a0a08080112040a02080142040a00100d"
)

_CPU_EP = "CPUExecutionProvider"
_CUDA_EP = "CUDAExecutionProvider"
_TRT_EP = "TensorrtExecutionProvider"

_GPU_PROVIDER_HINTS = {
    _CUDA_EP: "install onnxruntime-gpu on a CUDA host (pip install 'qcrun[ort-gpu]' after "
    "uninstalling onnxruntime)",
    _TRT_EP: "install onnxruntime-gpu built with TensorRT, and the TensorRT libraries "
    "(JetPack on Jetson)",
}


def _frozen(mapping: Mapping | None) -> Mapping:
    """A read-only copy, so that a shared profile cannot be changed by one caller."""
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Target:
    """One named place a model runs: engine, device or providers, options, what it accepts.

    ``attention_forms`` is ordered by preference: ``--attention auto`` takes the first.
    ``tolerance_overrides`` maps a precision to a partial tolerance (keys among
    ``TOLERANCE_FIELDS``) applied over the policy's default for that precision, for targets
    whose arithmetic differs from PyTorch eager for a known reason (TF32, fp16 kernels).
    ``options`` are the adapter's defaults; callers may override them per run.
    """

    name: str
    engine: str
    description: str
    attention_forms: tuple[str, ...]
    max_opset: int
    precisions: tuple[str, ...]
    device: str | None = None
    providers: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    tolerance_overrides: Mapping[str, Mapping[str, float | None]] = field(
        default_factory=dict, hash=False
    )

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"target {self.name}: engine {self.engine!r} not in {ENGINES}")
        bad_forms = set(self.attention_forms) - set(ATTENTION_FORMS)
        if bad_forms or not self.attention_forms:
            raise ValueError(f"target {self.name}: bad attention forms {self.attention_forms}")
        if set(self.precisions) - set(PRECISIONS):
            raise ValueError(f"target {self.name}: bad precisions {self.precisions}")
        for precision, fields in self.tolerance_overrides.items():
            if precision not in PRECISIONS or set(fields) - set(TOLERANCE_FIELDS):
                raise ValueError(f"target {self.name}: bad tolerance override {precision}")
        object.__setattr__(self, "options", _frozen(self.options))
        object.__setattr__(
            self,
            "tolerance_overrides",
            _frozen({k: _frozen(v) for k, v in self.tolerance_overrides.items()}),
        )

    @property
    def preferred_attention(self) -> str:
        return self.attention_forms[0]

    def accepts_attention(self, form: str) -> bool:
        return form in self.attention_forms

    @property
    def needs_profile_shapes(self) -> bool:
        """TensorRT builds an engine per shape range, so every dynamic input needs min/opt/max."""
        return _TRT_EP in self.providers

    @property
    def accelerator_providers(self) -> tuple[str, ...]:
        """The providers that must really attach for this target to count as available."""
        return tuple(p for p in self.providers if p != _CPU_EP)


# Tolerance overrides, and why:
# - CUDA and TensorRT run fp32 MatMuls in TF32 by default on Ampere and later (10-bit
#   mantissa), so fp32 results drift ~1e-3 from PyTorch eager on CPU.
# - jetson-orin enables fp16 kernels in TensorRT, which may then run even an fp32 graph in
#   fp16: hold its fp32 models to the fp16 numbers.
# - Intel GPUs accumulate in a different order (and in f16 unless ACCURACY is set, which the
#   adapter does); allow the same as TF32.
_TF32 = {"max_abs": 1e-3, "min_cosine": 0.9999}
_FP16_LEVEL = {"max_abs": 1e-2, "max_rel": 1e-2, "min_cosine": 0.999}

_TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="ort-cpu",
            engine="onnxruntime",
            description="ONNX Runtime, CPU execution provider",
            providers=(_CPU_EP,),
            attention_forms=("onnx", "ort", "decomposed"),
            max_opset=23,
            precisions=PRECISIONS,
            options={"graph_optimization_level": "all"},
        ),
        Target(
            name="ort-cuda",
            engine="onnxruntime",
            description="ONNX Runtime, CUDA execution provider (CPU for unsupported nodes)",
            providers=(_CUDA_EP, _CPU_EP),
            attention_forms=("ort", "onnx", "decomposed"),
            max_opset=23,
            precisions=("fp32", "fp16", "int8-static"),
            options={"graph_optimization_level": "all"},
            tolerance_overrides={"fp32": _TF32},
        ),
        Target(
            name="ort-tensorrt",
            engine="onnxruntime",
            description="ONNX Runtime, TensorRT execution provider with CUDA fallback",
            providers=(_TRT_EP, _CUDA_EP, _CPU_EP),
            # TensorRT parses Attention only from 10.14 and never inside If.
            attention_forms=("decomposed",),
            max_opset=17,
            precisions=("fp32", "fp16", "int8-static"),
            options={
                "graph_optimization_level": "all",
                "trt_fp16": False,
                "trt_workspace_bytes": 4 << 30,
                "trt_cache": True,
            },
            tolerance_overrides={"fp32": _TF32},
        ),
        Target(
            name="jetson-orin",
            engine="onnxruntime",
            description="Jetson Orin (JetPack 6, TensorRT 10.3): TensorRT EP in fp16, CUDA "
            "fallback",
            providers=(_TRT_EP, _CUDA_EP, _CPU_EP),
            attention_forms=("decomposed",),
            max_opset=17,
            precisions=("fp32", "fp16", "int8-static"),
            # Orin modules share 8-64 GB between CPU and GPU: keep the builder's workspace small.
            options={
                "graph_optimization_level": "all",
                "trt_fp16": True,
                "trt_workspace_bytes": 2 << 30,
                "trt_cache": True,
            },
            tolerance_overrides={"fp32": _FP16_LEVEL},
        ),
        Target(
            name="openvino-cpu",
            engine="openvino",
            description="OpenVINO, CPU plugin",
            device="CPU",
            attention_forms=("onnx", "ort", "decomposed"),
            max_opset=23,
            precisions=PRECISIONS,
            options={"accuracy": True},
        ),
        Target(
            name="openvino-gpu",
            engine="openvino",
            description="OpenVINO, Intel GPU plugin",
            device="GPU",
            attention_forms=("onnx", "ort", "decomposed"),
            max_opset=23,
            precisions=PRECISIONS,
            options={"accuracy": True},
            tolerance_overrides={"fp32": _TF32},
        ),
        Target(
            name="onnx-reference",
            engine="onnx-reference",
            description="onnx.reference.ReferenceEvaluator: slow pure-Python second opinion",
            # It implements the standard operator set only, not com.microsoft.
            attention_forms=("onnx", "decomposed"),
            max_opset=23,
            precisions=PRECISIONS,
        ),
    )
}


def list_targets() -> list[Target]:
    """Every known target, in a stable order (the order of the table above)."""
    return list(_TARGETS.values())


def target_names() -> list[str]:
    return list(_TARGETS)


def get_target(name: str | Target) -> Target:
    """The profile called ``name``; an unknown name is a UserError listing the valid ones."""
    if isinstance(name, Target):
        return name
    try:
        return _TARGETS[name]
    except KeyError:
        raise unknown_choice("target", name, _TARGETS, flag="--target") from None


def import_engine(module: str):
    """Import an optional engine module, or raise a UserError with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = INSTALL_HINTS.get(module, f"pip install {module}")
        raise UserError(f"{module} is not importable ({e})", hint=hint) from None


def availability(target: str | Target) -> tuple[bool, str]:
    """Whether ``target`` can run here, and why (or why not), in words a user can act on."""
    target = get_target(target)
    if target.engine == "onnxruntime":
        return _ort_availability(target)
    if target.engine == "openvino":
        return _openvino_availability(target)
    return _reference_availability()


def _missing(module: str, error: Exception) -> tuple[bool, str]:
    return False, f"{module} is not importable ({error}); install it with {INSTALL_HINTS[module]}"


def _ort_availability(target: Target) -> tuple[bool, str]:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as e:
        return _missing("onnxruntime", e)
    installed = list(ort.get_available_providers())
    version = getattr(ort, "__version__", "?")
    for provider in target.providers:
        if provider not in installed:
            return False, (
                f"onnxruntime {version} has no {provider} (installed: {', '.join(installed)}); "
                f"{_GPU_PROVIDER_HINTS.get(provider, 'install an onnxruntime build with it')}"
            )
    if not target.accelerator_providers:
        return True, f"onnxruntime {version} with {', '.join(target.providers)}"
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


def _openvino_availability(target: Target) -> tuple[bool, str]:
    try:
        ov = importlib.import_module("openvino")
    except ImportError as e:
        return _missing("openvino", e)
    try:
        devices = list(ov.Core().available_devices)
    except Exception as e:  # the engine's own failure is the reason we report
        return False, f"OpenVINO could not list devices: {e}"
    version = getattr(ov, "__version__", "?").split("-")[0]
    matching = [d for d in devices if d == target.device or d.startswith(f"{target.device}.")]
    if not matching:
        hint = (
            "install the Intel GPU compute runtime (intel-opencl-icd, level-zero) and add the "
            "user to the render group"
            if target.device == "GPU"
            else "check the OpenVINO installation"
        )
        return False, (
            f"OpenVINO {version} sees no {target.device} device "
            f"(available: {', '.join(devices) or 'none'}); {hint}"
        )
    return True, f"OpenVINO {version} on {', '.join(matching)}"


def _reference_availability() -> tuple[bool, str]:
    try:
        onnx = importlib.import_module("onnx")
        importlib.import_module("onnx.reference")
    except ImportError as e:
        return _missing("onnx", e)
    return True, f"onnx {getattr(onnx, '__version__', '?')} ReferenceEvaluator"


# --- TensorRT --------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where engine and timing caches go: $QCRUN_CACHE_DIR, else $XDG_CACHE_HOME/qcrun."""
    if os.environ.get("QCRUN_CACHE_DIR"):
        return Path(os.environ["QCRUN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qcrun"


def axis_ranges_from_shapes(
    inputs: Mapping[str, Sequence[int | str | None]],
    observed: Iterable[Mapping[str, Sequence[int]]],
) -> dict[str, tuple[int, int, int]]:
    """min/opt/max per symbolic axis name, from concrete shapes seen for each input.

    ``observed`` holds name -> shape per run (e.g. the golden cases). opt is the largest value
    seen: the parity run covers every seen shape anyway, and kernels tuned for the largest
    shape are the ones whose time matters.
    """
    seen: dict[str, list[int]] = {}
    for shapes in observed:
        for name, spec in inputs.items():
            if name not in shapes:
                continue
            for dim, value in zip(spec, shapes[name], strict=False):
                if isinstance(dim, str):
                    seen.setdefault(dim, []).append(int(value))
    return {axis: (min(v), max(v), max(v)) for axis, v in seen.items()}


def _shape_text(name: str, dims: Sequence[int]) -> str:
    return f"{name}:{'x'.join(str(d) for d in dims)}"


def _axis_range(
    name: str, axis: int, dim: str | None, axis_ranges: Mapping[str, Sequence[int]]
) -> tuple[int, int, int]:
    if dim is None:
        raise UserError(
            f"input {name!r} axis {axis} is dynamic but has no name, so TensorRT "
            "cannot be given a profile for it",
            stage="tensorrt",
            hint="re-export with named dynamic axes",
        )
    if dim not in axis_ranges:
        raise UserError(
            f"input {name!r} axis {axis} ({dim!r}) has no min/opt/max range "
            f"(ranges given for: {', '.join(sorted(axis_ranges)) or 'none'})",
            stage="tensorrt",
            hint=f"pass profile_shapes={{{dim!r}: (min, opt, max)}}",
        )
    rng = tuple(int(v) for v in axis_ranges[dim])
    if len(rng) != 3 or not 1 <= rng[0] <= rng[1] <= rng[2]:
        raise UserError(
            f"profile range for axis {dim!r} is {rng}; expected (min, opt, max) with "
            "1 <= min <= opt <= max",
            stage="tensorrt",
        )
    return rng


def tensorrt_provider_options(
    inputs: Mapping[str, Sequence[int | str | None]],
    axis_ranges: Mapping[str, Sequence[int]],
    *,
    cache_dir: str | Path,
    fp16: bool = False,
    workspace_bytes: int = 2 << 30,
    cache: bool = True,
) -> dict[str, str]:
    """TensorRT EP provider options with one optimisation profile covering every dynamic input.

    ``inputs`` maps input name -> shape with symbolic axes as strings (as the model declares
    them); ``axis_ranges`` maps each symbolic axis name to (min, opt, max). Inputs with only
    static axes are left out: TensorRT needs profiles only for dynamic ones. Values are strings,
    the form every onnxruntime version accepts. Pure: it creates no directories.
    """
    mins, opts, maxs = [], [], []
    for name, shape in inputs.items():
        if all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            continue
        low, mid, high = [], [], []
        for axis, dim in enumerate(shape):
            if isinstance(dim, int):
                rng = (dim, dim, dim)
            else:
                rng = _axis_range(name, axis, dim, axis_ranges)
            for dims, value in zip((low, mid, high), rng, strict=True):
                dims.append(value)
        mins.append(_shape_text(name, low))
        opts.append(_shape_text(name, mid))
        maxs.append(_shape_text(name, high))

    cache_dir = Path(cache_dir)
    options = {
        "trt_fp16_enable": str(bool(fp16)),
        "trt_max_workspace_size": str(int(workspace_bytes)),
        "trt_engine_cache_enable": str(bool(cache)),
        "trt_timing_cache_enable": str(bool(cache)),
    }
    if cache:
        options["trt_engine_cache_path"] = str(cache_dir / "trt-engines")
        options["trt_timing_cache_path"] = str(cache_dir / "trt-timing")
    if mins:
        options["trt_profile_min_shapes"] = ",".join(mins)
        options["trt_profile_opt_shapes"] = ",".join(opts)
        options["trt_profile_max_shapes"] = ",".join(maxs)
    return options

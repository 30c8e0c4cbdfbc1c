"""Named targets: which engine runs a model, on what, with which options.

A target is data, not code: adding one is adding a ``Target`` to ``_TARGETS``. Adapters read the
engine, device, providers and options from it; the exporter reads the attention forms and the
opset it accepts; the tolerance policy reads its overrides. ``Target.refusals`` is the one
answer to "does this target accept this model". Whether a target can run on this machine is
its engine's question (``qcrun.engines.availability``): this module names engines and never
imports one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qcrun.choices import ATTENTION_FORMS, PRECISIONS, TOLERANCE_FIELDS
from qcrun.errors import UserError, unknown_choice

_CPU_EP = "CPUExecutionProvider"
_TRT_EP = "TensorrtExecutionProvider"
_CUDA_EP = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Refusal:
    """One reason a target cannot run a model: ``code`` (attention-form, opset, precision)
    for records, ``reason`` in words ("it does not run int8-dynamic models (...)")."""

    code: str
    reason: str


def _frozen(mapping: Mapping | None) -> Mapping:
    """A read-only copy, so that a shared target cannot be changed by one caller."""
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

    def refusals(self, *, attention: str | None = None, opset: int | None = None,
                 precision: str | None = None) -> list[Refusal]:
        """Why this target cannot run a model of this attention form, opset and precision
        (unknown ones are not judged); empty when it can."""
        found = []
        if attention and not self.accepts_attention(attention):
            found.append(Refusal("attention-form", f"it does not read the {attention!r} "
                                 f"attention form (it reads {', '.join(self.attention_forms)})"))
        if opset and int(opset) > self.max_opset:
            found.append(Refusal("opset", f"it reads opsets up to {self.max_opset}, the model "
                                 f"is opset {opset}"))
        if precision and precision not in self.precisions:
            why = _PRECISION_REASONS.get(precision)
            found.append(Refusal("precision", f"it does not run {precision} models (it runs "
                                 f"{', '.join(self.precisions)})" + (f": {why}" if why else "")))
        return found

    def incompatibility(self, *, attention: str | None = None, opset: int | None = None,
                        precision: str | None = None) -> str | None:
        """``refusals`` in one sentence, or None when this target accepts the model."""
        found = self.refusals(attention=attention, opset=opset, precision=precision)
        return "; ".join(r.reason for r in found) or None

    @property
    def needs_shape_ranges(self) -> bool:
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

#: Why a target refuses a precision that only some engines compute.
_PRECISION_REASONS = {
    "bf16": "bf16 is an inference precision of OpenVINO's CPU plugin (AVX-512 BF16 or AMX); "
            "other engines compute the graph's own types, so they would time and judge fp32",
    "int8-nncf": "an NNCF-quantized model is OpenVINO IR, which only OpenVINO reads",
}
#: What engines that compute the graph's own types run (no bf16 hint, no IR).
_GRAPH_PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
_FP16_LEVEL = {"max_abs": 1e-2, "max_rel": 1e-2, "min_cosine": 0.999}

def _tensorrt(name: str, description: str, *, fp16: bool, workspace_bytes: int,
              fp32_tolerance: Mapping[str, float]) -> Target:
    """A target on ONNX Runtime's TensorRT EP (CUDA, then CPU, for the nodes it does not take)."""
    return Target(
        name=name,
        engine="onnxruntime",
        description=description,
        providers=(_TRT_EP, _CUDA_EP, _CPU_EP),
        # TensorRT parses Attention only from 10.14 and never inside If.
        attention_forms=("decomposed",),
        max_opset=17,
        precisions=("fp32", "fp16", "int8-static"),
        options={
            "graph_optimization_level": "all",
            "trt_fp16": fp16,
            "trt_workspace_bytes": workspace_bytes,
            "trt_cache": True,
        },
        tolerance_overrides={"fp32": fp32_tolerance},
    )


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
            precisions=_GRAPH_PRECISIONS,
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
        _tensorrt(
            "ort-tensorrt",
            "ONNX Runtime, TensorRT execution provider with CUDA fallback",
            fp16=False,
            workspace_bytes=4 << 30,
            fp32_tolerance=_TF32,
        ),
        _tensorrt(
            "jetson-orin",
            "Jetson Orin (JetPack 6, TensorRT 10.3): TensorRT EP in fp16, CUDA fallback",
            fp16=True,
            # Orin modules share 8-64 GB between CPU and GPU: keep the builder's workspace small.
            workspace_bytes=2 << 30,
            fp32_tolerance=_FP16_LEVEL,
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
            precisions=tuple(p for p in PRECISIONS if p != "bf16"),
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
            precisions=_GRAPH_PRECISIONS,
        ),
    )
}


def list_targets() -> list[Target]:
    """Every known target, in a stable order (the order of the table above)."""
    return list(_TARGETS.values())


def target_names() -> list[str]:
    return list(_TARGETS)


def get_target(name: str | Target) -> Target:
    """The target called ``name``; an unknown name is a UserError listing the valid ones."""
    if isinstance(name, Target):
        return name
    try:
        return _TARGETS[name]
    except KeyError:
        raise unknown_choice("target", name, _TARGETS, flag="--target") from None


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

"""Latency profiles: what a model costs on each target, as a record that saves to JSON.

The public face of ``qcrun.profiling``: the records and their JSON (``records``), the Markdown
table (``markdown``), ONNX node -> PyTorch module attribution (``provenance``), the engine's
GEMM peak (``gemm``) and the run itself (``run``, see its docstring for what is measured).
Engine-specific profiling (onnxruntime's trace, OpenVINO's performance counters, the options
each reports) lives in the engine modules (``qcrun.engines``).
"""

from __future__ import annotations

from qcrun.engines.ort import parse_ort_trace
from qcrun.machine import current_rss_bytes, peak_rss_bytes, physical_cores, reset_peak_rss
from qcrun.profiling.gemm import DEFAULT_GEMM_SIZES, gemm_model, gemm_peak
from qcrun.profiling.provenance import Provenance, parse_scopes, provenance
from qcrun.profiling.records import (
    DEFAULT_MODULE_DEPTH,
    ENGINE_INTERNAL,
    FORMAT,
    NO_METADATA,
    TOP_LEVEL,
    Folded,
    GemmPeak,
    NodeTime,
    OpBreakdown,
    PointResult,
    ProfileReport,
    TargetProfile,
)
from qcrun.profiling.run import (
    DEFAULT_OP_RUNS,
    environment,
    model_files,
    profile_model,
    profile_options,
)

__all__ = [
    "DEFAULT_GEMM_SIZES",
    "DEFAULT_MODULE_DEPTH",
    "DEFAULT_OP_RUNS",
    "ENGINE_INTERNAL",
    "FORMAT",
    "NO_METADATA",
    "TOP_LEVEL",
    "Folded",
    "GemmPeak",
    "NodeTime",
    "OpBreakdown",
    "PointResult",
    "ProfileReport",
    "Provenance",
    "TargetProfile",
    "current_rss_bytes",
    "environment",
    "gemm_model",
    "gemm_peak",
    "model_files",
    "parse_ort_trace",
    "parse_scopes",
    "peak_rss_bytes",
    "physical_cores",
    "profile_model",
    "profile_options",
    "provenance",
    "reset_peak_rss",
]

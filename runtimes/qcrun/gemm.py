"""The engine's measured fp32 GEMM peak: square MatMul models run in this process, on the same
engine with the same options as the model; achieved FLOP/s over it is a model's efficiency."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qcrun.engines import adapter_for
from qcrun.errors import UserError, import_engine
from qcrun.latency import time_calls
from qcrun.profiling.records import GemmPeak
from qcrun.targets import Target

#: GEMM sizes of the peak calibration: powers of two alone understate it (cache-set
#: conflicts cost up to a third on some CPUs), so the best of a few sizes is the peak.
DEFAULT_GEMM_SIZES = (1024, 1536, 2048)


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

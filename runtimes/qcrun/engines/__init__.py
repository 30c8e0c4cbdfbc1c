"""Inference engines as plugins: one module per engine, a registry by name.

Each engine module (``ort``, ``ov``, ``reference``) owns everything that differs between
engines: whether it can run a target here, its adapter and how that adapter serves concurrent
calls, its profiler (trace or performance counters, the options it reports) and shape
observation. Generic code (api, profile, parity, bundle, cli) calls the ``Engine`` interface
through this registry and never asks which engine it holds. Targets (``qcrun.targets``) are
data that name an engine.

Adding an engine (TensorRT native, another NPU runtime) is one new module with an ``ENGINE``
(an ``Engine`` subclass instance), listed in ``_MODULES`` below, and targets that name it.
Engine packages themselves are imported lazily inside each module: a device has only some.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qcrun.engines import ort, ov, reference
from qcrun.engines.base import (
    Adapter,
    Engine,
    LoadFailed,
    ObservedShapes,
    RunFailed,
    TargetUnavailable,
    TensorInfo,
    array_problems,
    describe,
)
from qcrun.errors import UserError, import_engine, unknown_choice
from qcrun.targets import Target, get_target

__all__ = [
    "ENGINES",
    "Adapter",
    "Engine",
    "LoadFailed",
    "ObservedShapes",
    "RunFailed",
    "TargetUnavailable",
    "TensorInfo",
    "adapter_for",
    "array_problems",
    "availability",
    "describe",
    "engine_of",
    "get_engine",
    "import_engine",
    "model_file",
    "observe_shapes",
    "open_adapter",
]

_MODULES = (ort, ov, reference)

#: Every engine by name, in preference order for engine-neutral services (shape observation).
ENGINES: Mapping[str, Engine] = {m.ENGINE.name: m.ENGINE for m in _MODULES}


def get_engine(name: str) -> Engine:
    """The engine called ``name``; an unknown name is a UserError listing the known ones."""
    try:
        return ENGINES[name]
    except KeyError:
        raise unknown_choice("engine", name, ENGINES) from None


def engine_of(target: str | Target) -> Engine:
    """The engine a target names."""
    return get_engine(get_target(target).engine)


def availability(target: str | Target) -> tuple[bool, str]:
    """Whether ``target`` can run here, and why (or why not), in words a user can act on."""
    target = get_target(target)
    return engine_of(target).availability(target)


def adapter_for(model_path: str | Path, target: str | Target, **options: Any) -> Adapter:
    """An adapter for ``target``, not loaded (and without checking availability)."""
    target = get_target(target)
    return engine_of(target).open(model_path, target, **options)


def open_adapter(model_path: str | Path, target_name: str | Target, **options: Any) -> Adapter:
    """A loaded adapter for ``target_name``, or TargetUnavailable saying why it cannot run."""
    target = get_target(target_name)
    ok, reason = availability(target)
    if not ok:
        raise TargetUnavailable(f"target {target.name} is unavailable: {reason}", stage="load")
    return adapter_for(model_path, target, **options).load()


def model_file(files, target: str | Target) -> Path:
    """The file of ``files`` (``qcrun.ir.ModelFiles``: ONNX and/or OpenVINO IR) that
    ``target``'s engine reads, by the engine's ``formats``; a UserError where it reads none."""
    target = get_target(target)
    engine = engine_of(target)
    return files.pick(target, engine.name, engine.formats)


def observe_shapes(model_path: str | Path, feed: Mapping[str, Any]) -> ObservedShapes:
    """Real tensor shapes after one run, from the first engine here that can observe them.

    A UserError when none can (no engine installed that observes shapes); an engine failure
    running the model (``LoadFailed`` / ``RunFailed``) is raised as it is."""
    reasons = []
    for engine in ENGINES.values():
        try:
            observed = engine.observe_shapes(model_path, feed)
        except (LoadFailed, RunFailed):
            raise
        except UserError as e:  # this engine is not installed: try the next
            reasons.append(f"{engine.name}: {e}")
            continue
        if observed is not None:
            return observed
    raise UserError("no engine here observes tensor shapes"
                    + (f" ({'; '.join(reasons)})" if reasons else ""), stage="flops",
                    hint="install onnxruntime (pip install 'qcrun[ort]')")

"""What every engine module provides: the runner lifecycle and the engine interface.

A runner (``Adapter``, after Polygraphy's runners): ``__init__`` only stores the model path,
the target and the options; ``load()`` does the heavy work (session creation, compilation)
and reads the input and output metadata; ``run(feed)`` takes and returns arrays by name;
``close()`` releases the engine. Adapters are context managers and can be loaded again after
``close()``. Each adapter serves concurrent ``run`` calls its own way (``concurrency`` says
how), so callers never ask which engine they hold.

Every feed is checked against the model's inputs before it reaches the engine, so that a wrong
name, dtype or rank is a UserError naming the input instead of an engine stack trace. Engine
failures while loading or running are wrapped in ``LoadFailed`` / ``RunFailed`` (both
UserErrors) carrying the engine's own message, so that a parity run can record them and go on
with the next target.

``Engine`` is the interface generic code (api, profile, parity, bundle) calls: availability,
the adapter, profiling hooks and shape observation. One module per engine implements it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from qcrun.choices import PRECISIONS
from qcrun.errors import INSTALL_HINTS, UserError, unknown_choice
from qcrun.targets import Target, get_target

if TYPE_CHECKING:
    from qcrun.profiling.provenance import Provenance
    from qcrun.profiling.records import OpBreakdown

Dim = int | str | None

def missing(module: str, error: Exception) -> tuple[bool, str]:
    """The availability answer for an engine module that cannot be imported."""
    return False, f"{module} is not importable ({error}); install it with {INSTALL_HINTS[module]}"


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


def describe(infos: Sequence[TensorInfo]) -> str:
    return ", ".join(i.describe() for i in infos)


@dataclass
class ObservedShapes:
    """Real shapes from one run: tensor name -> shape, and the names of the nodes that ran."""

    tensors: dict[str, tuple[int, ...]]
    executed: set[str]
    ambiguous: set[str] = field(default_factory=set)  # node names used more than once

    def ran(self, graph) -> bool:
        """Whether any node of ``graph`` (not counting its subgraphs) ran."""
        return any(n.name in self.executed and n.name not in self.ambiguous for n in graph.node)


@dataclass(frozen=True, eq=False)
class Held:
    """Inputs held for many runs: the arrays (checked against the model's inputs on every
    run) and the same values in the engine's own form (fed to the engine)."""

    arrays: Mapping[str, np.ndarray]
    engine: Mapping[str, Any]


class Adapter:
    """Base runner: the lifecycle, option checking and feed validation shared by all engines."""

    engine: ClassVar[str] = ""
    known_options: ClassVar[frozenset[str]] = frozenset()
    #: How concurrent ``run`` calls are served, in words (``qcrun.Model.concurrency``).
    concurrency: ClassVar[str] = "calls serialised by a lock"
    #: A compiled-model cache: "none", "used", or "not used: <why>" (engines that keep one).
    cache_state: str = "none"
    #: Seconds the last ``load()`` took (read, compile or import); None before one.
    load_seconds: float | None = None

    def __init__(self, model_path: str | Path, target: str | Target, **options: Any):
        self.model_path = Path(model_path)
        self.target = get_target(target)
        # The declared precision of the model (its manifest's): engines with an inference
        # precision setting are pinned to it, never left to their default. A bare model file
        # is computed as fp32 is: the graph's own types, float operations in fp32.
        precision = options.pop("precision", None) or "fp32"
        if precision not in PRECISIONS:
            raise unknown_choice("precision", precision, PRECISIONS)
        self.precision: str = precision
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
        started = time.perf_counter()
        try:
            inputs, outputs = self._load()
        except UserError:
            raise
        except Exception as e:  # any engine exception: report the engine's own words
            raise LoadFailed(
                f"{self.target.name}: {self.engine} could not load {self.model_path}: "
                f"{one_paragraph(e)}",
                stage="load",
            ) from e
        self._inputs, self._outputs = inputs, outputs
        self.load_seconds = time.perf_counter() - started
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
        return self._run_checked(self.check_feed(feed))

    def hold(self, arrays: Mapping[str, np.ndarray]) -> Held:
        """``arrays`` (inputs by name) kept for many runs (a split model's context), in the
        form the engine reads without a copy per run where it has one; by default the arrays
        themselves."""
        return Held(dict(arrays), dict(arrays))

    def run_held(self, feed: Mapping[str, np.ndarray], held: Held) -> dict[str, np.ndarray]:
        """``run`` with some inputs given by :meth:`hold` (checked like any input)."""
        self._require_loaded()
        checked = self.check_feed({**feed, **held.arrays})
        checked.update(held.engine)
        return self._run_checked(checked)

    def _run_checked(self, checked: dict[str, Any]) -> dict[str, np.ndarray]:
        try:
            return self._run(checked)
        except UserError:
            raise
        except Exception as e:  # any engine exception: report the engine's own words
            raise RunFailed(
                f"{self.target.name}: {self.engine} failed to run {self.model_path.name}: "
                f"{one_paragraph(e)}",
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
            problems += array_problems(info, array)
            checked[info.name] = array
        for info in self._inputs:
            if info.name not in checked:
                problems.append(f"input {info.name!r} is missing")
        if problems:
            raise UserError(
                f"feed does not match {self.model_path.name} on {self.target.name}: "
                f"{'; '.join(problems)} (the model expects {describe(self._inputs)})",
                stage="run",
                hint="feed arrays with the model's input names, dtypes and ranks",
            )
        return checked

    def reported_options(self) -> tuple[dict[str, Any], int | None]:
        """The options the loaded engine reports (threads, hints, providers), and its thread
        count; nothing for an engine that reports none."""
        return {}, None

    def inference_precision(self) -> str | None:
        """The precision the loaded engine computes floating-point operations in, read back
        from the engine (a name of ``qcrun.choices.PRECISIONS``: fp32, bf16, fp16); None for
        an engine without such a setting, which computes each operation in the graph's own
        types. An engine that has one is pinned to the declared precision at load and refuses
        to load when it reports another, so no run computes an undeclared precision."""
        return None

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


def array_problems(info: TensorInfo, array: np.ndarray) -> list[str]:
    """What is wrong with ``array`` as the input ``info``: dtype, rank, static sizes."""
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


def one_paragraph(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())


class Engine:
    """One inference engine, as generic code sees it. Subclasses set ``name`` and ``adapter``
    and override the hooks they support; the defaults say "not supported" without failing."""

    name: ClassVar[str] = ""
    adapter: ClassVar[type[Adapter]] = Adapter
    #: The model formats the engine reads, preferred first ("onnx", "ir": OpenVINO IR).
    formats: ClassVar[tuple[str, ...]] = ("onnx",)

    def availability(self, target: Target) -> tuple[bool, str]:
        """Whether ``target`` can run here, and why (or why not), in words a user can act on."""
        raise NotImplementedError

    def open(self, model_path: str | Path, target: Target, **options: Any) -> Adapter:
        """An adapter for ``target``, not loaded."""
        return self.adapter(model_path, target, **options)

    # -- profiling hooks ----------------------------------------------------------------------

    def profile_options(self, target: Target, *, threads: int | None,
                        accuracy: bool) -> dict[str, Any]:
        """Adapter options of a latency profile: the engine's performance defaults."""
        return {}

    def op_breakdown(self, model_path: Path, target: Target, options: Mapping[str, Any],
                     feed: Mapping[str, np.ndarray], *, prov: Provenance | None, warmup: int,
                     runs: int, point: Mapping[str, int]) -> OpBreakdown | None:
        """Per-node times of ``runs`` profiled runs in a separate session, or None when the
        engine has no per-op profiler."""
        return None

    def profile_warnings(self, reported: Mapping[str, Any], precision: str | None) -> list[str]:
        """Caveats about timings taken with the ``reported`` options (e.g. reduced precision)."""
        return []

    def observe_shapes(self, model_path: str | Path,
                       feed: Mapping[str, Any]) -> ObservedShapes | None:
        """Every tensor's real shape after one run, or None when the engine cannot tell."""
        return None

    def write_compiled_cache(self, model_path: str | Path, target: Target,
                             options: Mapping[str, Any], out: Path) -> dict[str, Any] | None:
        """Compile the model as an adapter with ``options`` would and write the compiled model
        to ``out``; returns the settings it depends on (an adapter given them back as
        ``compiled_config`` with ``compiled_blob`` uses it only when they are its own), or
        None when the engine keeps no compiled-model cache."""
        return None

    def providers(self, target: Target, *, input_shapes: Mapping[str, Sequence[Dim]],
                  profile_shapes: Mapping[str, Sequence[int]], cache_dir: Path) -> list:
        """The execution-provider list a session on ``target`` uses, from specs alone."""
        raise UserError(f"target {target.name} runs on {target.engine}, which has no execution "
                        "providers", stage="bundle")

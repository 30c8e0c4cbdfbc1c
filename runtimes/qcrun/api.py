"""The embedding API: ``qcrun.load`` a bundle (or a model) and call it from an app.

    import qcrun
    model = qcrun.load("qformer.bundle")              # best target this device has
    out = model(image_features=x, text_ids=t, text_mask=m)   # {"query_outputs": array}
    model.inputs, model.outputs, model.target         # the spec and where it runs

Choosing a target (``target="auto"``): the first of ``AUTO_ORDER`` -- TensorRT, CUDA,
OpenVINO GPU, OpenVINO CPU, ONNX Runtime CPU -- that is available here *and* accepts the
bundle's attention form, opset and precision; among the TensorRT profiles the bundle's own
target comes first. ``target="ort-cpu"`` asks for one target (a clear error says why it cannot
run), and a list of names is an order of your own. onnx-reference is never chosen
automatically (it is a slow second opinion), only by name.

Inputs are checked before they reach the engine: every input present, no unknown names, the
dtype and rank of the spec, static axes of the right size, a symbolic axis ("batch") of the
same size in every input that has it, and on TensorRT the profile ranges the bundle was built
with. A mismatch is a UserError listing every problem; nothing is cast silently.

Threads: one ``Model`` may be called from several threads at once, and returns the same
outputs as serial calls. Each engine's adapter serves concurrent calls its own way
(``Model.concurrency`` says how): onnxruntime runs them on its one thread-safe session,
OpenVINO keeps a pool of infer requests, onnx.reference serialises them with a lock.

``close()`` (or ``with qcrun.load(...) as model:``) releases the engine and removes an archive's
extracted copy; calls after it are an error.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qcrun.bundle import Bundle, is_bundle, open_bundle
from qcrun.context import Context, SplitRunner
from qcrun.engines import (
    Adapter,
    TargetUnavailable,
    TensorInfo,
    adapter_for,
    array_problems,
    availability,
    model_file,
)
from qcrun.errors import UserError
from qcrun.files import ModelDir, ValueRange, read_model_dir
from qcrun.golden import read_golden_manifest
from qcrun.ir import ModelFiles, contradicting_cases, fixed_shapes, resolve_fix_axes
from qcrun.targets import Target, get_target

#: Target preference of ``target="auto"``, best first; targets in one tuple share a rank, and
#: within a rank the bundle's own target goes first.
AUTO_ORDER: tuple[tuple[str, ...], ...] = (
    ("ort-tensorrt", "jetson-orin"),
    ("ort-cuda",),
    ("openvino-gpu",),
    ("openvino-cpu",),
    ("ort-cpu",),
)


@dataclass(frozen=True)
class Choice:
    """One target considered by ``load``: whether it could run the model here, and why.

    ``usable`` targets are tried in order; the first that loads is ``chosen``.
    """

    target: str
    usable: bool
    reason: str
    chosen: bool = False

    def describe(self) -> str:
        state = "chosen" if self.chosen else "not needed" if self.usable else "skipped"
        return f"{self.target}: {state} ({self.reason})"


@dataclass(frozen=True)
class _Source:
    """What ``load`` was given, reduced to a model file and what is known about it."""

    model_path: Path
    label: str
    inputs: list[TensorInfo] | None
    outputs: list[TensorInfo] | None
    attention: str | None
    opset: int | None
    precision: str | None
    bundle: Bundle | None = None
    owns_bundle: bool = False  # opened by load (closed with the model), not passed in
    # input name -> the values it may hold (recorded at export; PyTorch raises outside them)
    ranges: Mapping[str, ValueRange] = field(default_factory=dict)
    # the checked model directory, for its context and query graphs (``--split context``)
    model_dir: ModelDir | None = None
    files: ModelFiles | None = None  # the model's files by format (ONNX, OpenVINO IR)
    roles: Mapping[str, str] = field(default_factory=dict)  # axis role -> label
    golden: Path | None = None  # its golden set, which fixed axes must leave something of
    fixed: Mapping[str, int] = field(default_factory=dict)  # axes a bundle was built fixed at


def auto_order(bundle_target: str | None = None) -> list[str]:
    """The auto order as a flat list, the bundle's target first within its rank."""
    order = []
    for rank in AUTO_ORDER:
        names = list(rank)
        if bundle_target in names:
            names.remove(bundle_target)
            names.insert(0, bundle_target)
        order += names
    return order


def plan_targets(
    candidates: Iterable[str],
    *,
    incompatibility=lambda target: None,
    available=availability,
) -> list[Choice]:
    """Judge each candidate in order: incompatible with the model, unavailable here, or usable.

    ``incompatibility(target) -> reason | None`` says whether the model can run there;
    ``available(target) -> (ok, reason)`` whether the device can (``qcrun.engines.availability``).
    """
    choices = []
    for name in dict.fromkeys(candidates):
        target = get_target(name)
        why = incompatibility(target)
        if why:
            choices.append(Choice(target.name, False, f"cannot run this model: {why}"))
            continue
        ok, reason = available(target)
        choices.append(Choice(target.name, ok, reason))
    return choices


class Model:
    """A loaded model on one target: call it with inputs by name, get outputs by name.

    Built by ``qcrun.load``. ``inputs`` / ``outputs`` are the spec (names, dtypes, shapes with
    symbolic axis names); ``target`` is where it runs and ``choices`` how that was decided.
    """

    def __init__(self, adapter: Adapter, source: _Source, choices: Sequence[Choice],
                 fixed: Mapping[str, int] | None = None):
        self._adapter = adapter
        self._source = source
        self.choices = list(choices)
        self.target: str = adapter.target.name
        #: The declared precision, and what the engine computes float operations in (read back
        #: from it; None for an engine that computes the graph's own types).
        self.precision: str = adapter.precision
        self.inference_precision: str | None = adapter.inference_precision()
        engine_inputs = adapter.inputs
        self.inputs: list[TensorInfo] = source.inputs or engine_inputs
        self.outputs: list[TensorInfo] = source.outputs or adapter.outputs
        #: Symbolic axes fixed at load (label -> size): the spec shows their sizes, and the
        #: engine was built for them (``load(fix_axes=...)``, or a bundle built fixed).
        self.fixed_axes: dict[str, int] = dict(fixed or {})
        if self.fixed_axes:
            self.inputs = [replace(i, shape=tuple(fixed_shapes({i.name: i.shape},
                                                               self.fixed_axes)[i.name]))
                           if i.shape is not None else i for i in self.inputs]
        #: Seconds the engine took to make the model runnable (read and compile, or import a
        #: compiled-model cache), and what became of the cache ("used", "none", "not used: why").
        self.load_seconds: float | None = adapter.load_seconds
        self.cache: str = adapter.cache_state
        self._check_spec(engine_inputs)
        self._closed = False
        # Calls in flight, so that close() waits for them before releasing the engine: a
        # session freed under a running call would crash in native code.
        self._calls = threading.Condition()
        self._in_flight = 0
        self._pair_lock = threading.Lock()
        self._split: SplitRunner | None = None

    def _check_spec(self, engine_inputs: list[TensorInfo]) -> None:
        """The declared spec must be the model's: every declared input known to the engine
        (by name or alias, see OpenVINO's merged names) and nothing more."""
        known = {n for i in engine_inputs for n in (i.name, *i.aliases)}
        declared = [i.name for i in self.inputs]
        if len(declared) != len(engine_inputs) or not set(declared) <= known:
            raise UserError(
                f"{self._source.label}: its manifest declares inputs {sorted(declared)} but the "
                f"model has {sorted(i.name for i in engine_inputs)}",
                stage="load",
                hint="the manifest and the model do not belong together: re-export the model, "
                "or rebuild the bundle with `qcexport bundle`",
            )
        # Outputs by the spec's names, whichever of its names the engine reports first.
        spec_outputs = {o.name for o in self.outputs}
        self._rename = {}
        for info in self._adapter.outputs:
            if info.name not in spec_outputs:
                alias = next((a for a in info.aliases if a in spec_outputs), None)
                if alias:
                    self._rename[info.name] = alias

    # -- info ---------------------------------------------------------------------------------

    @property
    def bundle(self) -> Bundle | None:
        return self._source.bundle

    @property
    def model_path(self) -> Path:
        return self._source.model_path

    @property
    def concurrency(self) -> str:
        """How concurrent calls are served (see the module docstring)."""
        return self._adapter.concurrency

    def __repr__(self) -> str:
        spec = ", ".join(i.describe() for i in self.inputs)
        return f"Model({self._source.label!r} on {self.target}: {spec})"

    # -- running ------------------------------------------------------------------------------

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        return self.run(inputs)

    def encode(self, **inputs: Any) -> Context:
        """Run a split model's context graph on its context inputs (the image side) once;
        the ``Context`` it returns answers many ``query`` calls (``qcrun.context``)."""
        return self._guarded(lambda: self._pair().encode(inputs))

    def query(self, context: Context, **inputs: Any) -> dict[str, np.ndarray]:
        """Run a split model's query graph on the other inputs against ``context`` (from this
        model's ``encode``; another model's is refused)."""
        return self._guarded(lambda: self._pair().query(context, inputs))

    def _pair(self) -> SplitRunner:
        """The context and query graphs on this model's target, loaded on first use."""
        with self._pair_lock:
            if self._split is None:
                model_dir = self._source.model_dir
                if model_dir is None and self._source.bundle is not None:
                    # a bundle carries the model directory's manifest, split and graphs
                    # included (checked by the bundle's hashes, and here again)
                    model_dir = read_model_dir(self._source.bundle.model_path.parent,
                                               stage="encode")
                if model_dir is None or model_dir.manifest.split is None:
                    raise UserError(f"{self._source.label} has no context and query graphs",
                                    stage="encode",
                                    hint="convert it with `qcexport convert NAME --split "
                                    "context` and load its model directory")
                self._split = SplitRunner(model_dir, self.target).load()
            return self._split

    def _guarded(self, call):
        with self._calls:
            if self._closed:
                raise UserError(f"{self._source.label} on {self.target} was closed",
                                stage="run", hint="load it again with qcrun.load")
            self._in_flight += 1
        try:
            return call()
        finally:
            with self._calls:
                self._in_flight -= 1
                self._calls.notify_all()

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one set of inputs (name -> array); returns every output by name. Safe against
        a concurrent ``close()``: a call that started finishes first, a later one is a
        UserError."""
        return self._guarded(lambda: self._run(inputs))

    def _run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(inputs, Mapping):
            raise UserError(f"inputs must be a mapping of input name to array, not "
                            f"{type(inputs).__name__}", stage="run",
                            hint=f"call model.run({{{', '.join(repr(i.name) for i in self.inputs)}"
                            ": ...}}) or model(name=array, ...)")
        self._check(inputs)
        outputs = self._adapter.run(inputs)
        if self._rename:
            outputs = {self._rename.get(k, k): v for k, v in outputs.items()}
        return outputs

    def _check(self, inputs: Mapping[str, Any]) -> None:
        """Every problem of ``inputs`` against the spec, in one UserError: names, dtypes, ranks,
        static sizes (the adapter's rules, with the spec's axis names), a symbolic axis of one
        size across inputs, and on TensorRT the bundle's profile ranges. The adapter checks the
        feed again against the engine's own view before running it."""
        problems = [f"input {k!r} is not an input of the model" for k in inputs
                    if k not in {i.name for i in self.inputs}]
        out_of_range: list[str] = []
        sizes: dict[str, tuple[int, str]] = {}
        for spec in self.inputs:
            if spec.name not in inputs:
                problems.append(f"input {spec.name!r} is missing")
                continue
            array = np.asarray(inputs[spec.name])
            found = array_problems(spec, array)
            if not found and spec.name in self._source.ranges:
                out_of_range += _range_problems(spec.name, array, self._source.ranges[spec.name])
            problems += found
            if found or spec.shape is None:
                continue
            for dim, size in zip(spec.shape, array.shape, strict=True):
                if not isinstance(dim, str):
                    continue
                if dim in sizes and sizes[dim][0] != size:
                    first_size, first_input = sizes[dim]
                    problems.append(f"axis {dim!r} is {first_size} in {first_input!r} but {size} "
                                    f"in {spec.name!r}")
                sizes.setdefault(dim, (int(size), spec.name))
        bundle = self._source.bundle
        on_tensorrt = bundle is not None and self._adapter.target.needs_shape_ranges
        outside = bundle.profile_problems(inputs) if on_tensorrt and not problems else []
        problems += outside
        if out_of_range and not problems:
            raise UserError(
                f"inputs out of range for {self._source.label}: {'; '.join(out_of_range)}",
                stage="run",
                hint="token ids must lie in [0, vocabulary size), counts and masks in the range "
                "the model was exported with (the manifest's inputs[].range)")
        if problems:
            expected = ", ".join(i.describe() for i in self.inputs)
            raise UserError(
                f"inputs do not match {self._source.label} on {self.target}: "
                f"{'; '.join(problems)} (the model expects {expected})",
                stage="run",
                hint="keep inputs within the profile, or rebuild the bundle with --profile "
                "AXIS=MIN:OPT:MAX" if outside else
                "pass every input by name, as numpy arrays of the spec's dtype and rank, with "
                "one size per named axis (model.inputs lists them)",
            )

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the engine once the calls in flight have finished; later calls fail."""
        with self._calls:
            if self._closed:
                return
            self._closed = True
            self._calls.wait_for(lambda: self._in_flight == 0)
        self._adapter.close()
        if self._split is not None:
            self._split.close()
        if self._source.owns_bundle:
            self._source.bundle.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    path_or_bundle: str | Path | Bundle,
    target: str | Sequence[str] = "auto",
    *,
    verify: bool = True,
    cache_dir: str | Path | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    trusted_keys: Sequence[Any] | None = None,
    expect_sha256: str | None = None,
    fix_axes: Mapping[str, int] | None = None,
) -> Model:
    """Load a bundle (directory or .tar.gz), a model directory or an .onnx file on a target.

    A ``Bundle`` from ``qcrun.bundle.open_bundle`` may be passed too; it stays open (and its
    extracted files in place) after the model is closed: whoever opened it closes it.

    ``target``: "auto" (``AUTO_ORDER``, see the module docstring), a target name, or a list of
    names to try in that order. A named target that cannot run here, or cannot run this
    model, is a UserError saying why. ``verify`` re-hashes a bundle's files first (a damaged
    bundle is ``BundleDamaged``, naming the files). ``cache_dir`` is where TensorRT engine and
    timing caches go (default $QCRUN_CACHE_DIR or ~/.cache/qcrun). ``options`` maps a target
    name to extra adapter options (e.g. ``{"ort-cpu": {"intra_op_threads": 2}}``).

    ``trusted_keys`` (Ed25519 public keys: PEM file paths, PEM bytes or key objects; needs
    ``qcrun[sign]``): the bundle must be signed by one of them, else ``BundleUntrusted``.
    ``expect_sha256``: the bundle's manifest sha256 must be this one (pinned without keys).
    Both are checked before anything else is read, and apply to bundles only.

    ``fix_axes`` (``{"batch": 1, "tokens": 257}``, axes by role or label): the engine is built
    for those sizes (onnxruntime free-dimension overrides, OpenVINO ``reshape``), and inputs
    of other sizes are refused. An axis the model does not have, a size the bundle was built
    fixed at otherwise, or one that every golden case contradicts is a UserError.
    """
    source = _open_source(path_or_bundle, verify=verify, trusted_keys=trusted_keys,
                          expect_sha256=expect_sha256)
    try:
        fixed = _fixed_axes(source, fix_axes or {})
        return _load_source(source, target, cache_dir=cache_dir, options=options or {},
                            fixed=fixed)
    except BaseException:
        if source.owns_bundle:
            source.bundle.close()
        raise


def _open_source(path_or_bundle, *, verify: bool, trusted_keys=None,
                 expect_sha256=None) -> _Source:
    if isinstance(path_or_bundle, Bundle) or is_bundle(path_or_bundle):
        bundle = (path_or_bundle if isinstance(path_or_bundle, Bundle)
                  else open_bundle(path_or_bundle))
        try:
            if trusted_keys is not None or expect_sha256 is not None:
                bundle.authenticate(trusted_keys=trusted_keys, expect_sha256=expect_sha256)
            if verify:
                bundle.require_intact()
        except BaseException:
            if not isinstance(path_or_bundle, Bundle):
                bundle.close()
            raise
        return _Source(bundle.model_path, str(bundle.source), bundle.inputs, bundle.outputs,
                       bundle.attention, bundle.opset, bundle.precision, bundle,
                       owns_bundle=not isinstance(path_or_bundle, Bundle),
                       ranges=_ranges(bundle.spec.inputs), files=bundle.model_files(),
                       roles=bundle.spec.roles or {}, golden=bundle.golden_path,
                       fixed=bundle.fixed_axes)
    if trusted_keys is not None or expect_sha256 is not None:
        raise UserError(f"{path_or_bundle} is not a bundle: trusted_keys and expect_sha256 "
                        "check bundles", stage="trust",
                        hint="load a bundle written by `qcexport bundle --sign KEY`, or drop "
                        "trusted_keys / expect_sha256")
    path = Path(path_or_bundle)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise UserError(f"{path} is neither a bundle nor a model directory (no bundle.json "
                            "or manifest.json)", stage="load",
                            hint="pass a bundle written by `qcexport bundle`, a model directory "
                            "written by `qcexport convert`, or an .onnx file")
        # types, paths, hashes and the graph's precision, checked before the engine sees it
        model = read_model_dir(path, stage="load")
        manifest = model.manifest

        def infos(specs):
            return [TensorInfo(s.name, s.dtype, tuple(s.shape)) for s in specs] or None

        return _Source(model.model, str(path), infos(manifest.inputs), infos(manifest.outputs),
                       model.attention, model.opset, model.precision,
                       ranges=_ranges(manifest.inputs), files=model.model_files(),
                       roles=manifest.roles or {}, golden=model.golden_dir(),
                       model_dir=model)
    if path.suffix == ".onnx" or path.is_file():
        # A bare model: its form and precision are unknown, so every target is a candidate.
        return _Source(path, str(path), None, None, None, None, None)
    raise UserError(f"{path} does not exist", stage="load",
                    hint="pass a bundle, a model directory or an .onnx file")


def _ranges(specs) -> dict[str, ValueRange]:
    return {s.name: s.range for s in specs if getattr(s, "range", None) is not None}


def _range_problems(name: str, array: np.ndarray, allowed: ValueRange) -> list[str]:
    """Values of an integer or boolean input outside ``allowed``: the engine would not refuse
    them (a Gather wraps a negative id around), so the model would compute garbage where
    PyTorch raises."""
    if array.size == 0 or array.dtype.kind not in "iub":
        return []
    low, high = array.min(), array.max()
    if low >= allowed.min and high <= allowed.max:
        return []
    bad = low if low < allowed.min else high
    return [f"input {name!r} holds {bad.item()!r}, outside its valid range "
            f"[{allowed.min}, {allowed.max}]"]


def _incompatibility(source: _Source):
    def why(target: Target) -> str | None:
        if source.files is not None:
            try:
                model_file(source.files, target)
            except UserError as e:  # an IR-only model where no engine reads IR
                return str(e)
        return target.incompatibility(attention=source.attention, opset=source.opset,
                                      precision=source.precision)

    return why


def _fixed_axes(source: _Source, fix_axes: Mapping[str, int]) -> dict[str, int]:
    """The axes to fix (label -> size): the bundle's own, and ``fix_axes`` resolved through
    the manifest's roles and checked against the bundle and the golden cases."""
    fixed = dict(source.fixed)
    if not fix_axes:
        return fixed
    if source.inputs is None:
        raise UserError(f"fix_axes needs the model's axis names, and {source.label} is a bare "
                        "model file", stage="load",
                        hint="load its model directory or a bundle instead")
    shapes = {i.name: i.shape for i in source.inputs}
    asked = resolve_fix_axes(fix_axes, shapes, source.roles)
    for axis, size in asked.items():
        if fixed.get(axis, size) != size:
            raise UserError(f"fix_axes: {source.label} was built with {axis}={fixed[axis]}, "
                            f"not {size}", stage="load",
                            hint=f"pass {axis}={fixed[axis]}, or rebuild the bundle with "
                            f"`qcexport bundle --fix-axis {axis}={size}`")
    if source.golden is not None:
        cases = [(c.name, {k: v.shape for k, v in c.inputs.items()})
                 for c in read_golden_manifest(source.golden).cases]
        refused = contradicting_cases(cases, shapes, asked)
        if cases and len(refused) == len(cases):
            raise UserError(
                f"fix_axes {asked}: every golden case of {source.label} contradicts it "
                f"({'; '.join(f'{n}: {why}' for n, why in refused.items())}), so nothing "
                "could prove the model right at these sizes", stage="load",
                hint="fix the axes at a size a golden case has, or write golden cases of that "
                "size (`qcexport golden`)")
    return {**fixed, **asked}


def _load_source(source: _Source, target, *, cache_dir, options, fixed=None) -> Model:
    bundle_target = source.bundle.target if source.bundle else None
    if isinstance(target, str) and target != "auto":
        named = get_target(target)
        why = _incompatibility(source)(named)
        if why:
            if source.bundle is not None:
                source.bundle.require_compatible(named)  # raises, with the rebuild hint
            raise UserError(f"{source.label} cannot run on {named.name}: {why}", stage="load",
                            hint="pass another target, or export the model for this one")
        candidates, explicit = [named.name], True
    elif isinstance(target, str):
        candidates, explicit = auto_order(bundle_target), False
    else:
        candidates, explicit = [get_target(t).name for t in target], True
        if not candidates:
            raise UserError("no targets given", stage="load",
                            hint="pass target='auto', a target name or a list of names")
    plan = plan_targets(candidates, incompatibility=_incompatibility(source))
    outcome: list[Choice] = []
    for index, choice in enumerate(plan):
        if not choice.usable:
            outcome.append(choice)
            continue
        adapter = _adapter(source, choice.target, cache_dir, options, fixed or {})
        try:
            adapter.load()
        except TargetUnavailable as e:  # listed, but the session fell back: try the next one
            outcome.append(Choice(choice.target, False, str(e)))
            continue
        outcome += [replace(choice, chosen=True), *plan[index + 1:]]
        return Model(adapter, source, outcome, fixed)
    if explicit and len(candidates) == 1:
        raise TargetUnavailable(f"target {candidates[0]} cannot run {source.label} here: "
                                f"{outcome[0].reason}", stage="load",
                                hint="see `qcrun targets` for what this device can run, or "
                                "pass target='auto'")
    reasons = "; ".join(c.describe() for c in outcome)
    raise TargetUnavailable(f"no target can run {source.label} here ({reasons})", stage="load",
                            hint="install an engine that reads the model (see `qcrun targets`), "
                            "or rebuild the bundle for a target this device has")


def _adapter(source: _Source, target: str, cache_dir, options, fixed) -> Adapter:
    t = get_target(target)
    extra = dict(source.bundle.adapter_options(t, cache_dir)) if source.bundle else {}
    if t.needs_shape_ranges and "cache_dir" not in extra and cache_dir:
        extra["cache_dir"] = str(Path(cache_dir) / t.name)
    extra.update(options.get(t.name, {}))
    # pinned to the declared precision (a bare model: fp32), never the engine's default
    extra.setdefault("precision", source.precision)
    if fixed:
        extra.update(fix_axes=dict(fixed),
                     input_shapes={i.name: list(i.shape or ()) for i in source.inputs})
    path = model_file(source.files, t) if source.files is not None else source.model_path
    return adapter_for(path, t, **extra)

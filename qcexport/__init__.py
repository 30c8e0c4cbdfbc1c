"""qcexport: PyTorch attention modules -> verified ONNX models, proven on edge runtimes.

One function per stage, each taking data and returning a typed result::

    import qcexport, qcrun
    result = qcexport.convert(module, {"x": x}, {"x": {0: "batch"}}, output_dir="out/m")
    golden = qcexport.write_golden(module, {"x": x}, "out/golden", dynamic_axes={"x": {0: "batch"}})
    run = qcexport.parity("out/m", golden="out/golden")            # run.passed
    bundle = qcexport.bundle("out/m", "ort-cpu", "m.bundle", golden="out/golden")
    outputs = qcrun.load("m.bundle")(x=x.numpy())                  # {output name: array}

``import qcexport`` is quick: torch, onnx and the engines are imported by the stage that needs
them, on first call. The stages are the ones the ``qcexport`` command runs.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qcrun.profile import ProfileReport
    from torch import nn

    from qcexport.bundle import BundleResult
    from qcexport.export.pipeline import ConvertResult, StageCallback
    from qcexport.golden import GoldenResult
    from qcexport.optimize import QuantizeResult
    from qcexport.parity import ParityRun

__all__ = ["BundleResult", "ConvertResult", "GoldenResult", "ParityRun", "ProfileReport",
           "QuantizeResult", "bundle", "convert", "parity", "profile", "quantize",
           "write_golden"]

#: Result types, importable from the package top without importing torch up front.
_LAZY_TYPES = {
    "BundleResult": "qcexport.bundle",
    "ConvertResult": "qcexport.export.pipeline",
    "GoldenResult": "qcexport.golden",
    "ParityRun": "qcexport.parity",
    "ProfileReport": "qcrun.profile",
    "QuantizeResult": "qcexport.optimize",
}


class _Package(types.ModuleType):
    """The package keeps its stage functions although submodules share two of their names
    (``qcexport.parity``, ``qcexport.bundle``): importing a submodule binds it on the package
    and would hide the function. The submodules stay importable by their full names
    (``from qcexport.parity import ...``), which go through ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY_TYPES:
        import importlib

        return getattr(importlib.import_module(_LAZY_TYPES[name]), name)
    raise AttributeError(f"module 'qcexport' has no attribute {name!r}")


def convert(
    module: nn.Module | str,
    example_inputs: Mapping[str, Any] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    *,
    output_dir: str | Path | None = None,
    output_names: Sequence[str] | None = None,
    constants: Mapping[str, Any] | None = None,
    target: str = "ort-cpu",
    attention: str = "auto",
    opset: int | None = None,
    preset: str = "tiny",
    metadata: Mapping[str, Any] | None = None,
    on_stage: StageCallback | None = None,
    precision: str = "fp32",
    **quantize_options: Any,
) -> ConvertResult:
    """Export a module to ``output_dir/model.onnx`` (with ``manifest.json``), verified.

    ``module`` is an ``nn.Module`` called as ``module(**example_inputs)``, or the name of a
    built-in mechanism (then ``preset`` picks its size and the spec supplies everything else).
    ``dynamic_axes`` is ``{input name: {axis: symbolic name}}``; inputs sharing a name share
    the size. An axis whose example size is 0 or 1 is exported at size 2 (torch.export would
    fix it) and still verified at the example size.

    Non-tensor entries of ``example_inputs`` (and ``constants``) -- bools, ints, strings,
    ``None`` such as ``return_dict=True`` -- are fixed in the graph and recorded in the
    manifest. The module may return a tensor or any pytree of tensors (``ModelOutput``,
    dict, dataclass, namedtuple, nested tuples/lists); each tensor becomes one output named by
    its path (``last_hidden_state``, ``hidden_states.3``, ``output_0`` for a tuple position,
    ``output`` for a lone tensor), ``None`` leaves dropped. ``output_names`` keeps a subset.

    The model is verified against PyTorch eager in onnxruntime at the example shape and at
    another size of every dynamic axis; only a verified model is written. With another
    ``precision`` (fp16, int8-dynamic, int8-static) the verified fp32 model goes to
    ``output_dir/fp32`` and the reduced one, measured against it, to ``output_dir``
    (``result.reduced``; ``quantize_options`` as for :func:`quantize`). Raises
    ``qcrun.errors.UserError`` naming the failing stage.
    """
    from qcrun.errors import UserError

    from qcexport.export.mechanism import convert_mechanism
    from qcexport.export.pipeline import convert as convert_module
    from qcexport.optimize import at_precision

    options = dict(target=target, attention=attention, opset=opset, on_stage=on_stage)
    if isinstance(module, str):
        if example_inputs is not None or dynamic_axes is not None or output_names or constants:
            raise UserError(f"{module!r} is a built-in mechanism: its inputs, axes and outputs "
                            "come from its spec", stage="convert",
                            hint="pass only the name (and preset=...), or pass an nn.Module")
        name = module

        def fp32(out: Path) -> ConvertResult:
            return convert_mechanism(name, preset, output_dir=out, precision=precision,
                                     **options)

        default = Path("out") / f"{name}-{preset}"
    else:
        if example_inputs is None:
            raise UserError("example_inputs are needed to export a module", stage="convert",
                            hint="pass {input name: example tensor} as called by forward")

        def fp32(out: Path) -> ConvertResult:
            return convert_module(module, example_inputs, dynamic_axes, output_dir=out,
                                  output_names=output_names, constants=constants,
                                  metadata={"mechanism": "custom", **(metadata or {})},
                                  **options)

        default = Path("out/model")
    return at_precision(fp32, precision, output_dir or default, target=target,
                        **quantize_options)


def quantize(
    model_dir: str | Path,
    precision: str,
    output_dir: str | Path | None = None,
    **options: Any,
) -> QuantizeResult:
    """A reduced-precision copy (``fp16``, ``int8-dynamic``, ``int8-static``) of an fp32 model
    directory, measured against it; fails if it loses more than the tolerance policy allows.

    ``output_dir`` defaults to ``<model_dir>-<precision>``. ``options`` are those of
    ``qcexport.optimize.quantize_model_dir``: ``calibration_file`` (an .npz, needed for
    int8-static of your own module), ``calibration_cases``, ``method``, ``exclude_nodes``,
    ``exclude_modules``, ``target``.
    """
    from qcexport.optimize import quantize_model_dir

    model_dir = Path(model_dir)
    out = Path(output_dir) if output_dir else model_dir.parent / f"{model_dir.name}-{precision}"
    return quantize_model_dir(model_dir, precision, out, **options)


def write_golden(
    module: nn.Module | str,
    example_inputs: Mapping[str, Any] | str | None = None,
    out_dir: str | Path | None = None,
    **options: Any,
) -> GoldenResult:
    """Write a golden set (PyTorch eager outputs with their weights and hashes).

    - ``write_golden(module, example_inputs, out_dir, dynamic_axes=..., cases=...,
      constants=..., seed=0, update=False)``: your own module; ``cases`` are extra input sets,
      otherwise seeded variations along every dynamic axis are made. Outputs are named as
      :func:`convert` names them, so the set fits the converted model.
    - ``write_golden("qformer", "tiny", root=None, update=False)``: a built-in mechanism
      (``example_inputs`` is then the preset).

    An existing set whose outputs would change needs ``update=True``.
    """
    if isinstance(module, str):
        from qcexport.golden import write_golden as write_mechanism_golden

        preset = example_inputs if isinstance(example_inputs, str) else options.pop("preset",
                                                                                    "tiny")
        if out_dir is not None:
            options.setdefault("root", out_dir)
        return write_mechanism_golden(module, preset, **options)
    from qcexport import golden

    if example_inputs is None or out_dir is None:
        from qcrun.errors import UserError

        raise UserError("a module's golden set needs example_inputs and out_dir",
                        stage="golden", hint="write_golden(module, {name: tensor}, 'out/golden')")
    return golden.write_module_golden(module, example_inputs, out_dir, **options)


def parity(
    model: str | Path,
    targets: Sequence[str] = ("ort-cpu", "openvino-cpu", "onnx-reference"),
    *,
    golden: str | Path | None = None,
    preset: str = "tiny",
    optional: Sequence[str] = (),
    require: Sequence[str] = (),
    policy_file: str | Path | None = None,
    work_dir: str | Path = "out/parity",
) -> ParityRun:
    """Replay golden cases on every target; ``result.passed`` is the verdict. Every target
    named must run here, unless it is in ``optional`` (then it is skipped with its reason,
    never passed). ``policy_file`` replaces qcrun's tolerance policy.

    ``model`` is a model directory written by :func:`convert` (your own module needs
    ``golden``, from :func:`write_golden`) or a built-in mechanism name (exported here with
    the golden set's weights). ``result.report`` holds one record per target, case and output.
    """
    from qcrun.targets import get_target

    from qcexport.parity import parity_for_mechanism, parity_for_model_dir

    names = [targets] if isinstance(targets, str) else list(targets)
    for t in [*names, *optional, *require]:
        get_target(t)  # an unknown name: a clean error listing the targets, before any work
    options = {"golden": Path(golden) if golden is not None else None, "require": require,
               "optional": optional,
               "policy_file": Path(policy_file) if policy_file is not None else None}
    if Path(model).is_dir():
        return parity_for_model_dir(Path(model), names, **options)
    return parity_for_mechanism(str(model), preset, names, work_dir=Path(work_dir), **options)


def bundle(
    model_dir: str | Path,
    target: str,
    output: str | Path | None = None,
    *,
    golden: str | Path | None = None,
    precision: str | None = None,
    archive: bool = False,
    **options: Any,
) -> BundleResult:
    """A deployable bundle of ``model_dir`` for ``target``: the model, a golden subset, the
    tolerance policy and provenance, checked on the host first. ``qcrun.load(path)`` and
    ``qcrun verify`` read it without torch.

    Your own module needs ``golden`` (a set from :func:`write_golden`). ``options`` are those
    of ``qcexport.bundle.make_bundle``: ``cases``, ``profile_shapes``, ``host_targets``.
    """
    from qcexport.bundle import make_bundle

    return make_bundle(model_dir, target, precision, output, archive, golden=golden, **options)


def profile(
    model_dir: str | Path,
    targets: Sequence[str] = ("ort-cpu",),
    *,
    batch: Sequence[int] = (),
    tokens: Sequence[int] = (),
    axes: Sequence[str] = (),
    runs: int | None = None,
    budget_s: float | None = None,
    **options: Any,
) -> ProfileReport:
    """Latency profile of a model directory: percentiles per target and shape, per-op time
    folded to PyTorch modules, memory, achieved FLOP/s (``qcrun.profile.profile_model``).

    The sweep is ``batch`` and ``tokens`` sizes and ``axes`` (``"NAME=1,4"``); with none, one
    point at the defaults. Inputs come from the mechanism's input factory for a built-in
    mechanism, else seeded synthetic inputs shaped by the manifest. ``options`` go to
    ``profile_model`` (``warmup``, ``op_runs``, ``gemm_sizes``, ``threads``, ...). Use
    ``report.to_json()`` / ``to_markdown()`` to save it.
    """
    from qcrun.files import read_model_dir
    from qcrun.latency import check_sweep, plan_sweep, sweep_points, synthetic_feeds
    from qcrun.profile import profile_model

    from qcexport.mechanisms.feeds import spec_feeds

    model = read_model_dir(model_dir, stage="profile")  # hashes and precision checked
    manifest = model.manifest
    sweep = plan_sweep(manifest.input_specs(), roles=manifest.roles, batch=list(batch),
                       tokens=list(tokens), axes=list(axes))
    check_sweep(manifest.input_specs(), sweep, manifest.dynamic_axes)
    feeds = spec_feeds(manifest) or synthetic_feeds(model)
    names = [targets] if isinstance(targets, str) else list(targets)
    info = {k: getattr(manifest, k) for k in ("mechanism", "preset", "precision", "attention",
                                              "opset", "target")
            if getattr(manifest, k) is not None}
    options.setdefault("gemm_sizes", None)  # the GEMM peak takes seconds; ask for it by size
    return profile_model(model.model, names,
                         sweep_points(sweep), lambda point: feeds(manifest, point), runs=runs,
                         budget_s=budget_s, model_info=info, **options)

"""``qcexport convert --split context``: cut a converted model directory in two, verify the
pair, and record the cut in its manifest.

The pair is verified on qcrun (the code a device runs) before the manifest names it: on every
case it must reproduce the single graph under the policy of the model's precision and, where
the model has a golden set of its weights, PyTorch eager's outputs too. The graphs are written
first and the manifest last, each atomically: a failure leaves the directory as it was, a model
used whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from qcrun.context import SplitRunner, describe_split
from qcrun.engines import adapter_for
from qcrun.errors import UserError
from qcrun.files import (
    MANIFEST_FILE,
    ModelDir,
    SplitCut,
    TensorSpec,
    check_split,
    manifest_json,
    read_model_dir,
    write_atomic,
)
from qcrun.golden import file_sha256, load_golden
from qcrun.inputs import make_inputs
from qcrun.onnxfile import read_summary
from qcrun.parity import Record, compare_outputs, policy_for
from qcrun.schema import dump

from qcexport.export.save import save_model_atomic
from qcexport.split.graph import split_graph

CONTEXT_FILE = "context.onnx"
QUERY_FILE = "query.onnx"
#: Sizes of symbolic axes for the synthetic cases of a model without golden cases (two
#: settings, so that an axis fixed by the cut would show).
SYNTHETIC_SIZES = ({}, {"__scale__": 2})
#: Precisions whose reduced model is not an ONNX graph (no cut can be made of it).
IR_PRECISIONS = ("int8-nncf",)


@dataclass(frozen=True)
class SplitResult:
    path: Path
    cut: SplitCut
    checks: list[Record]
    context_nodes: int
    query_nodes: int

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(r.verdict == "pass" for r in self.checks)


def default_context_inputs(model: ModelDir) -> tuple[str, ...]:
    """The spec's context inputs: the mechanism's, or the Hugging Face component's."""
    from qcexport import mechanisms
    from qcexport.hf import components

    manifest = model.manifest
    if manifest.mechanism in mechanisms.names():
        found = mechanisms.get(manifest.mechanism).context_inputs
    else:
        name = (manifest.source or {}).get("component")
        found = components.get(name).context_inputs if name in components.names() else ()
    if not found:
        raise UserError(f"{model.path}: no context inputs are known for this model (inputs: "
                        f"{', '.join(s.name for s in manifest.inputs)})", stage="split",
                        hint="name the image-side inputs: --context-inputs A,B")
    return tuple(found)


def split_model_dir(model_dir: str | Path, context_inputs: Sequence[str] | None = None, *,
                    target: str | None = None) -> SplitResult:
    """Cut the model in ``model_dir`` at ``context_inputs`` (default: the spec's), verify the
    pair on ``target`` (default: the model's own) and record the cut; a UserError if the pair
    does not reproduce the model."""
    model = read_model_dir(model_dir, stage="split")
    inputs = tuple(context_inputs or default_context_inputs(model))
    parts = split_graph(onnx.load(str(model.model)), inputs)
    path = model.path
    written = [*save_model_atomic(parts.context, path / CONTEXT_FILE),
               *save_model_atomic(parts.query, path / QUERY_FILE)]
    if len(written) != 2:
        raise UserError("the split graphs are too large for one file each", stage="split",
                        hint="split a model under 2 GB")
    boundary = read_summary(path / CONTEXT_FILE, stage="split").outputs
    cut = SplitCut(
        context_inputs=list(inputs), context_model=CONTEXT_FILE,
        context_sha256=file_sha256(path / CONTEXT_FILE), query_model=QUERY_FILE,
        query_sha256=file_sha256(path / QUERY_FILE),
        boundary=[TensorSpec(v.name, v.dtype, list(v.shape or ())) for v in boundary],
        dynamic_axes={v.name: {str(i): d for i, d in enumerate(v.shape or ())
                               if isinstance(d, str)} for v in boundary},
        query_defaults=list(parts.defaults))
    manifest = replace(model.manifest, split=cut)
    check_split(path, manifest, where="the split being written", stage="split")
    checks = verify_split(replace(model, manifest=manifest), target)
    failed = [r for r in checks if r.verdict != "pass"]
    if failed:
        raise UserError("the context and query graphs do not reproduce the model: " + "; ".join(
            f"{r.case}/{r.output}: {r.message}" for r in failed[:5]), stage="split",
            hint="report the model; convert without --split to use it whole")
    write_atomic(path / MANIFEST_FILE, manifest_json(manifest))
    return SplitResult(path, cut, checks, len(parts.context.graph.node),
                       len(parts.query.graph.node))


def verification_cases(model: ModelDir) -> list[tuple[str, dict[str, np.ndarray],
                                                        dict[str, np.ndarray] | None]]:
    """(name, inputs, eager outputs or None): the golden cases of the model's weights (eager
    outputs known), and the spec's cases or synthetic ones (compared with the single graph)."""
    from qcexport import mechanisms
    from qcexport.golden import golden_path

    manifest = model.manifest
    cases = []
    where = golden_path(manifest.mechanism, manifest.preset) if manifest.builtin else None
    if where is not None and (where / MANIFEST_FILE).is_file():
        golden = load_golden(where, mechanism=manifest.mechanism, preset=manifest.preset)
        try:
            model.check_weights(golden)
        except UserError:
            golden = None
        for case in golden.cases if golden else ():
            cases.append((f"golden:{case.name}", case.inputs, case.outputs))
    if manifest.mechanism in mechanisms.names():
        spec = mechanisms.get(manifest.mechanism)
        config = spec.saved_config(manifest.config, manifest.preset)
        for case in (*spec.golden_cases, spec.verify_case):
            feed = {k: v.numpy() for k, v in spec.inputs(config, case).items()}
            cases.append((case.name, feed, None))
    else:
        specs = manifest.input_specs()
        for i, sizes in enumerate(SYNTHETIC_SIZES):
            scaled = {d: 2 + 3 * i for s in specs for d in s["shape"] if isinstance(d, str)}
            cases.append((f"synthetic{i}", make_inputs(specs, scaled if sizes else {}, seed=i),
                          None))
    return cases


def verify_split(model: ModelDir, target: str | None = None) -> list[Record]:
    """The pair against the single graph on every case, and against eager where known, under
    the policy of the model's precision (qcrun's own, never the model's)."""
    target = target or model.manifest.target or "ort-cpu"
    policy = policy_for(model.precision)

    def tolerance(name):
        return policy.resolve(model.precision, target, name)

    records: list[Record] = []
    single = adapter_for(model.model, target, precision=model.precision)
    with single, SplitRunner(model, target) as pair:
        for name, feed, eager in verification_cases(model):
            got = pair.run(feed)
            records += compare_outputs(target, f"{name} (pair vs single graph)", got,
                                       single.run(feed), tolerance)
            if eager is not None:
                records += compare_outputs(target, f"{name} (pair vs eager)", got,
                                           _known(eager, got), tolerance)
    return records


def _known(expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]):
    """The golden outputs the model has (a golden set may hold outputs of other exports)."""
    return {k: v for k, v in expected.items() if k in got}


def split_of(model_dir: str | Path, precision: str) -> SplitCut | None:
    """The cut of a split model about to be quantized to ``precision`` (None: not split). A
    reduced model that is not an ONNX graph (OpenVINO IR) cannot be cut: refused before any
    work, with the way round."""
    model = read_model_dir(model_dir, stage="quantize")
    cut = model.manifest.split
    if cut is not None and precision in IR_PRECISIONS:
        raise UserError(f"{model_dir} is split into context and query graphs, and {precision} "
                        "writes an OpenVINO IR model, which the split cannot cut",
                        stage="quantize",
                        hint=f"quantize to an ONNX precision (int8-static, int8-dynamic, fp16), "
                        f"or quantize the model unsplit: {precision} runs it whole")
    return cut


def resplit(result, cut: SplitCut):
    """The quantized model (``QuantizeResult``) cut at the fp32 model's context inputs: both
    graphs are the reduced model's, and the pair is verified against it under the policy of
    its precision (and against eager where the golden set is the model's)."""
    split = split_model_dir(result.path.parent, cut.context_inputs)
    result.manifest["split"] = dump(split.cut)
    return result


def inspect_split(path: str | Path, target: str, cases: Sequence[str] = (),
                  sizes: Mapping[str, int] | None = None):
    """(model, ``qcrun.context.SplitInfo``) of a split model directory for `qcexport inspect`,
    with one context per golden case of its spec (``cases``: those named; default every one),
    or one at ``sizes`` (synthetic inputs; the first case sets the other axes); None for
    anything that is not a split model directory (a mechanism name, an unsplit model)."""
    from qcexport import mechanisms
    from qcexport.diagnostics.inputs import golden_case_feeds

    path = Path(path)
    if not (path / MANIFEST_FILE).is_file():
        return None
    model = read_model_dir(path, stage="inspect")
    manifest = model.manifest
    if manifest.split is None:
        return None
    if manifest.mechanism in mechanisms.names():
        spec = mechanisms.get(manifest.mechanism)
        config = spec.saved_config(manifest.config, manifest.preset)
        feeds = golden_case_feeds(spec, config, list(cases) or None, default_all=True)
    else:
        feeds = [(name, feed) for name, feed, _ in verification_cases(model)]
    if sizes:
        label = " ".join(f"{k}={v}" for k, v in sizes.items())
        feeds = [(label, make_inputs(manifest.input_specs(), sizes, 0, template=feeds[0][1]))]
    return model, describe_split(model, feeds, target)

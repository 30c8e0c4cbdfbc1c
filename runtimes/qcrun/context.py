"""Many queries about one image: a split model's context graph run once, its query graph
run per query.

A model converted with ``qcexport convert NAME --split context`` carries, beside
``model.onnx``, a context graph (everything that depends only on the image side: the visual
keys and values of every cross-attention layer) and a query graph that takes the other inputs
and the context. ``SplitRunner.encode(...)`` runs the context graph and returns a ``Context``;
``SplitRunner.query(ctx, ...)`` runs the query graph against it, as often as there are
questions, tasks, decoding steps or output queries.

A ``Context`` is tagged with the sha256 of the model that made it: a query graph refuses a
context from any other model (a context of matching shapes from other weights would give
wrong answers without an error). Contexts are immutable and may be shared between threads;
the runner is as thread-safe as its engine's adapters (see ``qcrun.api``). On engines that
have an own tensor type (OpenVINO) the context is held in it, so a query does not copy it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcrun.engines import Adapter, adapter_for
from qcrun.engines.base import Held, LoadFailed, RunFailed
from qcrun.errors import UserError
from qcrun.files import ModelDir, SplitCut, TensorSpec
from qcrun.parity import Record, compare_outputs


@dataclass(frozen=True, eq=False)
class Context:
    """The image side of one model's inputs, computed once: the boundary tensors by name.

    ``model_sha256`` names the model it belongs to; ``arrays`` are read-only views.
    """

    model_sha256: str
    arrays: Mapping[str, np.ndarray]
    _held: Held | None = None

    @property
    def nbytes(self) -> int:
        """Memory of the context's arrays (what keeping one image's context costs)."""
        return sum(int(a.nbytes) for a in self.arrays.values())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in self.arrays.items())
        return f"Context(model {self.model_sha256[:12]}, {self.nbytes} bytes: {shapes})"


def _frozen(array: np.ndarray) -> np.ndarray:
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view


class SplitRunner:
    """The context and query graphs of one split model directory, loaded on one target."""

    def __init__(self, model: ModelDir, target: str, *,
                 adapter_factory: Callable[..., Adapter] = adapter_for, **options: Any):
        if model.manifest.split is None:
            raise UserError(f"{model.path} is not a split model: it has no context and query "
                            "graphs", stage="load",
                            hint="convert it with `qcexport convert NAME --split context`")
        self.cut: SplitCut = model.manifest.split
        self.model_sha256 = model.manifest.model_sha256
        self.label = str(model.path)
        options.setdefault("precision", model.manifest.precision)
        self.context_adapter: Adapter = adapter_factory(
            _file(model, self.cut.context_model), target, **options)
        self.query_adapter: Adapter = adapter_factory(
            _file(model, self.cut.query_model), target, **options)
        self.query_inputs = [s.name for s in self.cut.query_specs(model.manifest.inputs)
                             if s.name not in {b.name for b in self.cut.boundary}
                             or s.name in self.cut.query_defaults]

    def load(self) -> SplitRunner:
        self.context_adapter.load()
        try:
            self.query_adapter.load()
        except BaseException:
            self.context_adapter.close()
            raise
        return self

    def close(self) -> None:
        self.context_adapter.close()
        self.query_adapter.close()

    def __enter__(self) -> SplitRunner:
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, inputs: Mapping[str, Any]) -> Context:
        """Run the context graph on the context inputs (and only those)."""
        extra = sorted(set(inputs) - set(self.cut.context_inputs))
        if extra:
            raise UserError(f"encode takes the context inputs {self.cut.context_inputs} of "
                            f"{self.label}, not {extra}", stage="encode",
                            hint=f"pass {', '.join(extra)} to query(ctx, ...) instead")
        outputs = self.context_adapter.run(inputs)
        arrays = {b.name: outputs[b.name] for b in self.cut.boundary}
        # the engine may keep its own view of the arrays; the caller gets read-only ones
        held = self.query_adapter.hold(arrays)
        return Context(self.model_sha256, {k: _frozen(v) for k, v in arrays.items()}, held)

    def query(self, context: Context, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the query graph on ``inputs`` (the non-context inputs) against ``context``.
        An optional input of the model (``cut.query_defaults``) replaces the default the
        context holds for it."""
        self.check_context(context)
        given = {k for k in inputs if k in context.arrays and k not in self.cut.query_defaults}
        if given:
            raise UserError(f"query inputs {sorted(given)} are the context's own tensors",
                            stage="query", hint="pass only " + ", ".join(self.query_inputs))
        held = context._held or self.query_adapter.hold(context.arrays)
        replaced = {k: v for k, v in inputs.items() if k in held.arrays}
        if replaced:
            # held too: OpenVINO would copy an array into the request's tensor of that input,
            # which is the default's own memory after a run with the default
            mine = self.query_adapter.hold(replaced)
            held = Held({**held.arrays, **mine.arrays}, {**held.engine, **mine.engine})
            inputs = {k: v for k, v in inputs.items() if k not in replaced}
        return self.query_adapter.run_held(inputs, held)

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Both graphs on one set of inputs: what the single model computes."""
        context = self.encode({k: v for k, v in inputs.items() if k in self.cut.context_inputs})
        return self.query(context, {k: v for k, v in inputs.items()
                                    if k not in self.cut.context_inputs})

    def check_context(self, context: Any) -> None:
        if not isinstance(context, Context):
            raise UserError(f"query needs a Context from encode(), not {type(context).__name__}",
                            stage="query", hint="ctx = model.encode(...); model.query(ctx, ...)")
        if context.model_sha256 != self.model_sha256:
            raise UserError(
                f"this context was computed by another model (sha256 {context.model_sha256}) "
                f"than {self.label} (sha256 {self.model_sha256}): its tensors would be read "
                "as this model's context and give wrong answers", stage="query",
                hint="encode the image with this model: ctx = model.encode(...)")
        missing = [b.name for b in self.cut.boundary if b.name not in context.arrays]
        if missing:
            raise UserError(f"the context lacks {missing}", stage="query",
                            hint="use the context encode() returned, unchanged")


def _file(model: ModelDir, name: str) -> Path:
    return model.path / name


#: How a parity case run through the context and query graphs is named in a report.
PAIR_CASE = "{case} [context+query]"


def split_parity(model: ModelDir, golden, targets, policy, precision: str) -> list[Record]:
    """A split model's pair on every golden case on each of ``targets`` (those the single
    graph ran on), against the golden (eager) outputs under ``policy``: what ``run_parity``
    checks of the single graph, checked of the graphs a device runs for encode and query."""
    records: list[Record] = []
    for target in targets:
        try:
            with SplitRunner(model, target) as pair:
                for case in golden.cases:
                    name = PAIR_CASE.format(case=case.name)
                    try:
                        got = pair.run(case.inputs)
                    except RunFailed as e:
                        records.append(Record(target, name, None, "fail", "run", str(e)))
                        continue
                    records += compare_outputs(
                        target, name, got, case.outputs,
                        lambda out, t=target: policy.resolve(precision, t, out))
        except LoadFailed as e:
            records.append(Record(target, PAIR_CASE.format(case="*"), None, "fail", "load",
                                  str(e)))
    return records


# --- what `inspect` shows of a split model ---------------------------------------------------


@dataclass(frozen=True)
class ContextSize:
    """One context at the shapes of one case: each boundary tensor's shape and the bytes the
    whole context holds (``Context.nbytes``), as the context graph computed it."""

    case: str
    input_shapes: dict[str, list[int]]
    shapes: dict[str, list[int]]
    nbytes: int


@dataclass(frozen=True)
class SplitInfo:
    """The cut of a split model: what ``encode`` takes, what crosses, what ``query`` takes
    (``query_defaults``: optional, the context holds their defaults), the nodes of each graph
    (subgraphs included) and the bytes of one context at the cases' shapes."""

    context_inputs: list[TensorSpec]
    boundary: list[TensorSpec]
    query_inputs: list[TensorSpec]
    query_defaults: list[str]
    nodes: dict[str, int]
    contexts: list[ContextSize]
    target: str

    def describe(self) -> list[str]:
        """Lines for a terminal."""
        def specs(items: list[TensorSpec]) -> str:
            return ", ".join(f"{s.name} {s.dtype}{_dims(s.shape)}" for s in items) or "-"

        defaults = f" ({', '.join(self.query_defaults)}: optional, default in the context)" \
            if self.query_defaults else ""
        lines = ["split model: context graph once per image (encode), query graph per query",
                 f"  context inputs  {specs(self.context_inputs)}",
                 f"  boundary        {specs(self.boundary)}",
                 f"  query inputs    {specs(self.query_inputs)}{defaults}",
                 "  nodes           " + ", ".join(f"{k} {v}" for k, v in self.nodes.items())]
        for c in self.contexts:
            lines.append(f"  one context     {c.nbytes:,} bytes at {c.case} ("
                         + ", ".join(f"{k}{_dims(v)}" for k, v in c.input_shapes.items())
                         + f"; on {self.target})")
        return lines


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def describe_split(model: ModelDir, feeds: Sequence[tuple[str, Mapping[str, Any]]],
                   target: str) -> SplitInfo:
    """The cut of ``model`` (a split model directory), and one context per case of ``feeds``
    ((name, inputs); the context inputs are read) encoded on ``target``: the boundary's
    shapes and bytes come from the context graph itself, since some of its axes (``unk__``,
    ``tokens*media``) are named by no input."""
    from qcrun.onnxfile import read_summary

    cut = model.manifest.split
    if cut is None:
        raise UserError(f"{model.path} is not a split model", stage="inspect",
                        hint="convert it with `qcexport convert NAME --split context`")
    specs = {s.name: s for s in model.manifest.inputs}
    nodes = {name: sum(read_summary(model.path / file, stage="inspect").ops.values())
             for name, file in (("full", model.manifest.model), ("context", cut.context_model),
                                ("query", cut.query_model))}
    contexts = []
    with SplitRunner(model, target) as pair:
        for case, feed in feeds:
            image = {k: np.asarray(v) for k, v in feed.items() if k in cut.context_inputs}
            context = pair.encode(image)
            contexts.append(ContextSize(
                case, {k: list(v.shape) for k, v in image.items()},
                {k: list(v.shape) for k, v in context.arrays.items()}, context.nbytes))
    return SplitInfo(
        context_inputs=[specs[n] for n in cut.context_inputs if n in specs],
        boundary=list(cut.boundary),
        query_inputs=[s for s in model.manifest.inputs if s.name not in cut.context_inputs]
        + [b for b in cut.boundary if b.name in cut.query_defaults],
        query_defaults=list(cut.query_defaults), nodes=nodes, contexts=contexts,
        target=target)

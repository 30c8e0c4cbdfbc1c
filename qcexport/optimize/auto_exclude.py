"""Accuracy-aware int8 (``qcexport quantize --auto-exclude``): keep the module that loses the
most accuracy in float, quantize again, measure again, until the precision policy holds.

Each attempt is judged on its final outputs against the fp32 model, both run on the target,
under the precision's tolerance policy (qcrun's, or the ``--policy`` file; never anything the
artifact carries). When an attempt misses it, the module boundaries of the reduced model are
compared with the fp32 model's on the same target (``qcrun.localize`` with the fp32 model as
a ``RuntimeReference``), and each module that still holds a quantized matrix product is
scored by the noise it *adds*: the noise-to-signal power at its output (from the boundary
SNR) minus the worst at the outputs of the modules it reads, per matrix product it would keep
in float. Quantization noise adds in power along the graph, so the difference is what the
module's own int8 contributes, and dividing by the products it holds prefers the small
sensitive layer (an outlier-laden projection) over a whole block that merely carries the
error of its children. The best-scoring module's nodes go to the quantizer's
``nodes_to_exclude`` and the next attempt starts.

The search stops when the policy holds, or fails (a UserError naming every attempt, nothing
written) when the exclusion budget is spent. What stayed in float and what it costs on the
target (plain int8, auto-excluded and fp32 timed in alternated rounds, medians) go into the
manifest's quantization settings as :class:`AutoExclusion`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from qcrun import boundaries as bd
from qcrun.engines import open_adapter
from qcrun.errors import UserError
from qcrun.graphs import walk_graphs
from qcrun.latency import time_calls
from qcrun.localize import Case, RuntimeReference, Workspace, localize_target
from qcrun.parity import TolerancePolicy, compare_outputs
from qcrun.schema import parse

from qcexport.optimize.precision import QUANTIZED_OPS, QuantizeSettings

#: Precisions whose quantizer takes ``nodes_to_exclude`` (int8-nncf has its own accuracy
#: control: ``--accuracy-control``).
AUTO_PRECISIONS = ("int8-static", "int8-dynamic")
DEFAULT_BUDGET = 4
#: Latency of the three models: rounds with the order rotated, runs per model per round.
LATENCY_ROUNDS, LATENCY_RUNS = 5, 3


@dataclass
class KeptModule:
    """A module auto-exclude kept in float, in the order chosen."""

    module: str
    nodes: int  # matrix products (MatMul/Gemm) of the module it kept in float
    added_noise: float  # noise/signal power the module added at its boundary (the score)
    cosine_before: float  # the worst final-output cosine of the attempt that chose it


@dataclass
class Attempt:
    """One quantization tried: the modules in float and how its final outputs fared."""

    kept: list[str]
    passed: bool
    worst: str  # case/output with the lowest cosine
    cosine: float
    max_abs: float


@dataclass
class LatencyCost:
    """Median latency on the target of the plain int8, the auto-excluded and the fp32 model."""

    target: str
    int8_ms: float
    auto_ms: float
    fp32_ms: float
    rounds: int
    runs: int
    method: str = "alternated rounds, order rotated each round; medians"


@dataclass
class AutoExclusion:
    """What ``--auto-exclude`` did: recorded in the manifest's ``quantization.auto_exclude``."""

    target: str
    budget: int
    tolerance: str  # the policy the final outputs were held to (default output)
    kept: list[KeptModule] = field(default_factory=list)
    float_nodes: int = 0  # nodes of the kept modules passed to nodes_to_exclude
    attempts: list[Attempt] = field(default_factory=list)
    latency: LatencyCost | None = None

    @classmethod
    def from_manifest(cls, quantization: Mapping[str, Any]) -> AutoExclusion | None:
        data = quantization.get("auto_exclude")
        return None if data is None else parse(cls, data, where="manifest quantization."
                                               "auto_exclude", stage="manifest")


def check_options(precision: str, budget: int) -> None:
    if precision not in AUTO_PRECISIONS:
        raise UserError(f"--auto-exclude applies to {' and '.join(AUTO_PRECISIONS)}, not "
                        f"{precision}", stage="quantize",
                        hint="for int8-nncf use --accuracy-control (NNCF's own search)")
    if budget < 0:
        raise UserError(f"--exclusion-budget must be 0 or more modules, not {budget}",
                        stage="quantize", hint="pass e.g. --exclusion-budget 4")


# --- the model's structure (fp32 graph) ------------------------------------------------------


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def _sources(name: str, module: str, producer, modules, seen: set[str]) -> set[str]:
    """The modules outside ``module`` whose outputs reach it through ``name``. A value made by
    an enclosing module's own nodes (a concat in the layer, a reshape at the top) is traced
    back through them: the enclosing module's boundary value comes after ``module`` runs."""
    node = producer.get(name)  # None: a graph input or a weight, exact in both models
    if node is None or name in seen:
        return set()
    seen.add(name)
    path = modules.get(bd.node_key(node), "")
    if _inside(path, module):
        return set()
    if not path or module.startswith(path + "."):
        return set().union(*(_sources(i, module, producer, modules, seen) for i in node.input))
    return {path}


@dataclass
class _Structure:
    """Per node key: its module, name and whether the quantizer would quantize it; per
    module: the modules whose values it reads (its inputs' producers)."""

    modules: dict[str, str]
    names: dict[str, str]
    products: list[str]  # keys of MatMul/Gemm nodes
    reads: dict[str, set[str]]

    @classmethod
    def of(cls, model) -> _Structure:
        modules = bd.node_modules(model)
        nodes = [n for g, _ in walk_graphs(model.graph) for n in g.node]
        producer = {o: n for n in nodes for o in n.output if o}
        reads: dict[str, set[str]] = {}
        for node in nodes:
            own = modules.get(bd.node_key(node), "")
            parts = own.split(".") if own else []
            for i in range(1, len(parts) + 1):
                module = ".".join(parts[:i])
                for name in node.input:
                    found = _sources(name, module, producer, modules, set())
                    reads.setdefault(module, set()).update(found)
        return cls(modules, {bd.node_key(n): n.name for n in nodes},
                   [bd.node_key(n) for n in nodes if n.op_type in QUANTIZED_OPS], reads)

    def nodes_of(self, module: str) -> list[str]:
        """Node names of ``module`` (every node, so nothing of it is quantized)."""
        return [self.names[k] for k, m in self.modules.items() if _inside(m, module)]

    def products_of(self, module: str | None, kept: Sequence[str],
                    floating: Collection[str] = ()) -> int:
        """Matrix products of ``module`` (None: the whole model) still quantized: outside
        the ``kept`` modules and not among the ``floating`` node names."""
        count = 0
        for key in self.products:
            path = self.modules.get(key, "")
            if (module is None or _inside(path, module)) and self.names[key] not in floating \
                    and not any(_inside(path, m) for m in kept):
                count += 1
        return count


def attribute_qdq(model) -> None:
    """Give the quantizer's Q/DQ pairs (which carry no module) the module whose int8 they are,
    in place, so that its boundary tensors carry its quantization noise: the pair after a
    quantized product quantizes that product's output (its module's); any other pair
    quantizes the input of the products reading it (their common module). Weight DQs stay
    module-less: a weight is no boundary value."""
    modules = bd.node_modules(model)
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output if o}
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in nodes:
        if node.op_type != "QuantizeLinear" or modules.get(bd.node_key(node)):
            continue
        pair = [node, *(r for r in readers.get(node.output[0], [])
                        if r.op_type == "DequantizeLinear")]
        source = producer.get(node.input[0])
        if source is not None and source.op_type in QUANTIZED_OPS:
            module = modules.get(bd.node_key(source), "")
        else:
            users = [modules.get(bd.node_key(u), "").split(".") for d in pair[1:]
                     for u in readers.get(d.output[0], [])]
            common = []
            for parts in zip(*users, strict=False) if users else ():
                if len(set(parts)) != 1:
                    break
                common.append(parts[0])
            module = ".".join(common)
        for member in pair if module else ():
            bd.set_module(member, module)


def _nsr(snr_db: float | None) -> float:
    """Noise-to-signal power from an SNR in dB (0 where unknown or identical)."""
    return 0.0 if snr_db is None else 10.0 ** (-snr_db / 10.0)


def choose(rows, structure: _Structure, kept: Sequence[str],
           floating: Collection[str] = ()) -> KeptModule | None:
    """The module that adds the most noise per matrix product it would keep in float, among
    those with a product still quantized and short of the whole remaining model
    (``floating``: node names in float whatever is chosen, e.g. the mechanism's exclusions)."""
    noise = {r.module: _nsr(r.snr_db) for r in rows if r.verdict != "unmatched"}
    remaining = structure.products_of(None, kept, floating)
    best, best_score = None, 0.0
    for module, out in noise.items():
        products = structure.products_of(module, kept, floating)
        if not module or not products or products >= remaining:
            continue
        added = out - max((noise.get(m, 0.0) for m in structure.reads.get(module, ())),
                          default=0.0)
        score = added / products
        if best is None or score > best_score:
            best, best_score = KeptModule(module, products, added, float("nan")), score
    return best


# --- measuring -------------------------------------------------------------------------------


def _expected(src: Path, target: str, cases: Sequence[Case]) -> dict[str, dict[str, np.ndarray]]:
    with open_adapter(src, target, precision="fp32") as ref:
        return {c.name: ref.run(dict(c.inputs)) for c in cases}


def judge(path: Path, target: str, precision: str, cases: Sequence[Case], expected,
          policy: TolerancePolicy, kept: Sequence[str]) -> Attempt:
    """The attempt's final outputs against the fp32 model's, under the policy."""
    records = []
    with open_adapter(path, target, precision=precision) as low:
        for case in cases:
            records += compare_outputs(target, case.name, low.run(dict(case.inputs)),
                                       expected[case.name],
                                       lambda name: policy.resolve(precision, target, name))
    scored = [r for r in records if r.metrics is not None]
    worst = min(scored, key=lambda r: r.metrics.cosine if r.metrics.cosine is not None else 1.0,
                default=None)
    return Attempt(list(kept), all(r.verdict == "pass" for r in records),
                   f"{worst.case}/{worst.output}" if worst else "",
                   float(worst.metrics.cosine) if worst and worst.metrics.cosine is not None
                   else float("nan"),
                   max((float(r.metrics.max_abs) for r in scored), default=float("nan")))


def latency_cost(models: Mapping[str, tuple[Path, str]], target: str, feed,
                 rounds: int = LATENCY_ROUNDS, runs: int = LATENCY_RUNS) -> dict[str, float]:
    """Median ms of each model (label -> (path, declared precision)) on ``target``, timed in
    rounds with the order rotated, so the machine's noise hits each alike."""
    adapters = {k: open_adapter(p, target, precision=d) for k, (p, d) in models.items()}
    try:
        samples: dict[str, list[float]] = {k: [] for k in adapters}
        order = list(adapters)
        for r in range(rounds):
            for label in order[r % len(order):] + order[:r % len(order)]:
                adapter = adapters[label]
                samples[label] += time_calls(lambda a=adapter: a.run(dict(feed)),
                                             warmup=1 if r == 0 else 0, runs=runs).samples_s
    finally:
        for adapter in adapters.values():
            adapter.close()
    return {k: float(np.median(v)) * 1e3 for k, v in samples.items()}


# --- the search ------------------------------------------------------------------------------


Quantize = Callable[[Path, Sequence[str]], QuantizeSettings]


def auto_exclude(src: Path, staged: Path, precision: str, quantize: Quantize,
                 evaluation: Sequence[tuple[str, Mapping[str, np.ndarray]]], *,
                 policy: TolerancePolicy, target: str, budget: int = DEFAULT_BUDGET,
                 time_latency: bool = True) -> QuantizeSettings:
    """Quantize ``src`` into ``staged`` (``quantize(dst, extra_nodes)``), keeping modules in
    float until the final outputs meet ``policy`` on ``target``; a UserError when the budget
    is spent."""
    check_options(precision, budget)
    structure = _Structure.of(onnx.load(str(src), load_external_data=False))
    tolerance = policy.resolve(precision, target)
    record = AutoExclusion(target, budget, tolerance.describe())
    with tempfile.TemporaryDirectory(prefix="qcexport-auto-exclude-") as tmp:
        expected = _expected(src, target, [Case(n, f) for n, f in evaluation])
        # the fp32 outputs as each case's expected ones: only failing cases are localised
        cases = [Case(name, feed, expected[name]) for name, feed in evaluation]
        reference = RuntimeReference(Workspace(src, Path(tmp) / "fp32"), target, cases,
                                     name=f"fp32 model on {target}")
        kept: list[KeptModule] = []
        for attempt_no in range(budget + 1):
            work = Path(tmp) / f"attempt{attempt_no}" / staged.name
            work.parent.mkdir()
            nodes = [n for k in kept for n in structure.nodes_of(k.module)]
            settings = quantize(work, nodes)
            if attempt_no == 0:  # the mechanism's and the user's exclusions
                floating = set(settings.excluded_nodes)
            attempt = judge(work, target, precision, cases, expected, policy,
                            [k.module for k in kept])
            record.attempts.append(attempt)
            if attempt.passed:
                break
            if attempt_no == budget:
                raise _spent(record, precision, target)
            try:
                report = localize_target(_attributed(work), target, cases, reference,
                                         tolerance, all_cases=True)
            finally:
                reference.close()  # its loaded session: the next attempt loads another
            pick = choose(report.modules, structure, [k.module for k in kept], floating)
            if pick is None:
                raise _spent(record, precision, target, "no module with a quantized matrix "
                             "product is left to keep in float")
            pick.cosine_before = attempt.cosine
            kept.append(pick)
        record.kept = kept
        record.float_nodes = len(set(nodes) - floating)
        if kept and time_latency:
            record.latency = _cost(src, Path(tmp) / "attempt0" / staged.name, work, precision,
                                   target, cases[0].inputs)
        for path in work.parent.iterdir():  # the model and, when large, its data file
            if path.is_file():
                shutil.copyfile(path, staged.parent / path.name)
    settings.auto_exclude = record
    return settings


def _attributed(path: Path) -> Workspace:
    """The reduced model at ``path`` with its Q/DQ nodes in their modules, for localising
    (beside it, in a folder of its own: the model's directory is what gets saved)."""
    model = onnx.load(str(path))
    attribute_qdq(model)
    scratch = path.parent.parent / f"{path.parent.name}-localize"
    scratch.mkdir()
    return Workspace(bd.save_temp(model, scratch, path.name), scratch / "workspace")


def _cost(src: Path, plain: Path, auto: Path, precision: str, target: str, feed) -> LatencyCost:
    ms = latency_cost({"int8": (plain, precision), "auto": (auto, precision),
                       "fp32": (src, "fp32")}, target, feed)
    return LatencyCost(target, ms["int8"], ms["auto"], ms["fp32"], LATENCY_ROUNDS, LATENCY_RUNS)


def _spent(record: AutoExclusion, precision: str, target: str, why: str = "") -> UserError:
    tried = "; ".join(f"[{', '.join(a.kept) or 'plain ' + precision}] worst {a.worst} cosine "
                      f"{a.cosine:.6f}, max abs {a.max_abs:.3g}" for a in record.attempts)
    why = why or f"the exclusion budget of {record.budget} modules is spent"
    return UserError(
        f"--auto-exclude could not bring {precision} within the policy ({record.tolerance}) on "
        f"{target}: {why}; tried {tried}",
        stage="quantize",
        hint="raise --exclusion-budget, keep known-sensitive parts in float with "
             "--exclude-modules, or use a wider precision (fp16)")


def summary_lines(data: Mapping[str, Any]) -> list[str]:
    """What stayed in float and what it cost, from the manifest's record (CLI output)."""
    record = parse(AutoExclusion, data, where="auto_exclude", stage="quantize")
    last = record.attempts[-1]
    if not record.kept:
        return [f"  auto      plain {last.worst} cosine {last.cosine:.6f} meets the policy on "
                f"{record.target}: nothing kept in float"]
    lines = [f"  auto      kept in float on {record.target} ({record.float_nodes} nodes; "
             f"{len(record.attempts)} attempts, budget {record.budget}):"]
    lines += [f"            {k.module} ({k.nodes} matmuls; added noise {k.added_noise:.2e}, "
              f"cosine before {k.cosine_before:.6f})" for k in record.kept]
    lines.append(f"            final worst {last.worst} cosine {last.cosine:.6f} "
                 f"({record.tolerance})")
    if record.latency:
        t = record.latency
        lines.append(f"  latency   {t.target}: int8 {t.int8_ms:.2f} ms, auto {t.auto_ms:.2f} ms "
                     f"({t.auto_ms / t.int8_ms:.2f}x int8), fp32 {t.fp32_ms:.2f} ms "
                     f"({t.fp32_ms / t.auto_ms:.2f}x faster than fp32); {t.method}")
    return lines

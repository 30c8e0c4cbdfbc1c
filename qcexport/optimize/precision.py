"""Reduced precision: int8 dynamic, int8 static (calibrated QDQ) and fp16.

Several default paths of the onnxruntime quantizer produce invalid or silently wrong models
for these graphs (each case is named below), so each precision is pinned down here:

- int8-dynamic: only MatMul and Gemm are quantized (the default op list rewrites the standard
  ``Attention`` into ``com.microsoft.QAttention``, which fails to load and which OpenVINO cannot
  read); ``If`` branches are quantized too (``EnableSubgraph``); on a CPU without VNNI the
  weights use 7 bits (``reduce_range``), since full-range s8 weights saturate the u8*s8 kernel.
- int8-static: QDQ with uint8 activations (int8 activations at opset 23 trip ORT's
  ``QDQS8ToU8Transformer``), int8 per-channel weights, MinMax / Percentile / Entropy
  calibration with a bound on the intermediate outputs held at once. ORT's static quantizer does
  not enter ``If`` branches: their MatMuls stay fp32, and the manifest says how many.
- fp16: weights and activations fp16, inputs and outputs fp32; the converter leaves the graph
  unsorted, so it is topologically sorted again (every subgraph too) and checked.

Every reduced model is measured against the fp32 model on evaluation inputs and held to the
precision's tolerance policy; the per-output loss goes into the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import platform
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from qcrun.engines import open_adapter
from qcrun.errors import UserError, unknown_choice
from qcrun.graphs import all_graphs, subgraphs, walk_graphs
from qcrun.parity import Record, TolerancePolicy, compare_outputs
from qcrun.profiling.provenance import parse_scopes
from qcrun.targets import get_target

from qcexport.export import save
from qcexport.export.lowering import check_model, count_ops

if TYPE_CHECKING:
    from qcexport.optimize.auto_exclude import AutoExclusion

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static", "bf16", "int8-nncf")
#: Precisions made by another module: int8-nncf (``qcexport.optimize.nncf``, OpenVINO IR).
OTHER_QUANTIZERS = ("int8-nncf",)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QUANTIZED_OPS = ("MatMul", "Gemm")
# Ops whose presence means the model is already reduced.
_REDUCED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                "QLinearMatMul", "com.microsoft::QAttention", "com.microsoft::DynamicQuantizeMatMul"}
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_vnni(flags: set[str] | None = None) -> bool:
    """u8*s8 dot products without saturation (AVX-512 VNNI, AVX-VNNI or AMX)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & _VNNI_FLAGS) or platform.machine().lower() in ("arm64", "aarch64")


def reduced_precision_of(model: onnx.ModelProto) -> str | None:
    """Why ``model`` is already reduced (quantization ops or fp16 weights), or None."""
    ops = count_ops(model)
    found = sorted(op for op in ops if op in _REDUCED_OPS)
    if found:
        return f"it already contains {', '.join(found)}"
    halves = sum(1 for g in all_graphs(model.graph) for t in g.initializer
                 if t.data_type == onnx.TensorProto.FLOAT16)
    if halves:
        return f"{halves} of its initializers are already fp16"
    return None


def node_modules(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> dotted PyTorch module path that produced it (from exporter metadata).

    Nodes inside ``If`` branches get the path of the ``If`` node's module as a prefix, since
    the exporter records branch scopes relative to the branch function.
    """
    paths: dict[str, str] = {}
    # a graph comes after the nodes that own it: their paths are known by then
    for graph, owners in walk_graphs(model.graph):
        prefix = paths.get(owners[-1].name, "") if owners else ""
        for node in graph.node:
            own = _scope(node)
            paths[node.name] = ".".join(p for p in (prefix, own) if p)
    return paths


def _scope(node) -> str:
    """The innermost module scope the exporter recorded for ``node`` (one reading of the
    exporter's scopes for quantization and profiling alike)."""
    parsed = parse_scopes({p.key: p.value for p in node.metadata_props})
    return parsed[0][-1] if parsed and parsed[0] else ""


def resolve_exclusions(model: onnx.ModelProto, nodes: Sequence[str], modules: Sequence[str]) -> list[str]:
    """Node names to keep in float: the named nodes plus every node of the named modules."""
    paths = node_modules(model)
    unknown = [n for n in nodes if n not in paths]
    if unknown:
        raise UserError(f"--exclude-nodes names nodes the model does not have: {unknown[:5]}",
                        stage="quantize", hint="take node names from the model (e.g. Netron)")
    chosen = set(nodes)
    for module in modules:
        hits = {n for n, p in paths.items() if p == module or p.startswith(module + ".")}
        if not hits:
            known = sorted({p.split(".")[0] for p in paths.values() if p})
            if not known:
                raise UserError(
                    f"cannot exclude module {module!r}: the model's nodes carry no PyTorch module "
                    "names (it was not exported by this qcexport, or a tool dropped node metadata)",
                    stage="quantize", hint="re-export it with `qcexport convert`, or use --exclude-nodes")
            raise UserError(f"no node comes from module {module!r}", stage="quantize",
                            hint=f"top-level modules in this model: {', '.join(known)}")
        chosen |= hits
    return sorted(chosen)


@dataclass
class Calibration:
    source: str  # "factory" or a file path
    feeds: list[dict[str, np.ndarray]]
    sha256: str = ""

    @property
    def count(self) -> int:
        return len(self.feeds)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "count": self.count, "sha256": self.sha256}


def feeds_sha256(feeds: Sequence[Mapping[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            a = np.asarray(feed[name])
            digest.update(f"{name}:{a.dtype}:{a.shape}".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


def calibration_from_npz(path: str | Path, inputs: Sequence[Mapping[str, Any]]) -> Calibration:
    """Read a calibration file: one array per model input, samples along a new axis 0.

    ``inputs`` are the model's input specs (name, dtype, shape) from its manifest.
    """
    path = Path(path)
    hint = "save it with numpy.savez(path, **{input_name: samples}) of numeric arrays"
    try:
        # allow_pickle=False: a calibration file must never run code. Object arrays (which
        # need pickle) are refused when read, so every member is read inside the guard.
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UserError(f"calibration file {path} is a single array, not an .npz archive",
                            stage="calibrate", hint=hint)
        with data:
            arrays = {k: data[k] for k in data.files}
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        pickled = "allow_pickle" in str(exc) or "Object arrays" in str(exc)
        why = ("it holds pickled (object) arrays, which are refused because loading them can "
               "run code" if pickled else f"{type(exc).__name__}: {exc}")
        raise UserError(f"cannot read calibration file {path}: {why}", stage="calibrate",
                        hint=hint) from exc
    names = [i["name"] for i in inputs]
    problems = []
    missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing:
        problems.append(f"missing inputs {missing}")
    if extra:
        problems.append(f"unknown arrays {extra}")
    counts = {len(a) for a in arrays.values() if a.ndim}
    for spec in inputs:
        a = arrays.get(spec["name"])
        if a is None:
            continue
        rank = len(spec["shape"])
        if a.ndim != rank + 1:
            problems.append(f"{spec['name']} has rank {a.ndim}, expected {rank + 1} "
                            f"(samples x {spec['shape']})")
        elif a.dtype != np.dtype(spec["dtype"]):
            problems.append(f"{spec['name']} is {a.dtype}, expected {spec['dtype']}")
        else:
            for axis, dim in enumerate(spec["shape"]):
                if isinstance(dim, int) and a.shape[axis + 1] != dim:
                    problems.append(f"{spec['name']} axis {axis} is {a.shape[axis + 1]}, "
                                    f"expected {dim}")
    if len(counts) > 1:
        problems.append(f"inputs have different sample counts {sorted(counts)}")
    if problems:
        expected = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in inputs)
        raise UserError(f"calibration file {path} does not match the model: {'; '.join(problems)}",
                        stage="calibrate",
                        hint="one array per model input named as the input, samples on axis 0; "
                        f"inputs: {expected}")
    n = counts.pop() if counts else 1
    feeds = [{k: np.asarray(a[i] if a.ndim else a) for k, a in arrays.items()} for i in range(n)]
    return Calibration(str(path), feeds, feeds_sha256(feeds))


@dataclass
class QuantizeSettings:
    precision: str
    op_types: list[str] = field(default_factory=list)
    weight_type: str | None = None
    activation_type: str | None = None
    reduce_range: bool | None = None
    per_channel: bool | None = None
    method: str | None = None
    max_intermediate_outputs: int | None = None
    excluded_nodes: list[str] = field(default_factory=list)
    cpu_vnni: bool | None = None
    reason: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    # what --auto-exclude kept in float and what it cost (qcexport.optimize.auto_exclude)
    auto_exclude: AutoExclusion | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], "")}


def quantize_dynamic_int8(src: Path, dst: Path, exclude: Sequence[str],
                          external: bool = False) -> QuantizeSettings:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    vnni = has_vnni()
    quantize_dynamic(
        src, dst,
        use_external_data_format=external,
        op_types_to_quantize=list(QUANTIZED_OPS),
        weight_type=QuantType.QInt8,
        reduce_range=not vnni,
        nodes_to_exclude=list(exclude),
        extra_options={"EnableSubgraph": True},
    )
    reason = ("VNNI present: full-range int8 weights" if vnni else
              "no VNNI: 7-bit weights (reduce_range) so the u8*s8 kernel does not saturate")
    return QuantizeSettings("int8-dynamic", list(QUANTIZED_OPS), "int8", "uint8 (dynamic)",
                            not vnni, False, excluded_nodes=list(exclude), cpu_vnni=vnni,
                            reason=reason)


def quantize_static_int8(src: Path, dst: Path, calibration: Calibration, method: str,
                         exclude: Sequence[str], max_intermediate_outputs: int = 8,
                         external: bool = False) -> QuantizeSettings:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise unknown_choice("calibration method", method, CALIBRATION_METHODS, flag="--method")

    class Reader(CalibrationDataReader):
        """Feeds a window [start, end) of the calibration set at a time (CalibStridedMinMax),
        so only ``chunk`` samples' intermediate outputs are held at once, whatever the
        method: each window's ranges or histograms are merged before the next is run."""

        def __init__(self):
            self.set_range(0, len(calibration.feeds))

        def __len__(self):
            return len(calibration.feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._feeds = iter(calibration.feeds[start_index:end_index])

        def get_next(self):
            return next(self._feeds, None)

    # ORT needs the window to divide the sample count. (Its CalibMaxIntermediateOutputs is
    # not a bound to use: MinMax drops each full batch of outputs without merging its range.)
    # The histogram calibrators stack a window's samples of each tensor into one array, so
    # samples of different shapes (token counts, m) must go one at a time.
    if method == "minmax":
        chunk = max(d for d in range(1, max_intermediate_outputs + 1) if calibration.count % d == 0)
    else:
        chunk = 1
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    vnni = has_vnni()
    with tempfile.TemporaryDirectory(prefix="qcexport-calib-") as tmp:
        quantize_static(
            src, dst, Reader(),
            use_external_data_format=external,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            reduce_range=not vnni,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method=calibrate,
            calibration_cache_path=Path(tmp) / "calibration.cache",
            extra_options={"CalibStridedMinMax": chunk, "CalibPercentile": 99.99},
        )
    return QuantizeSettings("int8-static", list(QUANTIZED_OPS), "int8 per-channel", "uint8",
                            not vnni, True, method, chunk, list(exclude),
                            vnni, "QDQ; If branches are not entered by ORT's static quantizer")


def convert_fp16(model: onnx.ModelProto, exclude: Sequence[str]) -> tuple[onnx.ModelProto, QuantizeSettings]:
    from onnxruntime.transformers import float16

    half = float16.convert_float_to_float16(model, keep_io_types=True,
                                            node_block_list=list(exclude) or None)
    for graph in all_graphs(half.graph):
        topological_sort(graph)
    check_model(half)
    return half, QuantizeSettings("fp16", excluded_nodes=list(exclude),
                                  reason="weights and activations fp16; inputs and outputs fp32")


def topological_sort(graph: onnx.GraphProto) -> None:
    """Sort ``graph.node`` so every node comes after the producers of its inputs.

    Names produced outside this graph (inputs, initializers, outer-scope values used by a
    branch) count as available from the start.
    """
    produced_by = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    order, state = [], [0] * len(graph.node)  # 0 new, 1 visiting, 2 done

    def needs(node) -> list[str]:
        names = [i for i in node.input if i]
        for sub in subgraphs(node):  # a branch may read values of this graph
            for g in all_graphs(sub):
                names += [i for n in g.node for i in n.input if i]
        return names

    def visit(i: int) -> None:
        stack = [(i, iter(needs(graph.node[i])))]
        state[i] = 1
        while stack:
            idx, it = stack[-1]
            for name in it:
                j = produced_by.get(name)
                if j is not None and state[j] == 0:
                    state[j] = 1
                    stack.append((j, iter(needs(graph.node[j]))))
                    break
            else:
                stack.pop()
                state[idx] = 2
                order.append(graph.node[idx])

    for i in range(len(graph.node)):
        if state[i] == 0:
            visit(i)
    sorted_nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for n in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)


@dataclass
class LossRecord:
    """Accuracy loss of one output of the reduced model against the fp32 model, as the
    manifest records it (a view of a parity ``Record``)."""

    case: str
    output: str
    max_abs: float
    mean_abs: float
    cosine: float
    tolerance: str
    passed: bool
    reason: str = ""

    @classmethod
    def of(cls, record: Record) -> LossRecord:
        m = record.metrics
        return cls(record.case, record.output or "", _f(m.max_abs if m else None),
                   _f(m.mean_abs if m else None), _f(m.cosine if m else None),
                   record.tolerance.describe() if record.tolerance else "",
                   record.verdict == "pass", record.message)


#: Where the reduced model is measured against the fp32 one: the first of these that computes
#: its precision (bf16 and OpenVINO IR only on OpenVINO CPU).
MEASURE_TARGETS = ("ort-cpu", "openvino-cpu")
MEASURE_TARGET = MEASURE_TARGETS[0]


def measure_target(precision: str) -> str:
    return next(t for t in MEASURE_TARGETS
                if not get_target(t).incompatibility(precision=precision))


def accuracy_loss(fp32_path: Path, reduced_path: Path, precision: str,
                  feeds: Sequence[tuple[str, Mapping[str, np.ndarray]]],
                  policy: TolerancePolicy | None = None) -> list[LossRecord]:
    """Run both models on the measure target, each pinned to its declared precision (the
    fp32 one to fp32), and compare every output under the policy (qcrun's built-in one
    unless the user named a file)."""
    policy = policy or TolerancePolicy()
    records: list[Record] = []
    target = measure_target(precision)
    with open_adapter(fp32_path, target, precision="fp32") as ref, \
            open_adapter(reduced_path, target, precision=precision) as low:
        for case, feed in feeds:
            records += compare_outputs(
                target, case, low.run(feed), ref.run(feed),
                lambda name: policy.resolve(precision, target, name))
    return [LossRecord.of(r) for r in records]


def _f(value) -> float:
    return float("nan") if value is None else float(value)


def load_checked(path: Path, *, stage: str) -> onnx.ModelProto:
    """The ONNX model at ``path``, or a UserError when it is truncated, corrupt or invalid."""
    try:
        # from the file: the checker also proves the external data files are there, and a
        # model over the protobuf limit is never serialised whole
        onnx.checker.check_model(str(path))
        model = onnx.load(path)
    except (DecodeError, OSError, ValueError, onnx.checker.ValidationError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {first})",
                        stage=stage, hint="the file is truncated or damaged: export it again "
                        "with `qcexport convert`") from exc
    return model


def quantize_file(
    src: Path, dst: Path, precision: str, *,
    calibration: Calibration | None = None,
    method: str = "minmax",
    exclude_nodes: Sequence[str] = (),
    exclude_modules: Sequence[str] = (),
) -> QuantizeSettings:
    """Write the ``precision`` version of the fp32 model at ``src`` to ``dst``; its external
    data (``src``'s is read in place) is written beside ``dst`` when it is large."""
    if precision not in PRECISIONS or precision == "fp32" or precision in OTHER_QUANTIZERS:
        raise unknown_choice("precision", precision, PRECISIONS[1:], flag="--precision")
    model = load_checked(src, stage="quantize")
    already = reduced_precision_of(model)
    if already:
        raise UserError(f"{src} is already reduced precision: {already}", stage="quantize",
                        hint="quantize the fp32 model (the output of `qcexport convert` without "
                        "--precision)")
    exclude = resolve_exclusions(model, exclude_nodes, exclude_modules)
    # ORT's quantizers first split a Gemm into MatMul + Add named "<gemm>_MatMul" and then
    # match nodes_to_exclude against the new name: exclude both, or the Gemm gets quantized.
    ops = {n.name: n.op_type for g in all_graphs(model.graph) for n in g.node}
    quantizer_names = [*exclude, *(f"{n}_MatMul" for n in exclude if ops.get(n) == "Gemm")]
    if precision == "int8-static" and (calibration is None or not calibration.feeds):
        raise UserError("int8-static needs calibration data", stage="calibrate",
                        hint="pass --calibration FILE.npz or --calibration-cases N")
    # ORT's quantizers serialise their result whole unless told to write external data
    external = save.is_large(model)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".qcexport-quantize-") as tmp:
        work = Path(tmp) / dst.name  # the quantizer's own files (data included) stay in here
        with _quiet_quantizer():
            if precision == "int8-dynamic":
                settings = quantize_dynamic_int8(src, work, quantizer_names, external)
            elif precision == "int8-static":
                settings = quantize_static_int8(src, work, calibration, method, quantizer_names,
                                                external=external)
            elif precision == "bf16":  # the graph stays fp32: the engine is told to use bf16
                _write_work(model, work)
                settings = QuantizeSettings("bf16", excluded_nodes=list(exclude), reason=(
                    "the fp32 graph, computed in bf16 by OpenVINO CPU (INFERENCE_PRECISION_HINT "
                    "bf16, read back at load); weights stored fp32"))
            else:
                half, settings = convert_fp16(model, exclude)
                _write_work(half, work)
                del half
        del model
        reduced = onnx.load(work)
    settings.excluded_nodes = list(exclude)
    guard_qattention(reduced)
    # The quantizers can leave an If before the producer of a value its branch reads (ORT
    # sorts on load; onnx's reference evaluator and the checker do not).
    for graph in all_graphs(reduced.graph):
        topological_sort(graph)
    check_model(reduced)
    _write_work(reduced, dst)
    if precision not in ("fp16", "bf16"):
        settings.counts = matmul_counts(reduced)
    return settings


def _write_work(model: onnx.ModelProto, path: Path) -> None:
    """A working file of the quantizer (the output directory is written from it later):
    plain, with its weights in ``<name>.data`` beside it when they are large."""
    large = save.is_large(model)
    onnx.save_model(model, path, save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")


@contextlib.contextmanager
def _quiet_quantizer():
    """The ORT quantizer logs advice on the root logger and prints progress to stdout; the CLI
    reports what matters itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def guard_qattention(model: onnx.ModelProto) -> None:
    """The quantizer must never turn the standard Attention into com.microsoft.QAttention."""
    ops = count_ops(model)
    if ops.get("com.microsoft::QAttention"):
        raise RuntimeError("quantizer produced com.microsoft.QAttention: op_types_to_quantize "
                           "must be MatMul/Gemm only")


def matmul_counts(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """How many matrix products are quantized and how many stay float, top level vs branches."""
    counts = {"quantized": {"top": 0, "branches": 0}, "float": {"top": 0, "branches": 0}}
    for graph, owners in walk_graphs(model.graph):
        where = "branches" if owners else "top"
        producer = {o: n.op_type for n in graph.node for o in n.output}
        for node in graph.node:
            fed_by_dq = any(producer.get(i) == "DequantizeLinear" for i in node.input[1:2])
            if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") or (
                    node.op_type in QUANTIZED_OPS and fed_by_dq):
                counts["quantized"][where] += 1
            elif node.op_type in QUANTIZED_OPS:
                counts["float"][where] += 1
    return counts

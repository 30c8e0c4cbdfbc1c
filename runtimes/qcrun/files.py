"""Atomic file writes, shared by qcrun and qcexport.

A file is written under a temporary name beside its destination, flushed to disk, given the
usual permissions (0644 less the umask; ``mkstemp`` would leave 0600) and renamed over the
destination, so a reader never sees half a file and a crash or Ctrl-C leaves the old one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from qcrun.choices import ATTENTION_FORMS, PRECISIONS, stored_precision
from qcrun.errors import UserError
from qcrun.golden import file_sha256, weights_sha256
from qcrun.onnxfile import GraphSummary, read_summary
from qcrun.schema import check_relpath, dump, inside, parse, read_json


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(path: str | os.PathLike) -> None:
    """Outputs are for sharing: 0666 less the umask, whatever created the file (``mkstemp``
    and some libraries make 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_write(path: str | os.PathLike, data: bytes | bytearray) -> None:
    """Write the new file ``path`` (a temporary, or a file in a staging directory), flush it
    to disk and share it. Every atomic write of qcrun and qcexport puts its bytes down here:
    tests replace this one function to simulate a full disk or Ctrl-C half-way through."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    share(path)


def write_temp(path: str | os.PathLike, data: bytes | bytearray) -> Path:
    """Write ``data`` to a temporary sibling of ``path``; the caller renames it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fsync_write(tmp, data)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | str) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path, data.encode() if isinstance(data, str) else data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"


# --- the model directory: manifest.json + model.onnx, typed and checked ----------------------

Precision = Literal[PRECISIONS]


@dataclass(frozen=True)
class ValueRange:
    """The values an integer input may hold, both ends included (token ids in [0, vocab-1],
    a query count in [1, M], a 0/1 mask): outside it the model computes garbage (a Gather
    wraps around) where PyTorch raises."""

    min: int
    max: int

    def __post_init__(self):
        if self.min > self.max:
            raise UserError(f"value range [{self.min}, {self.max}] is empty", stage="manifest")


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, numpy dtype name and shape (ints, or the names of
    symbolic axes; None where the exporter left a dimension unnamed)."""

    name: str
    dtype: str
    shape: list[int | str | None]
    range: ValueRange | None = None


@dataclass(frozen=True)
class FusedAttention:
    """The fused attention nodes the export expected (one per SDPA call) and found."""

    form: str
    expected: int
    found: int
    sdpa_calls: int | None = None  # captured from the module (0: its own matmul/softmax)


@dataclass(frozen=True)
class ExportCheck:
    """One output of one check of the exported graph against PyTorch eager, run by
    ``qcexport convert`` (a record of what happened then; no verdict of qcrun reads it)."""

    case: str
    output: str
    shape: list[int]
    max_abs: float
    cosine: float
    tolerance: str
    passed: bool
    message: str = ""


@dataclass(frozen=True)
class SourceModel:
    """The fp32 model a reduced-precision one was made from (recorded, never opened)."""

    path: str
    sha256: str


@dataclass(frozen=True)
class IrFiles:
    """OpenVINO IR of the model (``qcexport ir``): ``model.xml`` + ``model.bin`` beside
    ``model.onnx``, or instead of it when the manifest's ``model`` is the .xml (IR-only, e.g.
    an NNCF model). Both files are hashed and checked like model.onnx."""

    xml: str
    xml_sha256: str
    bin: str
    bin_sha256: str
    # the model.onnx it was converted from (None: IR-only); checked against model_sha256
    source_sha256: str | None = None
    openvino: str | None = None


@dataclass(frozen=True)
class SplitCut:
    """How ``qcexport convert --split context`` cut the model in two: the context graph (what
    depends only on ``context_inputs``: run once per image) and the query graph (the other
    inputs, plus the ``boundary`` tensors the context graph hands over). Both files are hashed
    like the model, and their inputs and outputs are checked against this record."""

    context_inputs: list[str]
    context_model: str
    context_sha256: str
    query_model: str
    query_sha256: str
    boundary: list[TensorSpec]
    # boundary tensor -> {axis: symbolic name}: the axes that vary with the inputs' sizes
    dynamic_axes: dict[str, dict[str, str]] = field(default_factory=dict)
    # Boundary tensors that are the default of an optional input of the model (Perceiver IO's
    # output queries): ``query`` takes a value of that name in place of the context's.
    query_defaults: list[str] = field(default_factory=list)

    def query_specs(self, inputs: list[TensorSpec]) -> list[TensorSpec]:
        """The query graph's inputs: the model's inputs that are not context, then the
        boundary."""
        return [s for s in inputs if s.name not in self.context_inputs] + list(self.boundary)


@dataclass(frozen=True)
class ModelManifest:
    """``manifest.json`` of a model directory, as ``qcexport convert`` / ``quantize`` and
    ``qcexport bundle`` write it.

    ``precision`` must agree with the graph and ``model_sha256`` / ``files_sha256`` with the
    files: both are checked by :func:`read_model_dir`. ``tolerances`` is what an older bundle
    recorded; no verdict reads it (the policy is qcrun's or one the user names).
    """

    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    VERSION_KEY: ClassVar[str] = "format"

    format: int
    precision: Precision
    model: str
    model_sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    target: str | None = None
    attention: str | None = None
    opset: int | None = None
    mechanism: str | None = None
    preset: str | None = None
    config: dict[str, Any] | None = None
    factory: str | None = None
    attention_maps: dict[str, Any] | None = None
    weights_sha256: str | None = None
    dynamic_axes: dict[str, dict[str, str]] = field(default_factory=dict)
    # How the module's structured outputs map to graph outputs (names are pytree paths), the
    # non-tensor arguments fixed at export, and axes exported at another size than the example.
    output_structure: dict[str, Any] | None = None
    constants: dict[str, Any] | None = None
    export_sizes: dict[str, int] | None = None
    fused_attention: FusedAttention | None = None
    verification: list[ExportCheck] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    files_sha256: dict[str, str] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    accuracy_loss: list[dict[str, Any]] | None = None
    source_model: SourceModel | None = None
    golden: str | None = None
    tolerances: dict[str, Any] | None = None
    profile_shapes: dict[str, list[int]] | None = None
    # role -> the symbolic axis in it ({"batch": "batch", "tokens": "tokens"}): the mechanism
    # spec's axis roles, so that generic code (``--batch``, ``--tokens``) finds an axis by its
    # role, never by its name. None for a user's module, whose axes have no known roles.
    roles: dict[str, str] | None = None
    # Where a user's module came from beyond a factory (a Hugging Face component: its
    # path or hub id, component, classes and transformers version).
    source: dict[str, Any] | None = None
    # OpenVINO IR beside model.onnx, or instead of it (``model`` is then the .xml)
    ir: IrFiles | None = None
    # The context/query split (``--split context``); None for a model used whole.
    split: SplitCut | None = None

    def input_specs(self) -> list[dict[str, Any]]:
        """The input specs in their JSON form, for the functions that take plain specs
        (synthetic feeds, sweeps)."""
        return [dump(s) for s in self.inputs]

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    @property
    def builtin(self) -> bool:
        """Whether the model is a registered mechanism (not a user's module)."""
        return self.mechanism not in (None, "custom")


@dataclass(frozen=True)
class ModelDir:
    """A checked model directory: its manifest, the model file and every file it reads."""

    path: Path
    manifest: ModelManifest
    model: Path
    files: tuple[Path, ...]
    graph: GraphSummary
    ir: Path | None = None  # the OpenVINO IR's .xml, when the directory holds IR

    @property
    def precision(self) -> str:
        return self.manifest.precision

    @property
    def onnx(self) -> Path | None:
        """model.onnx, or None for an IR-only directory."""
        return None if self.model == self.ir else self.model

    def model_files(self):
        """The model's files by format (``qcrun.ir.ModelFiles``): each target reads the one
        its engine prefers (OpenVINO: IR), and an IR-only model is refused where no engine
        reads IR."""
        from qcrun.ir import ModelFiles

        return ModelFiles(self.onnx, self.ir, f"model directory {self.path}")

    @property
    def attention(self) -> str:
        """The attention form of the graph (the manifest's, checked; "decomposed" when the
        graph has no fused attention node, whatever form the export asked for). IR-only:
        the manifest's (the IR keeps no ONNX op domains to check it against)."""
        if self.onnx is None:
            return self.manifest.attention or "decomposed"
        return self.graph.attention

    @property
    def opset(self) -> int | None:
        return self.graph.opset

    def check_weights(self, golden) -> None:
        """Refuse a golden set made from other weights than the model (their state-dict hashes
        differ): the comparison would fail for the wrong reason, or pass by accident. The
        same for a user's module whose golden outputs were computed with other non-tensor
        arguments than the graph fixes (``constants`` of both manifests)."""
        recorded = golden.manifest.constants
        if recorded is not None and recorded != (self.manifest.constants or {}):
            raise UserError(
                f"golden set {golden.path} was computed with the non-tensor arguments "
                f"{recorded}, but the model in {self.path} fixes {self.manifest.constants or {}}",
                stage="golden",
                hint="write the golden set with the arguments the model was converted with")
        if self.manifest.weights_sha256 is None or golden.weights_path is None:
            return
        actual = weights_sha256(golden.weights_path)
        if actual != self.manifest.weights_sha256:
            raise UserError(
                f"golden set {golden.path} holds other weights than the model in {self.path} "
                f"(golden weights {actual}, the model was exported from weights "
                f"{self.manifest.weights_sha256})", stage="golden",
                hint="pass --golden with the golden set of these weights, or re-export the "
                "model from the golden set's weights")

    def golden_dir(self) -> Path | None:
        """The golden set the manifest names (inside the directory), else ``golden/`` when
        there is one."""
        if self.manifest.golden is not None:
            return inside(self.path, self.manifest.golden, where=str(self.path / MANIFEST_FILE),
                          field="golden")
        default = self.path / "golden"
        return default if (default / MANIFEST_FILE).is_file() else None


def parse_model_manifest(data: object, *, where: str, stage: str = "manifest") -> ModelManifest:
    """A model manifest from parsed JSON, checked (types, keys, version, paths)."""
    manifest = parse(ModelManifest, data, where=where, stage=stage)
    check_relpath(manifest.model, where=where, field="model", stage=stage)
    for name in manifest.files or ():
        check_relpath(name, where=where, field="files entry", stage=stage)
    if manifest.golden is not None:
        check_relpath(manifest.golden, where=where, field="golden", stage=stage)
    if manifest.split is not None:
        for name, what in ((manifest.split.context_model, "split.context_model"),
                           (manifest.split.query_model, "split.query_model")):
            check_relpath(name, where=where, field=what, stage=stage)
    return manifest


def manifest_json(manifest: ModelManifest | dict) -> str:
    """The one serialisation of a model manifest (a dict is validated through the schema
    first, so nothing is written that :func:`read_model_dir` would refuse)."""
    import json

    if isinstance(manifest, dict):
        manifest = parse_model_manifest(manifest, where="the manifest being written",
                                        stage="save")
    return json.dumps(dump(manifest), indent=2) + "\n"


def read_model_dir(model_dir: str | os.PathLike, *, stage: str | None = None,
                   required: tuple[str, ...] = ()) -> ModelDir:
    """The checked model directory at ``model_dir``, or a UserError naming what is wrong.

    Checked before anything runs: the manifest's types, keys and version; that every path it
    names stays inside the directory; ``model_sha256`` and the hash of every other file it
    lists; that the precision it claims is the graph's; that the weights hash in the model's
    metadata is the manifest's. ``required``: optional manifest fields that must be set.
    """
    stage = stage or "manifest"
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{model_dir} is not an exported model directory (it needs "
                        f"{MODEL_FILE} and {MANIFEST_FILE})", stage=stage,
                        hint="pass the output directory of `qcexport convert`")
    data = read_json(path, what="model manifest", stage=stage)
    return check_model_dir(model_dir, data, where=f"model manifest {path}", stage=stage,
                           required=required)


def check_model_dir(model_dir: Path, data: object, *, where: str, stage: str = "manifest",
                    required: tuple[str, ...] = ()) -> ModelDir:
    """:func:`read_model_dir` for a manifest already read (``data``, e.g. from a bundle whose
    files were checked): the same checks of types, paths, hashes, precision and weights."""
    model_dir = Path(model_dir)
    manifest = parse_model_manifest(data, where=where, stage=stage)
    missing = [k for k in required if getattr(manifest, k) is None]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)}", stage=stage,
                        hint="re-export the model with `qcexport convert`")
    model = inside(model_dir, manifest.model, where=where, field="model", stage=stage)
    redo = "re-export the model with `qcexport convert` (or restore the directory)"
    if not model.is_file():
        raise UserError(f"{model_dir / manifest.model} does not exist", stage=stage, hint=redo)
    _check_sha(model, manifest.model_sha256, where, stage)
    ir = _check_ir(model_dir, manifest, where, stage)
    if ir is not None and manifest.model == manifest.ir.xml:
        return _ir_only(model_dir, manifest, ir, where, stage)
    graph = read_summary(model, stage=stage)

    listed = [n for n in (manifest.files or [manifest.model]) if n != manifest.model]
    for name in sorted(set(listed) | graph.external_files):
        if name not in manifest.files_sha256:
            raise UserError(f"{where}: the model reads {name}, which has no sha256 in "
                            "files_sha256", stage=stage, hint=redo)
    files = [model]
    for name, sha in manifest.files_sha256.items():
        file = inside(model_dir, name, where=where, field=f"files_sha256[{name!r}]", stage=stage)
        if not file.is_file():
            raise UserError(f"{model_dir / name} does not exist", stage=stage, hint=redo)
        _check_sha(file, sha, where, stage)
        files.append(file)

    if graph.precision != stored_precision(manifest.precision):  # bf16 stores an fp32 graph
        raise UserError(
            f"{where} says precision {manifest.precision}, but the graph of {model.name} is "
            f"{graph.precision} (read from its ops and weights)", stage=stage,
            hint="the manifest does not belong to this model; " + redo)
    recorded = graph.metadata.get("qcexport.weights_sha256")
    if manifest.weights_sha256 is not None and recorded is not None \
            and recorded != manifest.weights_sha256:
        raise UserError(
            f"{where} records weights_sha256 {manifest.weights_sha256}, but {model.name} was "
            f"exported from weights {recorded}", stage=stage,
            hint="the manifest does not belong to this model; " + redo)
    check_against_graph(manifest, graph, where=f"{where} (of {model.name})")
    if ir is not None:
        files.append(ir)
    if manifest.split is not None:
        files += check_split(model_dir, manifest, where=where, stage=stage)
    return ModelDir(model_dir, manifest, model, tuple(files), graph, ir)


def _check_ir(model_dir: Path, manifest: ModelManifest, where: str, stage: str) -> Path | None:
    """The IR's .xml, its two files checked (inside the directory, hashes, the precision it
    stores is the declared one, converted from this model.onnx); None without IR."""
    ir = manifest.ir
    if ir is None:
        return None
    from qcrun.ir import IR_COMMAND, expected_ir_precision, ir_precision

    redo = f"write the IR again with `{IR_COMMAND}` (or restore the directory)"
    paths = []
    for name, sha, what in ((ir.xml, ir.xml_sha256, "ir.xml"), (ir.bin, ir.bin_sha256, "ir.bin")):
        check_relpath(name, where=where, field=what, stage=stage)
        path = inside(model_dir, name, where=where, field=what, stage=stage)
        if not path.is_file():
            raise UserError(f"{path} does not exist", stage=stage, hint=redo)
        _check_sha(path, sha, where, stage)
        paths.append(path)
    if manifest.model != ir.xml and ir.source_sha256 != manifest.model_sha256:
        raise UserError(f"{where}: the IR {ir.xml} was converted from a model.onnx of sha256 "
                        f"{ir.source_sha256}, not this one ({manifest.model_sha256})",
                        stage=stage, hint=redo)
    stored, wanted = ir_precision(paths[0]), expected_ir_precision(manifest.precision)
    if stored != wanted:
        raise UserError(f"{where} says precision {manifest.precision}, but the IR {ir.xml} "
                        f"stores {stored} (read from its layers)", stage=stage,
                        hint="write fp32 IR with compress_to_fp16=False; " + redo)
    return paths[0]


def _ir_only(model_dir: Path, manifest: ModelManifest, xml: Path, where: str,
             stage: str) -> ModelDir:
    """A directory whose model is OpenVINO IR only: hashes and the IR's precision are checked
    (``_check_ir``); the inputs and outputs are the manifest's, checked by the engine at load
    (``qcrun.load`` compares them with the compiled model's)."""
    from qcrun.onnxfile import ValueSpec

    files = [xml, inside(model_dir, manifest.ir.bin, where=where, field="ir.bin", stage=stage)]
    for name, sha in manifest.files_sha256.items():
        file = inside(model_dir, name, where=where, field=f"files_sha256[{name!r}]", stage=stage)
        if not file.is_file():
            raise UserError(f"{model_dir / name} does not exist", stage=stage,
                            hint="restore the directory")
        _check_sha(file, sha, where, stage)
        files.append(file)
    graph = GraphSummary(
        opsets={"": manifest.opset} if manifest.opset else {},
        inputs=[ValueSpec(s.name, s.dtype, tuple(s.shape)) for s in manifest.inputs],
        outputs=[ValueSpec(s.name, s.dtype, tuple(s.shape)) for s in manifest.outputs])
    return ModelDir(model_dir, manifest, xml, tuple(dict.fromkeys(files)), graph, xml)


# --- the manifest's own content, checked against the graph -----------------------------------
#
# No hash covers manifest.json (it holds the model's hash), so whatever in it can change a run
# or a verdict is checked against the graph, which model_sha256 covers: a manifest edited by
# hand, damaged or copied from another model is refused here, naming the field.

_GRAPH_FIELDS = ("attention", "opset")  # recorded in the metadata too; the graph itself decides


def _disagree(where: str, what: str, says: object, graph: str) -> UserError:
    return UserError(
        f"{where}: {what} says {says}, but the graph has {graph}", stage="manifest",
        hint="the manifest does not match its model (edited or damaged): re-export the model "
             "with `qcexport convert` (or restore the directory)")


def _shape_text(shape) -> str:
    return "[" + ", ".join("?" if d is None else repr(d) if isinstance(d, str) else str(d)
                           for d in shape) + "]"


def _check_values(kind: str, specs: list[TensorSpec], values, where: str) -> None:
    names = [s.name for s in specs]
    actual = [v.name for v in values]
    if names != actual:
        raise _disagree(where, kind, names, f"{kind} {actual} (names and order must match)")
    for i, (spec, value) in enumerate(zip(specs, values, strict=True)):
        what = f"{kind}[{i}] ({spec.name!r})"
        if spec.dtype != value.dtype:
            raise _disagree(where, f"{what} dtype", spec.dtype, f"dtype {value.dtype}")
        graph_shape = list(value.shape or ())
        if list(spec.shape) != graph_shape or any(
                type(a) is not type(b) for a, b in zip(spec.shape, graph_shape, strict=True)):
            raise _disagree(
                where, f"{what} shape", _shape_text(spec.shape),
                f"shape {_shape_text(graph_shape)} (ints are fixed dimensions, names symbolic "
                "ones)")


def _check_dynamic_axes(manifest: ModelManifest, graph: GraphSummary, where: str) -> None:
    shapes = {v.name: list(v.shape or ()) for v in (*graph.inputs, *graph.outputs)}
    # An output axis whose size depends on an input's values (e.g. m queries) gets a name of
    # the exporter's ("u0"), not the spec's label; an input axis always has the label.
    named = {d for v in graph.inputs for d in v.shape or () if isinstance(d, str)}
    for name, axes in manifest.dynamic_axes.items():
        if name not in shapes:
            raise _disagree(where, "dynamic_axes", f"an entry {name!r}",
                            f"no input or output of that name (it has {', '.join(shapes)})")
        shape = shapes[name]
        for axis, label in axes.items():
            what = f"dynamic_axes[{name!r}][{axis!r}]"
            if not axis.isdecimal() or int(axis) >= len(shape):
                raise _disagree(where, what, repr(label),
                                f"no axis {axis!r} in {name!r} (rank {len(shape)})")
            dim = shape[int(axis)]
            exporters = isinstance(dim, str) and dim not in named and label not in named
            if not isinstance(dim, str) or (dim != label and not exporters):
                seen = f"symbolic axis {dim!r}" if isinstance(dim, str) else (
                    f"fixed size {dim}" if dim is not None else "an unnamed axis")
                raise _disagree(where, what, repr(label), f"{seen} there")


def _check_attention(manifest: ModelManifest, graph: GraphSummary, where: str) -> None:
    fused = graph.fused_attention()
    found = ", ".join(f"{n} {form!r}" for form, n in fused.items()) or "no fused attention node"
    form = manifest.attention
    if graph.attention == "mixed":
        raise UserError(f"{where}: the graph mixes fused attention forms ({found})",
                        stage="manifest", hint="re-export the model with `qcexport convert`")
    if form is not None:
        if form not in ATTENTION_FORMS:
            raise _disagree(where, "attention", repr(form),
                            f"{found} (forms: {', '.join(ATTENTION_FORMS)})")
        # A module without scaled_dot_product_attention exports decomposed under any form.
        if fused and form != graph.attention:
            raise _disagree(where, "attention", repr(form), found)
    record = manifest.fused_attention
    if record is not None:
        count = fused.get(record.form, 0)
        if record.form != (form or record.form) or record.found != count:
            raise _disagree(where, "fused_attention",
                            f"{record.found} {record.form!r} node(s)", found)


def _check_metadata(manifest: ModelManifest, graph: GraphSummary, where: str) -> None:
    """What the exporter also wrote into the model's metadata (``qcexport.<field>``) must be
    the manifest's: mechanism, preset, config, factory, weights hash, versions."""
    import json

    fields = {f for f in ModelManifest.__dataclass_fields__ if f not in _GRAPH_FIELDS}
    for key, text in sorted(graph.metadata.items()):
        name = key.removeprefix("qcexport.")
        if name == key:
            continue
        if name in fields:
            value = getattr(manifest, name)
        elif name in manifest.versions:  # qcexport.torch, qcexport.onnx
            value, name = manifest.versions[name], f"versions[{name!r}]"
        else:
            continue
        if isinstance(value, str) or value is None:
            same = value == text
        else:
            try:
                same = json.loads(text) == value
            except ValueError:
                same = False
        if not same:
            raise _disagree(where, name, json.dumps(value), f"{text} in its metadata ({key})")


def _check_names(manifest: ModelManifest, graph: GraphSummary, where: str) -> None:
    """The names the manifest uses must be the graph's: axes it sizes (TensorRT profiles,
    export sizes), outputs its export checks and output structure list, the values the
    attention maps are read from."""
    symbolic = {d for v in graph.inputs for d in v.shape or () if isinstance(d, str)}
    for what, names in (("profile_shapes", manifest.profile_shapes or {}),
                         ("export_sizes", manifest.export_sizes or {})):
        for name in names:
            if name not in symbolic:
                raise _disagree(where, f"{what}[{name!r}]", "a symbolic axis",
                                f"the symbolic input axes {sorted(symbolic)}")
    outputs = {v.name: list(v.shape or ()) for v in graph.outputs}
    for i, check in enumerate(manifest.verification):
        what = f"verification[{i}]"
        shape = outputs.get(check.output)
        if shape is None:
            raise _disagree(where, f"{what}.output", repr(check.output),
                            f"outputs {list(outputs)}")
        if len(check.shape) != len(shape) or any(
                isinstance(d, int) and d != n for d, n in zip(shape, check.shape, strict=True)):
            raise _disagree(where, f"{what}.shape", check.shape,
                            f"{check.output!r} of shape {_shape_text(shape)}")
        if not check.passed:
            raise UserError(f"{where}: {what} records a failed export check of "
                            f"{check.output!r}, which `qcexport convert` never writes",
                            stage="manifest", hint="re-export the model with `qcexport convert`")
    structure = manifest.output_structure or {}
    listed = structure.get("outputs")
    if isinstance(listed, list):
        names = [o.get("name") if isinstance(o, dict) else o for o in listed]
        if names != list(outputs):
            raise _disagree(where, "output_structure.outputs", names, f"outputs {list(outputs)}")
    # the values `inspect` reads the attention maps and the visual tokens from
    maps = manifest.attention_maps or {}
    inputs = [v.name for v in graph.inputs]
    named = [("attention_maps.visual_input", maps.get("visual_input"), inputs),
             ("attention_maps.query_output", maps.get("query_output"), list(outputs))]
    for i, entry in enumerate(maps.get("maps") or ()):
        if isinstance(entry, dict):
            named.append((f"attention_maps.maps[{i}].output", entry.get("output"),
                          list(outputs)))
    for what, name, values in named:
        if name is not None and name not in values:
            raise _disagree(where, what, repr(name), f"{', '.join(values)}")


def check_against_graph(manifest: ModelManifest, graph: GraphSummary, *, where: str) -> None:
    """Refuse a manifest whose description of the model is not the graph's: inputs and outputs
    (names, order, dtypes, fixed and symbolic dimensions), dynamic axes, opset, attention
    form, the fields the exporter also recorded in the model's metadata, and the axis names
    it sizes. A UserError (stage "manifest") names the field, what the manifest says and what
    the graph has."""
    _check_values("inputs", manifest.inputs, graph.inputs, where)
    _check_values("outputs", manifest.outputs, graph.outputs, where)
    _check_dynamic_axes(manifest, graph, where)
    for name, rows in sorted(graph.index_bounds().items()):
        allowed = manifest.input(name).range
        if allowed is None or allowed.min < 0 or allowed.max > rows - 1:
            says = "no range" if allowed is None else f"range [{allowed.min}, {allowed.max}]"
            raise _disagree(where, f"input {name!r}", says,
                            f"it indexing a table of {rows} rows (valid values [0, {rows - 1}]: "
                            "qcrun.load refuses others, where the Gather would wrap around)")
    if manifest.opset is not None and manifest.opset != graph.opset:
        raise _disagree(where, "opset", manifest.opset, f"opset import {graph.opset} "
                        "(ai.onnx)")
    _check_attention(manifest, graph, where)
    _check_metadata(manifest, graph, where)
    _check_names(manifest, graph, where)


def check_split(model_dir: Path, manifest: ModelManifest, *, where: str,
                stage: str = "manifest") -> list[Path]:
    """The split's two graphs, hashed and checked against the manifest: the context graph
    takes the context inputs and gives the boundary, the query graph takes the other inputs
    and the boundary and gives the model's outputs. A boundary edited in the manifest, or a
    graph from another cut, is refused here, before anything runs."""
    cut = manifest.split
    paths = []
    for name, sha, what in ((cut.context_model, cut.context_sha256, "split.context_model"),
                            (cut.query_model, cut.query_sha256, "split.query_model")):
        path = inside(model_dir, name, where=where, field=what, stage=stage)
        if not path.is_file():
            raise UserError(f"{model_dir / name} does not exist", stage=stage,
                            hint="re-export the model with `qcexport convert --split context`")
        _check_sha(path, sha, where, stage)
        paths.append(path)
    context, query = (read_summary(p, stage=stage) for p in paths)
    unknown = [n for n in cut.context_inputs if manifest.input(n) is None]
    if unknown:
        raise _disagree(where, "split.context_inputs", unknown,
                        f"inputs {[s.name for s in manifest.inputs]}")
    specs = [manifest.input(n) for n in cut.context_inputs]
    _check_values("split context inputs", specs, context.inputs, f"{where} (of {paths[0].name})")
    _check_values("split.boundary", cut.boundary, context.outputs,
                  f"{where} (of {paths[0].name})")
    _check_values("split query inputs", cut.query_specs(manifest.inputs), query.inputs,
                  f"{where} (of {paths[1].name})")
    _check_values("outputs", manifest.outputs, query.outputs, f"{where} (of {paths[1].name})")
    return paths


def _check_sha(path: Path, expected: str, where: str, stage: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise UserError(
            f"{path} has sha256 {actual}, but {where} records {expected}: the file was "
            "changed after export", stage=stage,
            hint="re-export the model with `qcexport convert` (or restore the file)")

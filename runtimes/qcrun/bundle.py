"""Bundles: one exported model carried to a device with everything needed to prove it there.

``qcexport bundle`` writes a bundle on the host; this module reads and verifies it on the
device (numpy only, no torch, no onnx). Layout of ``NAME.bundle/``::

    bundle.json     the bundle manifest: target, precision, attention form, opset, input and
                    output specs with their dynamic axes, TensorRT profile ranges, the tolerance
                    policy, provenance (mechanism, config, weights hash, versions, host parity
                    records), the sha256 and size of every other file, and its own sha256
    manifest.json   the model's manifest (as ``qcexport convert`` writes it, golden and
                    tolerances pointing into the bundle): a bundle directory is also a model
                    directory, so every command that reads one reads a bundle
    model.onnx      the model, in the attention form and opset the target accepts
    golden/         a subset of the golden set: manifest.json and one .npz per case

``NAME.bundle.tar.gz`` (``--archive``) holds the same tree under one top-level directory.

Nothing is trusted: ``verify_bundle`` re-hashes every file listed in ``bundle.json`` and the
manifest itself (its ``manifest_sha256`` is the sha256 of the file with that field zeroed), so
a missing, truncated or modified file, or an edited tolerance, is reported by name. Files not
listed are reported as extra and otherwise ignored (nothing in the bundle reads them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from qcrun.adapters import TensorInfo
from qcrun.errors import UserError
from qcrun.golden import file_sha256
from qcrun.parity import TolerancePolicy
from qcrun.targets import (
    Target,
    default_cache_dir,
    get_target,
    tensorrt_provider_options,
)

FORMAT = 1
KIND = "qcrun-bundle"
BUNDLE_MANIFEST = "bundle.json"
MODEL_MANIFEST = "manifest.json"
GOLDEN_DIR = "golden"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
DIGEST_KEY = "manifest_sha256"
_ZERO_DIGEST = "0" * 64
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ARCHIVE_TIME = 0  # reproducible archives: every member gets the same mtime


class BundleDamaged(UserError):
    """A bundle whose files do not match its manifest: missing, modified or unreadable."""


# --- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileProblem:
    """One file of a bundle that does not match ``bundle.json``."""

    path: str
    problem: str  # missing | modified | unreadable | unsafe-path
    detail: str = ""

    def describe(self) -> str:
        return f"{self.path}: {self.problem}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class BundleCheck:
    """The outcome of ``verify_bundle``: every problem found, and the files no one listed."""

    bundle: str
    problems: list[FileProblem] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "ok": self.ok,
            "checked": self.checked,
            "problems": [p.__dict__ for p in self.problems],
            "extra": list(self.extra),
        }


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` looks like a bundle: a directory with bundle.json, or a .tar.gz."""
    path = Path(path)
    if path.is_dir():
        return (path / BUNDLE_MANIFEST).is_file()
    return path.name.endswith(ARCHIVE_SUFFIXES)


class Bundle:
    """An opened bundle: its manifest and where its files are.

    ``open_bundle`` reads the manifest only; ``verify()`` hashes the files. An archive is
    extracted into a temporary directory that ``close()`` (or garbage collection, or the end of
    the process) removes; a bundle directory is used in place.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], source: Path,
                 cleanup: str | None = None):
        self.root = root
        self.manifest = manifest
        self.source = source
        self._finalizer = (
            weakref.finalize(self, shutil.rmtree, cleanup, ignore_errors=True) if cleanup else None
        )

    def __repr__(self) -> str:
        return f"Bundle({str(self.source)!r}, target={self.target!r})"

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the extracted copy of an archive (a bundle directory is left alone)."""
        if self._finalizer is not None:
            self._finalizer()

    # -- what it holds ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.source.name

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def attention(self) -> str:
        return self.manifest["attention"]

    @property
    def opset(self) -> int:
        return int(self.manifest["opset"])

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest["model"]

    @property
    def model_sha256(self) -> str:
        return self.manifest["files"][self.manifest["model"]]["sha256"]

    @property
    def golden_path(self) -> Path:
        return self.root / self.manifest.get("golden", GOLDEN_DIR)

    @property
    def model_manifest_path(self) -> Path:
        return self.root / MODEL_MANIFEST

    @property
    def inputs(self) -> list[TensorInfo]:
        return [_info(s) for s in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [_info(s) for s in self.manifest["outputs"]]

    @property
    def profile_shapes(self) -> dict[str, tuple[int, int, int]]:
        """TensorRT min/opt/max per symbolic axis, fixed when the bundle was built."""
        return {k: tuple(int(x) for x in v) for k, v in self.manifest["profile_shapes"].items()}

    @property
    def policy(self) -> TolerancePolicy:
        return TolerancePolicy.from_dict(self.manifest["tolerances"])

    @property
    def provenance(self) -> dict[str, Any]:
        return self.manifest.get("provenance", {})

    def input_shapes(self) -> dict[str, list[int | str | None]]:
        return {s["name"]: list(s["shape"]) for s in self.manifest["inputs"]}

    def describe(self) -> str:
        return (f"{self.name} ({self.manifest.get('mechanism') or 'model'}, {self.precision}, "
                f"attention {self.attention!r}, opset {self.opset}, made for {self.target})")

    # -- where it can run ---------------------------------------------------------------------

    def incompatibility(self, target: str | Target) -> str | None:
        """Why ``target`` cannot run this bundle's model, or None when it can."""
        t = get_target(target)
        problems = []
        if not t.accepts_attention(self.attention):
            problems.append(f"it does not read the {self.attention!r} attention form (it reads "
                            f"{', '.join(t.attention_forms)})")
        if self.opset > t.max_opset:
            problems.append(f"it reads opsets up to {t.max_opset}, the model is opset {self.opset}")
        if self.precision not in t.precisions:
            problems.append(f"it does not run {self.precision} models (it runs "
                            f"{', '.join(t.precisions)})")
        return "; ".join(problems) or None

    def require_compatible(self, target: str | Target) -> Target:
        """The target, or a UserError saying why this bundle was made for another one."""
        t = get_target(target)
        why = self.incompatibility(t)
        if why:
            raise UserError(
                f"bundle {self.source} was made for {self.target} ({self.precision}, attention "
                f"{self.attention!r}, opset {self.opset}); target {t.name} cannot run it: {why}",
                stage="bundle",
                hint=f"build a bundle for it on the host: `qcexport bundle MODEL_DIR --target "
                f"{t.name}`, or pass a --target that accepts this one",
            )
        return t

    # -- engine options -----------------------------------------------------------------------

    def cache_dir(self, target: str | Target, cache_root: str | Path | None = None) -> Path:
        """Where TensorRT engines and timings of this model go: one directory per target and
        model hash, inside ``cache_root`` (default $QCRUN_CACHE_DIR or ~/.cache/qcrun)."""
        t = get_target(target)
        return Path(cache_root or default_cache_dir()) / t.name / self.model_sha256[:16]

    def adapter_options(self, target: str | Target, cache_root: str | Path | None = None
                        ) -> dict[str, Any]:
        """Adapter options this bundle needs on ``target``: for TensorRT, the profile ranges
        fixed at build time and a cache directory of its own; nothing for other targets."""
        t = get_target(target)
        if not t.needs_profile_shapes:
            return {}
        return {"profile_shapes": self.profile_shapes,
                "cache_dir": str(self.cache_dir(t, cache_root))}

    def providers(self, target: str | Target, cache_root: str | Path | None = None) -> list:
        """The onnxruntime provider list the adapter builds for ``target``, computed from the
        bundle's specs alone (no engine needed): TensorRT options first, then CUDA and CPU."""
        t = get_target(target)
        if t.engine != "onnxruntime":
            raise UserError(f"target {t.name} runs on {t.engine}, which has no execution "
                            "providers", stage="bundle")
        providers: list = []
        for name in t.providers:
            if name == "TensorrtExecutionProvider":
                options = tensorrt_provider_options(
                    self.input_shapes(),
                    self.profile_shapes,
                    cache_dir=self.cache_dir(t, cache_root),
                    fp16=bool(t.options.get("trt_fp16", False)),
                    workspace_bytes=int(t.options.get("trt_workspace_bytes", 2 << 30)),
                    cache=bool(t.options.get("trt_cache", True)),
                )
                providers.append((name, options))
            else:
                providers.append(name)
        return providers

    def profile_problems(self, feed: Mapping[str, Any]) -> list[str]:
        """Dynamic axes of ``feed`` outside the TensorRT profile ranges of this bundle."""
        ranges = self.profile_shapes
        problems = []
        for name, shape in self.input_shapes().items():
            if name not in feed:
                continue
            sizes = getattr(feed[name], "shape", ())
            for dim, size in zip(shape, sizes, strict=False):
                if isinstance(dim, str) and dim in ranges:
                    low, _, high = ranges[dim]
                    if not low <= size <= high:
                        problems.append(f"input {name!r} axis {dim!r} is {size}, outside the "
                                        f"TensorRT profile {low}..{high} of this bundle")
        return problems

    # -- integrity ----------------------------------------------------------------------------

    def verify(self) -> BundleCheck:
        return _check_files(self.root, self.manifest, str(self.source))

    def require_intact(self) -> BundleCheck:
        """The check, or BundleDamaged naming every missing or modified file."""
        check = self.verify()
        if not check.ok:
            raise damaged(check)
        return check


def damaged(check: BundleCheck) -> BundleDamaged:
    listed = "; ".join(p.describe() for p in check.problems)
    return BundleDamaged(
        f"bundle {check.bundle} is damaged: {listed}",
        stage="bundle",
        hint="copy the bundle again from the host (or rebuild it with `qcexport bundle`); "
        "never edit a bundle's files",
    )


def _info(spec: Mapping[str, Any]) -> TensorInfo:
    shape = spec.get("shape")
    return TensorInfo(spec["name"], spec.get("dtype"), None if shape is None else tuple(shape))


def open_bundle(path: str | Path, *, extract_to: str | Path | None = None) -> Bundle:
    """Open a bundle directory or .tar.gz archive; reads and checks ``bundle.json`` itself.

    Files are not hashed here (``Bundle.verify``): an app that opened a bundle it verified
    before need not pay for hashing again. A bundle.json that does not match its own sha256
    is BundleDamaged at once, because everything else is judged by it.
    """
    source = Path(path)
    if not source.exists():
        raise UserError(f"bundle {source} does not exist", stage="bundle",
                        hint="pass a bundle directory or .tar.gz written by `qcexport bundle`")
    cleanup = None
    if source.is_dir():
        root = source
    elif source.name.endswith(ARCHIVE_SUFFIXES):
        target_dir = Path(extract_to) if extract_to else Path(
            tempfile.mkdtemp(prefix="qcrun-bundle-"))
        cleanup = None if extract_to else str(target_dir)
        try:
            root = _extract(source, target_dir)
        except BaseException:
            if cleanup:
                shutil.rmtree(cleanup, ignore_errors=True)
            raise
    else:
        raise UserError(f"{source} is neither a bundle directory nor a .tar.gz bundle archive",
                        stage="bundle",
                        hint="pass the NAME.bundle directory or NAME.bundle.tar.gz written by "
                        "`qcexport bundle`")
    try:
        manifest = read_manifest(root, str(source))
    except BaseException:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    return Bundle(root, manifest, source, cleanup)


def read_manifest(root: Path, label: str | None = None) -> dict[str, Any]:
    """``root/bundle.json``, parsed and checked against its own sha256."""
    label = label or str(root)
    path = root / BUNDLE_MANIFEST
    if not path.is_file():
        hint = ("it is a model directory: make a bundle of it with `qcexport bundle "
                f"{root} --target T`" if (root / MODEL_MANIFEST).is_file()
                else "pass a bundle written by `qcexport bundle`")
        raise UserError(f"{label} is not a bundle ({BUNDLE_MANIFEST} not found)", stage="bundle",
                        hint=hint)
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise damaged(BundleCheck(label, [FileProblem(BUNDLE_MANIFEST, "unreadable",
                                                      f"not valid JSON: {e}")])) from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise damaged(BundleCheck(label, [FileProblem(BUNDLE_MANIFEST, "unreadable",
                                                      f"not a {KIND} manifest")]))
    problem = _digest_problem(raw, manifest.get(DIGEST_KEY))
    if problem:
        raise damaged(BundleCheck(label, [FileProblem(BUNDLE_MANIFEST, "modified", problem)]))
    if manifest.get("format") != FORMAT:
        raise UserError(
            f"bundle {label} has format {manifest.get('format')!r}; this qcrun reads format "
            f"{FORMAT}",
            stage="bundle",
            hint="install the qcrun version that matches the qcexport that wrote the bundle",
        )
    missing = [k for k in ("target", "precision", "attention", "opset", "model", "inputs",
                           "outputs", "tolerances", "files", "profile_shapes") if k not in manifest]
    if missing:
        raise damaged(BundleCheck(label, [FileProblem(BUNDLE_MANIFEST, "unreadable",
                                                      f"lacks {', '.join(missing)}")]))
    if manifest["model"] not in manifest["files"]:
        raise damaged(BundleCheck(label, [FileProblem(
            BUNDLE_MANIFEST, "unreadable", f"does not list the model {manifest['model']}")]))
    return manifest


def verify_bundle(bundle: str | Path | Bundle) -> BundleCheck:
    """Re-hash every file of a bundle against ``bundle.json``: every problem, by file name.

    A bundle.json that does not match its own sha256 (or cannot be read) is one problem naming
    it; the files are then not judged (their hashes come from it). Never raises for damage:
    the caller decides (``Bundle.require_intact`` raises).
    """
    if isinstance(bundle, Bundle):
        return bundle.verify()
    try:
        opened = open_bundle(bundle)
    except BundleDamaged as e:
        return BundleCheck(str(bundle), [FileProblem(BUNDLE_MANIFEST, "modified", str(e))])
    with opened:
        return opened.verify()


def _digest_problem(raw: bytes, recorded: Any) -> str | None:
    if not isinstance(recorded, str) or not _HEX64.match(recorded):
        return f"its {DIGEST_KEY} is missing or not a sha256"
    needle = f'"{DIGEST_KEY}": "{recorded}"'.encode()
    if raw.count(needle) != 1:
        return f"its {DIGEST_KEY} field is not where the writer put it"
    actual = hashlib.sha256(raw.replace(needle, f'"{DIGEST_KEY}": "{_ZERO_DIGEST}"'.encode())
                            ).hexdigest()
    if actual != recorded:
        return f"sha256 {actual} but it records {recorded}"
    return None


def _safe_relative(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def _check_files(root: Path, manifest: Mapping[str, Any], label: str) -> BundleCheck:
    problems: list[FileProblem] = []
    files = manifest["files"]
    for name in sorted(files):
        entry = files[name]
        if not _safe_relative(name):
            problems.append(FileProblem(name, "unsafe-path", "not a relative path inside the "
                                        "bundle"))
            continue
        path = root / name
        if not path.is_file():
            problems.append(FileProblem(name, "missing"))
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(FileProblem(name, "modified",
                                        f"{size} bytes, bundle.json records {entry.get('bytes')}"))
            continue
        actual = file_sha256(path)
        if actual != entry.get("sha256"):
            problems.append(FileProblem(name, "modified", f"sha256 {actual}, bundle.json records "
                                        f"{entry.get('sha256')}"))
    listed = set(files) | {BUNDLE_MANIFEST}
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() not in listed)
    return BundleCheck(label, problems, extra, len(files) + 1)


# --- for commands that take a model directory ------------------------------------------------

_OPEN: list[Bundle] = []  # bundles opened for resolve_model live until the process ends


def resolve_model(path: str | Path, *, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """(model path, model manifest) of a bundle, for commands that read a model directory.

    The manifest is the bundle's ``manifest.json`` (mechanism, precision, input specs, dynamic
    axes, golden pointing into the bundle), with the bundle's target, tolerances and profile
    ranges. Files are verified first unless ``verify=False``: a command never measures a
    damaged model. An archive stays extracted until the process ends.
    """
    bundle = open_bundle(path)
    if verify:
        try:
            bundle.require_intact()
        except BaseException:
            bundle.close()
            raise
    _OPEN.append(bundle)
    try:
        manifest = json.loads(bundle.model_manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"bundle {path}: {MODEL_MANIFEST} cannot be read: {e}",
                        stage="bundle") from None
    manifest.update({
        "model": bundle.manifest["model"],
        "golden": bundle.manifest.get("golden", GOLDEN_DIR),
        "target": bundle.target,
        "tolerances": bundle.manifest["tolerances"],
        "profile_shapes": bundle.manifest["profile_shapes"],
        "bundle": str(bundle.source),
    })
    return bundle.model_path, manifest


# --- writing (used by qcexport bundle; the format lives in one place) ------------------------


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def write_manifest(root: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``root/bundle.json``: ``manifest`` plus the sha256 and size of every file under
    ``root`` and, last, the manifest's own sha256. Returns what was written."""
    root = Path(root)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name == BUNDLE_MANIFEST:
            continue
        files[name] = file_entry(path)
    data = {k: v for k, v in manifest.items() if k not in ("files", DIGEST_KEY)}
    data.update({"format": FORMAT, "kind": KIND, "files": files, DIGEST_KEY: _ZERO_DIGEST})
    text = json.dumps(data, indent=2) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    needle = f'"{DIGEST_KEY}": "{_ZERO_DIGEST}"'
    if text.count(needle) != 1:
        raise RuntimeError("bundle manifest digest placeholder is not unique")
    text = text.replace(needle, f'"{DIGEST_KEY}": "{digest}"')
    _write_atomic(root / BUNDLE_MANIFEST, text.encode())
    data[DIGEST_KEY] = digest
    return data


def pack_archive(directory: str | Path, archive: str | Path, arcname: str | None = None) -> Path:
    """Write ``directory`` as a reproducible .tar.gz, atomically (temporary name, rename).

    Members are sorted, owned by 0:0 with mode 644/755 and mtime 0, so the same bundle always
    gives the same archive bytes.
    """
    import gzip

    directory, archive = Path(directory), Path(archive)
    arcname = arcname or directory.name
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                   mtime=_ARCHIVE_TIME) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(directory, arcname=arcname, recursive=False, filter=_normalise)
            for path in sorted(directory.rglob("*")):
                rel = path.relative_to(directory).as_posix()
                tar.add(path, arcname=f"{arcname}/{rel}", recursive=False, filter=_normalise)
            raw.flush()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return archive


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = _ARCHIVE_TIME
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def _extract(archive: Path, into: Path) -> Path:
    """Extract a bundle archive safely (regular files and directories inside ``into`` only);
    returns the bundle root (the archive's single top-level directory, or ``into``)."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()) or not _safe_relative(m.name.rstrip("/")):
                    raise BundleDamaged(
                        f"bundle archive {archive} holds {m.name!r}, which is not a plain file "
                        "or directory inside the bundle; refusing to extract it",
                        stage="bundle", hint="rebuild the archive with `qcexport bundle --archive`")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:  # Python < 3.11.4: the members were checked above
                tar.extractall(into, members=members)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise BundleDamaged(
            f"bundle archive {archive} cannot be read as .tar.gz: {e}",
            stage="bundle",
            hint="the archive is truncated or damaged: copy it again from the host",
        ) from None
    if (into / BUNDLE_MANIFEST).is_file():
        return into
    tops = [p for p in into.iterdir()]
    if len(tops) == 1 and (tops[0] / BUNDLE_MANIFEST).is_file():
        return tops[0]
    raise UserError(f"bundle archive {archive} holds no {BUNDLE_MANIFEST}", stage="bundle",
                    hint="pass an archive written by `qcexport bundle --archive`")


def _write_atomic(path: Path, data: bytes) -> None:
    from qcrun.files import write_atomic

    write_atomic(path, data)


def spec_axes(specs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The symbolic axis names of input specs, in first-seen order."""
    axes: list[str] = []
    for spec in specs:
        for dim in spec.get("shape") or []:
            if isinstance(dim, str) and dim not in axes:
                axes.append(dim)
    return axes

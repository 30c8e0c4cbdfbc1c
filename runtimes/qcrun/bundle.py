"""Bundles: one exported model carried to a device with everything needed to prove it there.

``qcexport bundle`` writes a bundle on the host; this module reads and verifies it on the
device (numpy only, no torch, no onnx). Layout of ``NAME.bundle/``::

    bundle.json     the bundle manifest (``BundleManifest``): target, precision, attention
                    form, opset, input and output specs with their dynamic axes, TensorRT
                    profile ranges, the host's tolerance policy, provenance (mechanism, config,
                    weights hash, versions, host parity records), the sha256 and size of every
                    other file, and its own sha256
    bundle.sig      (signed bundles) an Ed25519 signature of bundle.json (``qcrun.signing``)
    manifest.json   the model's manifest (as ``qcexport convert`` writes it, golden and
                    tolerances pointing into the bundle): a bundle directory is also a model
                    directory, so every command that reads one reads a bundle
    model.onnx      the model, in the attention form and opset the target accepts
    golden/         a subset of the golden set: manifest.json and one .npz per case

``NAME.bundle.tar.gz`` (``--archive``) holds the same tree under one top-level directory,
``bundle.json`` first: extraction streams the members and checks each against it before
writing a byte (an unlisted, oversized, duplicated or non-regular member stops it), so an
archive can never unpack more than bundle.json lists.

Integrity: ``verify_bundle`` re-hashes every file listed in ``bundle.json`` and the manifest
itself (its ``manifest_sha256`` is the sha256 of the file with that field zeroed), so a
missing, truncated or modified file is reported by name. Files not listed are reported as
extra and otherwise ignored (nothing in the bundle reads them). No path in bundle.json may
leave the bundle (``qcrun.schema.inside``).

Authenticity: the self-digest only catches accidents (whoever edits bundle.json can recompute
it). ``Bundle.authenticate`` checks ``bundle.sig`` against trusted public keys, or pins
``manifest_sha256`` to a digest the user got from the host. What judges a run therefore never
comes from an unauthenticated bundle: ``Bundle.policy`` is qcrun's built-in tolerance policy,
and the host's policy recorded in the bundle is used only when a trusted key signed it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar, Literal

from qcrun import signing
from qcrun.engines import TensorInfo, engine_of
from qcrun.errors import UserError
from qcrun.files import TensorSpec
from qcrun.golden import file_sha256
from qcrun.onnxfile import read_summary
from qcrun.parity import TolerancePolicy, policy_for
from qcrun.schema import MAX_JSON_BYTES, check_relpath, inside, parse
from qcrun.targets import (
    Target,
    default_cache_dir,
    get_target,
)

FORMAT = 1
KIND = "qcrun-bundle"
BUNDLE_MANIFEST = "bundle.json"
SIGNATURE_FILE = "bundle.sig"
MODEL_MANIFEST = "manifest.json"
GOLDEN_DIR = "golden"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
DIGEST_KEY = "manifest_sha256"
#: Files of a bundle that bundle.json cannot list: itself, and the signature made over it.
RESERVED = (BUNDLE_MANIFEST, SIGNATURE_FILE)
_ZERO_DIGEST = "0" * 64
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ARCHIVE_TIME = 0  # reproducible archives: every member gets the same mtime
_CHUNK = 1 << 20


class BundleDamaged(UserError):
    """A bundle whose files do not match its manifest: missing, modified or unreadable."""


class BundleUntrusted(UserError):
    """An intact bundle that is not authenticated as asked: unsigned, signed by a key that is
    not trusted, a bad signature, or a digest other than the pinned one."""


# --- the schema of bundle.json ---------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class OpenVinoFiles:
    """OpenVINO IR carried beside model.onnx (OpenVINO targets read it instead), and
    optionally a compiled-model cache: the model compiled on the host (``export_model``) under
    ``ov-cache/``, used only when its hash, the OpenVINO version and the compile settings
    (``cache_settings``) match; otherwise the IR is compiled (slower, never wrong)."""

    xml: str
    bin: str
    cache: str | None = None
    cache_settings: dict[str, Any] | None = None
    openvino: str | None = None
    # seconds to load on the host, by how: "onnx", "ir", "cached" (one measurement each)
    host_load_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FixedAxes:
    """Symbolic axes the bundle fixes at load (label -> size, ``qcexport bundle --fix-axis``),
    and the golden cases left out because their shapes contradict them (name -> why)."""

    axes: dict[str, int]
    skipped_cases: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BundleManifest:
    """``bundle.json``, read by ``qcrun.schema.parse`` (unknown keys and wrong types refused).

    ``tolerances`` is the host's policy (``qcrun.schema.dump`` of it) and ``provenance`` is
    informational; neither decides a verdict unless a trusted key signed the bundle.
    """

    VERSION_KEY: ClassVar[str] = "format"
    VERSIONS: ClassVar[tuple[int, ...]] = (FORMAT,)

    format: int
    kind: Literal["qcrun-bundle"]
    target: str
    precision: str
    attention: str
    opset: int
    model: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tolerances: dict[str, Any]
    files: dict[str, FileEntry]
    profile_shapes: dict[str, tuple[int, int, int]]
    manifest_sha256: str
    golden: str = GOLDEN_DIR
    name: str | None = None
    created: str | None = None
    target_description: str | None = None
    mechanism: str | None = None
    preset: str | None = None
    dynamic_axes: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    openvino: OpenVinoFiles | None = None
    fixed_axes: FixedAxes | None = None
    roles: dict[str, str] | None = None  # axis role -> label (the model manifest's)


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

    DERIVED: ClassVar[dict[str, Callable]] = {"ok": lambda check: check.ok}

    bundle: str
    problems: list[FileProblem] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    checked: int = 0
    # problems of the compiled-model cache: they cost load time only (the IR is compiled)
    cache_problems: list[FileProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Authenticity:
    """What ``Bundle.authenticate`` established about who wrote a bundle.

    ``manifest_sha256`` is the digest ``--expect-sha256`` pins (``qcexport bundle`` prints it);
    ``signed_by`` the key id in bundle.sig (None: unsigned); ``trusted`` whether that signature
    was checked against a trusted key; ``pinned`` whether the digest matched a pinned one.
    """

    manifest_sha256: str
    signed_by: str | None = None
    trusted: bool = False
    pinned: bool = False

    def lines(self) -> list[str]:
        if self.trusted:
            lines = [f"signature: valid, by trusted key {signing.short_id(self.signed_by)} "
                     "(bundle.sig over bundle.json)"]
        elif self.signed_by:
            lines = [f"signature: signed by key {signing.short_id(self.signed_by)}, not checked: "
                     "pass --trust PUBKEY to authenticate it"]
        else:
            lines = ["signature: none: the bundle is unsigned; its files match bundle.json, but "
                     "who wrote it is not authenticated (sign it with `qcexport bundle --sign "
                     "KEY`, check it with --trust PUBKEY, or pin it with --expect-sha256)"]
        if self.pinned:
            lines.append(f"digest: bundle.json is the pinned one ({DIGEST_KEY} "
                         f"{self.manifest_sha256})")
        return lines


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` looks like a bundle: a directory with bundle.json, or a .tar.gz."""
    path = Path(path)
    if path.is_dir():
        return (path / BUNDLE_MANIFEST).is_file()
    return path.name.endswith(ARCHIVE_SUFFIXES)


class Bundle:
    """An opened bundle: its manifest and where its files are.

    ``open_bundle`` reads the manifest only; ``verify()`` hashes the files and
    ``authenticate()`` checks who wrote it. An archive is extracted into a temporary directory
    that ``close()`` (or garbage collection, or the end of the process) removes; a bundle
    directory is used in place.
    """

    def __init__(self, root: Path, spec: BundleManifest, source: Path,
                 cleanup: str | None = None, *, raw: bytes, data: dict[str, Any]):
        self.root = root
        self.spec = spec
        self.manifest = data  # bundle.json as parsed JSON (for printing and provenance)
        self.raw = raw  # the bytes of bundle.json that were parsed: what a signature covers
        self.source = source
        self.authenticity = Authenticity(spec.manifest_sha256)
        self.skipped: dict[str, str] = {}  # archive members not extracted (a cache): why
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
        return self.spec.name or self.source.name

    @property
    def target(self) -> str:
        return self.spec.target

    @property
    def precision(self) -> str:
        return self.spec.precision

    @property
    def attention(self) -> str:
        return self.spec.attention

    @property
    def opset(self) -> int:
        return self.spec.opset

    def _path(self, rel: str, what: str) -> Path:
        return inside(self.root, rel, where=f"bundle {self.source}: {BUNDLE_MANIFEST}",
                      field=what, stage="bundle")

    @property
    def model_path(self) -> Path:
        return self._path(self.spec.model, "model")

    @property
    def model_sha256(self) -> str:
        return self.spec.files[self.spec.model].sha256

    @property
    def golden_path(self) -> Path:
        return self._path(self.spec.golden, "golden")

    @property
    def model_manifest_path(self) -> Path:
        return self._path(MODEL_MANIFEST, "model manifest")

    @property
    def inputs(self) -> list[TensorInfo]:
        return [_info(s) for s in self.spec.inputs]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [_info(s) for s in self.spec.outputs]

    @property
    def profile_shapes(self) -> dict[str, tuple[int, int, int]]:
        """TensorRT min/opt/max per symbolic axis, fixed when the bundle was built."""
        return {k: tuple(v) for k, v in self.spec.profile_shapes.items()}

    @property
    def host_policy(self) -> TolerancePolicy:
        """The tolerance policy the host wrote into the bundle (not authenticated by itself)."""
        try:
            return TolerancePolicy.from_dict(self.spec.tolerances)
        except (UserError, TypeError, ValueError, AttributeError) as e:
            raise BundleDamaged(f"bundle {self.source}: its tolerances cannot be read: {e}",
                                stage="bundle", hint="rebuild it with `qcexport bundle`") from None

    @property
    def policy(self) -> TolerancePolicy:
        """The policy that judges this bundle (``judging_policy`` without a policy file)."""
        return self.judging_policy()

    def judging_policy(self, policy_file: str | Path | None = None) -> TolerancePolicy:
        """The policy that judges this bundle: a policy file the user names; else the host's,
        recorded in the bundle, only once ``authenticate`` found it signed by a trusted key;
        else qcrun's built-in one for the precision (whoever can edit bundle.json could
        loosen the recorded one, so an unauthenticated bundle never judges itself)."""
        if policy_file is None and self.authenticity.trusted:
            return self.host_policy
        return policy_for(self.precision, policy_file=policy_file)

    def policy_line(self, policy_file: str | Path | None = None) -> str:
        if policy_file is not None:
            return f"policy: {policy_file} (--policy), over qcrun's built-in tolerances"
        if self.authenticity.trusted:
            return ("policy: the host's tolerances recorded in the bundle (signed by a trusted "
                    "key)")
        return (f"policy: qcrun's built-in tolerances for {self.precision} (the bundle's own "
                "are used only when it is signed by a key given with --trust)")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.spec.provenance

    def input_shapes(self) -> dict[str, list[int | str | None]]:
        return {s.name: list(s.shape or []) for s in self.spec.inputs}

    def describe(self) -> str:
        return (f"{self.name} ({self.spec.mechanism or 'model'}, {self.precision}, "
                f"attention {self.attention!r}, opset {self.opset}, made for {self.target})")

    # -- where it can run ---------------------------------------------------------------------

    def incompatibility(self, target: str | Target) -> str | None:
        """Why ``target`` cannot run this bundle's model, or None when it can."""
        return get_target(target).incompatibility(attention=self.attention, opset=self.opset,
                                                  precision=self.precision)

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
        fixed = {"fix_axes": self.fixed_axes, "input_shapes": self.input_shapes()} \
            if self.fixed_axes else {}
        if not t.needs_shape_ranges:
            return {**fixed, **self._cache_options(t)}
        return {**fixed, "profile_shapes": self.profile_shapes,
                "cache_dir": str(self.cache_dir(t, cache_root))}

    def providers(self, target: str | Target, cache_root: str | Path | None = None) -> list:
        """The onnxruntime provider list the adapter builds for ``target``, computed from the
        bundle's specs alone (no engine needed): TensorRT options first, then CUDA and CPU."""
        t = get_target(target)
        return engine_of(t).providers(t, input_shapes=self.input_shapes(),
                                      profile_shapes=self.profile_shapes,
                                      cache_dir=self.cache_dir(t, cache_root))

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

    # -- integrity and authenticity -----------------------------------------------------------

    def verify(self) -> BundleCheck:
        check = _check_files(self.root, self.spec, str(self.source))
        if self.skipped:  # say why the cache is missing: the archive held it oversized
            check = replace(check, cache_problems=[
                FileProblem(p.path, "modified", self.skipped[p.path])
                if p.path in self.skipped else p for p in check.cache_problems])
        self._cache_intact = not check.cache_problems
        return check

    # -- OpenVINO IR, its compiled-model cache, fixed axes ------------------------------------

    def model_files(self):
        """The model's files by format (``qcrun.ir.ModelFiles``): OpenVINO targets read the
        IR the bundle carries, the others model.onnx."""
        from qcrun.ir import ModelFiles

        ov = self.spec.openvino
        return ModelFiles(self.model_path, self._path(ov.xml, "openvino.xml") if ov else None,
                          f"bundle {self.source}")

    @property
    def fixed_axes(self) -> dict[str, int]:
        return dict(self.spec.fixed_axes.axes) if self.spec.fixed_axes else {}

    def cache_state(self) -> str:
        """Whether the compiled-model cache can be offered to the engine: "none", "intact", or
        "not used: why" (missing or modified: compiling the IR costs time, never correctness)."""
        ov = self.spec.openvino
        if ov is None or ov.cache is None:
            return "none"
        if getattr(self, "_cache_intact", None) is None:
            # Unverified (load(verify=False)): hash the cache's own file, not the whole bundle.
            entry = self.spec.files.get(ov.cache)
            self._cache_intact = (
                entry is not None and ov.cache not in self.skipped
                and _check_file(self.root, ov.cache, entry,
                                f"bundle {self.source}: {BUNDLE_MANIFEST}") is None)
        if not self._cache_intact:
            return "not used: its files do not match bundle.json (missing or modified)"
        return "intact"

    def _cache_options(self, t: Target) -> dict[str, Any]:
        ov = self.spec.openvino
        settings = (ov.cache_settings or {}) if ov else {}
        if "ir" not in engine_of(t).formats or settings.get("device") != t.device:
            return {}
        if self.cache_state() != "intact":
            return {}
        return {"compiled_blob": str(self._path(ov.cache, "openvino.cache")),
                "compiled_config": settings}

    def require_intact(self) -> BundleCheck:
        """The check, or BundleDamaged naming every missing or modified file; then the
        precision bundle.json claims must be the one the model's graph computes in (it picks
        the tolerances, so a label is not taken on its word)."""
        check = self.verify()
        if not check.ok:
            raise damaged(check)
        graph = read_summary(self.model_path, stage="bundle").precision
        if graph != self.precision:
            raise BundleDamaged(
                f"bundle {self.source}: {BUNDLE_MANIFEST} says precision {self.precision}, but "
                f"the graph of {self.spec.model} is {graph} (read from its ops and weights)",
                stage="bundle",
                hint="bundle.json does not belong to this model: rebuild the bundle with "
                "`qcexport bundle`")
        return check

    def signature(self) -> signing.Signature | None:
        """The signature in bundle.sig (None: unsigned), or BundleDamaged when it is not one."""
        path = self.root / SIGNATURE_FILE
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise damaged(BundleCheck(str(self.source), [FileProblem(
                SIGNATURE_FILE, "unreadable", e.strerror or str(e))])) from None
        if not stat.S_ISREG(info.st_mode):
            raise damaged(BundleCheck(str(self.source), [FileProblem(
                SIGNATURE_FILE, "unreadable", "not a regular file")]))
        try:
            with open(path, "rb") as f:
                raw = f.read(signing.MAX_SIGNATURE_BYTES + 1)
            return signing.Signature.parse(raw)
        except (OSError, ValueError) as e:
            raise damaged(BundleCheck(str(self.source), [FileProblem(
                SIGNATURE_FILE, "unreadable", str(e))])) from None

    def authenticate(self, trusted_keys: Iterable[Any] | None = None,
                     expect_sha256: str | None = None) -> Authenticity:
        """Check who wrote the bundle; raises BundleUntrusted when it is not what was asked.

        ``trusted_keys`` (public keys: PEM paths, PEM bytes or key objects): bundle.sig must be
        a valid signature of bundle.json by one of them; an unsigned bundle fails. ``None``
        asks for nothing (an empty list trusts no one, so every bundle fails).
        ``expect_sha256``: bundle.json's ``manifest_sha256`` must be this digest. With
        neither, the result only says whether the bundle is signed. The outcome is kept in
        ``authenticity`` and decides ``policy``.
        """
        signature = self.signature()
        label = f"bundle {self.source}"
        digest = self.spec.manifest_sha256
        pinned = False
        if expect_sha256 is not None:
            wanted = str(expect_sha256).strip().lower().removeprefix("sha256:")
            if not _HEX64.match(wanted):
                raise UserError(f"--expect-sha256 {expect_sha256!r} is not a sha256 hex digest "
                                "(64 hex digits)", stage="trust",
                                hint="pass the manifest sha256 that `qcexport bundle` printed")
            if wanted != digest:
                raise BundleUntrusted(
                    f"{label}: bundle.json has {DIGEST_KEY} {digest}, not the expected "
                    f"{wanted}: it is not the bundle you pinned",
                    stage="trust",
                    hint="copy the bundle again from the host that printed the digest (or pin "
                    "the digest of the bundle you mean)")
            pinned = True
        trusted = False
        if trusted_keys is not None:
            keys = signing.load_public_keys(trusted_keys)
            if signature is None:
                raise BundleUntrusted(
                    f"{label} is not signed (no {SIGNATURE_FILE}), and trusted keys were given: "
                    "an unsigned bundle is not authenticated",
                    stage="trust",
                    hint="sign it on the host: `qcexport bundle MODEL_DIR --target T --sign "
                    "KEY.key`; or drop --trust to check integrity only")
            if not keys:
                raise BundleUntrusted(f"{label}: no trusted keys were given", stage="trust",
                                      hint="pass the signer's public key with --trust KEY.pub")
            why = signing.check(signature, self.raw, keys)
            if why:
                raise BundleUntrusted(f"{label} is not authentic: {why}", stage="trust",
                                      hint="copy the bundle again from the host, or trust the "
                                      "key that signed it (--trust KEY.pub) if you know it")
            trusted = True
        self.authenticity = Authenticity(digest, signature.key_id if signature else None,
                                         trusted, pinned)
        return self.authenticity


def damaged(check: BundleCheck) -> BundleDamaged:
    listed = "; ".join(p.describe() for p in check.problems)
    return BundleDamaged(
        f"bundle {check.bundle} is damaged: {listed}",
        stage="bundle",
        hint="copy the bundle again from the host (or rebuild it with `qcexport bundle`); "
        "never edit a bundle's files",
    )


def _info(spec: TensorSpec) -> TensorInfo:
    return TensorInfo(spec.name, spec.dtype, None if spec.shape is None else tuple(spec.shape))


def open_bundle(path: str | Path, *, extract_to: str | Path | None = None) -> Bundle:
    """Open a bundle directory or .tar.gz archive; reads and checks ``bundle.json`` itself.

    Files are not hashed here (``Bundle.verify``): an app that opened a bundle it verified
    before need not pay for hashing again. A bundle.json that does not match its own sha256
    is BundleDamaged at once, because everything else is judged by it. ``extract_to`` (an
    archive) must be a new or empty directory.
    """
    source = Path(path)
    if not source.exists():
        raise UserError(f"bundle {source} does not exist", stage="bundle",
                        hint="pass a bundle directory or .tar.gz written by `qcexport bundle`")
    cleanup = None
    skipped: dict[str, str] = {}
    if source.is_dir():
        root = source
    elif source.name.endswith(ARCHIVE_SUFFIXES):
        if extract_to:
            target_dir = Path(extract_to)
            if target_dir.exists() and (not target_dir.is_dir() or any(target_dir.iterdir())):
                raise UserError(f"cannot extract {source} into {target_dir}: it is not an empty "
                                "directory", stage="bundle", hint="pass a new directory")
        else:
            target_dir = Path(tempfile.mkdtemp(prefix="qcrun-bundle-"))
            cleanup = str(target_dir)
        try:
            root = _extract(source, target_dir, skipped)
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
        raw, spec, data = read_bundle_manifest(root, str(source))
    except BaseException:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    bundle = Bundle(root, spec, source, cleanup, raw=raw, data=data)
    bundle.skipped = skipped
    return bundle


def read_bundle_manifest(root: Path, label: str | None = None
                         ) -> tuple[bytes, BundleManifest, dict[str, Any]]:
    """``root/bundle.json``: (its bytes, the typed manifest, the parsed JSON), checked against
    its own sha256, its schema and the rule that no path leaves the bundle."""
    label = label or str(root)
    path = root / BUNDLE_MANIFEST
    if path.is_symlink() or not path.is_file():
        hint = ("it is a model directory: make a bundle of it with `qcexport bundle "
                f"{root} --target T`" if (root / MODEL_MANIFEST).is_file()
                else "pass a bundle written by `qcexport bundle`")
        raise UserError(f"{label} is not a bundle ({BUNDLE_MANIFEST} not found)", stage="bundle",
                        hint=hint)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise damaged(BundleCheck(label, [FileProblem(BUNDLE_MANIFEST, "unreadable",
                                                      e.strerror or str(e))])) from None
    spec, data = parse_manifest(raw, label)
    return raw, spec, data


def parse_manifest(raw: bytes, label: str) -> tuple[BundleManifest, dict[str, Any]]:
    """The bytes of a bundle.json as (typed manifest, parsed JSON), or BundleDamaged."""
    def unreadable(detail: str) -> BundleDamaged:
        return damaged(BundleCheck(label, [FileProblem(BUNDLE_MANIFEST, "unreadable", detail)]))

    if len(raw) > MAX_JSON_BYTES:
        raise unreadable(f"over the {MAX_JSON_BYTES} bytes a manifest may have")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise unreadable(f"not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise unreadable(f"not a {KIND} manifest")
    problem = _digest_problem(raw, data.get(DIGEST_KEY))
    if problem:
        raise damaged(BundleCheck(label, [FileProblem(BUNDLE_MANIFEST, "modified", problem)]))
    where = f"bundle {label}: {BUNDLE_MANIFEST}"
    try:
        spec = parse(BundleManifest, data, where=where, stage="bundle")
    except BundleDamaged:
        raise
    except UserError as e:
        raise BundleDamaged(e.args[0], stage="bundle", hint=e.hint) from None
    for name in spec.files:
        check_relpath(name, where=where, field="files entry", stage="bundle")
        if name in RESERVED:
            raise BundleDamaged(f"{where}: lists {name}, which cannot be one of its own files",
                                stage="bundle", hint="rebuild it with `qcexport bundle`")
    check_relpath(spec.model, where=where, field="model", stage="bundle")
    check_relpath(spec.golden, where=where, field="golden", stage="bundle")
    needed_files = [(spec.model, "the model"),
                    (f"{spec.golden}/{MODEL_MANIFEST}", "the golden manifest")]
    if spec.openvino is not None:  # the cache may be absent: it only saves time
        needed_files += [(spec.openvino.xml, "the OpenVINO IR"),
                         (spec.openvino.bin, "the OpenVINO IR weights")]
        for name in (spec.openvino.xml, spec.openvino.bin, spec.openvino.cache):
            if name is not None:
                check_relpath(name, where=where, field="openvino", stage="bundle")
    for needed, what in needed_files:
        if needed not in spec.files:
            raise BundleDamaged(f"{where}: does not list {what} {needed} among its files, so "
                                "nothing would check it", stage="bundle",
                                hint="rebuild it with `qcexport bundle`")
    return spec, data


def _no_constant(name: str):
    # NaN / Infinity are not JSON: a tolerance of NaN would make every comparison pass.
    raise ValueError(f"{name} is not a JSON value")


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


def _check_file(root: Path, name: str, entry: FileEntry, where: str) -> FileProblem | None:
    try:
        path = inside(root, name, where=where, field="files entry", stage="bundle")
    except UserError as e:
        return FileProblem(name, "unsafe-path", e.args[0])
    if not path.is_file():
        return FileProblem(name, "missing")
    size = path.stat().st_size
    if size != entry.bytes:
        return FileProblem(name, "modified", f"{size} bytes, bundle.json records {entry.bytes}")
    try:
        actual = file_sha256(path)
    except OSError as e:
        return FileProblem(name, "unreadable", e.strerror or str(e))
    if actual != entry.sha256:
        return FileProblem(name, "modified", f"sha256 {actual}, bundle.json records "
                           f"{entry.sha256}")
    return None


def _check_files(root: Path, spec: BundleManifest, label: str) -> BundleCheck:
    where = f"bundle {label}: {BUNDLE_MANIFEST}"
    names = sorted(spec.files)
    # Files are hashed side by side (hashlib and reads release the GIL): an OpenVINO bundle
    # carries the weights up to three times (ONNX, IR, compiled model), and hashing them one
    # after the other took longer than importing the compiled model.
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1, 4))) as pool:
        found = pool.map(lambda n: _check_file(root, n, spec.files[n], where), names)
        problems = [p for p in found if p is not None]
    listed = set(spec.files) | set(RESERVED)
    extra = [rel for rel, _ in _tree(root) if rel not in listed]
    cache = [p for p in problems if _in_cache(spec, p.path)]
    problems = [p for p in problems if not _in_cache(spec, p.path)]
    return BundleCheck(label, problems, extra, len(spec.files) + 1, cache)


def _in_cache(spec: BundleManifest, rel: str) -> bool:
    """Whether ``rel`` is the compiled-model cache, whose damage only costs load time."""
    return spec.openvino is not None and rel == spec.openvino.cache


def _tree(root: Path) -> list[tuple[str, str]]:
    """(relative path, kind) of everything under ``root`` but directories, links not followed;
    kind is "file" for a regular file, else what it is ("link", "other")."""
    found = []
    for directory, dirs, files in os.walk(root, followlinks=False):
        base = Path(directory)
        for name in sorted(files) + sorted(d for d in dirs if (base / d).is_symlink()):
            path = base / name
            mode = path.lstat().st_mode
            kind = ("file" if stat.S_ISREG(mode) else "link" if stat.S_ISLNK(mode) else "other")
            found.append((path.relative_to(root).as_posix(), kind))
    return sorted(found)


def foreign_content(path: str | Path) -> tuple[bool, list[str]]:
    """Whether ``path`` is a bundle (it has a bundle.json that parses and checks out), and
    what in it this tool did not write: files bundle.json does not list, listed files whose
    content changed, links, directories with nothing listed in them. ``(True, [])`` is the
    proof that replacing it loses nothing of the user's; works on a directory or an archive.
    """
    path = Path(path)
    if path.is_symlink():
        return False, [f"{path} is a symbolic link"]
    if path.is_file():
        return _foreign_in_archive(path)
    if not (path / BUNDLE_MANIFEST).is_file():
        return False, [f"no {BUNDLE_MANIFEST} in it"]
    try:
        _, spec, _ = read_bundle_manifest(path)
    except UserError as e:
        return False, [e.args[0]]
    problems = []
    for rel, kind in _tree(path):
        if kind != "file":
            problems.append(f"{rel} (a {kind})")
        elif rel == SIGNATURE_FILE:
            try:
                with open(path / rel, "rb") as f:
                    signing.Signature.parse(f.read(signing.MAX_SIGNATURE_BYTES + 1))
            except ValueError:
                problems.append(f"{rel} (not a signature qcexport wrote)")
        elif rel == BUNDLE_MANIFEST:
            continue
        elif rel not in spec.files:
            problems.append(f"{rel} (not listed in bundle.json)")
        elif file_sha256(path / rel) != spec.files[rel].sha256:
            problems.append(f"{rel} (changed since the bundle was written)")
    holders = {p for name in spec.files for p in PurePosixPath(name).parents}
    for directory, dirs, _ in os.walk(path, followlinks=False):
        for d in dirs:
            rel = PurePosixPath((Path(directory) / d).relative_to(path).as_posix())
            if rel not in holders and not (Path(directory) / d).is_symlink():
                problems.append(f"{rel}/ (a directory bundle.json lists nothing in)")
    return True, sorted(problems)


def _foreign_in_archive(archive: Path) -> tuple[bool, list[str]]:
    hashes: dict[str, str] = {}

    def digest(rel: str, stream: IO[bytes], size: int) -> None:
        h = hashlib.sha256()
        for block in _blocks(stream, size):
            h.update(block)
        hashes[rel] = h.hexdigest()

    oversized: dict[str, str] = {}
    try:
        spec = _walk_archive(archive, on_file=digest, on_dir=lambda rel: None,
                             on_skip=oversized.__setitem__)[1]
    except UserError as e:
        return BUNDLE_MANIFEST in hashes, [e.args[0]]
    except OSError as e:
        return False, [f"it cannot be read: {e.strerror or e}"]
    changed = [f"{rel} (changed since the bundle was written)" for rel, h in hashes.items()
               if rel in spec.files and h != spec.files[rel].sha256]
    changed += [f"{rel} (changed since the bundle was written: {why})"
                for rel, why in oversized.items()]
    return True, sorted(changed)


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
    if not isinstance(manifest, dict):
        raise UserError(f"bundle {path}: {MODEL_MANIFEST} is not a JSON object", stage="bundle",
                        hint="rebuild the bundle with `qcexport bundle`")
    manifest.update({
        "model": bundle.spec.model,
        "golden": bundle.spec.golden,
        "target": bundle.target,
        "tolerances": bundle.spec.tolerances,
        "profile_shapes": {k: list(v) for k, v in bundle.spec.profile_shapes.items()},
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
    for rel, kind in _tree(root):
        if rel in RESERVED:
            continue
        if kind != "file":
            raise RuntimeError(f"bundle staging holds {rel}, a {kind}")  # the writer's bug
        files[rel] = file_entry(root / rel)
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


def write_signature(root: str | Path, private_key) -> signing.Signature:
    """Sign ``root/bundle.json`` as it is on disk and write ``root/bundle.sig``."""
    root = Path(root)
    signature = signing.sign(private_key, (root / BUNDLE_MANIFEST).read_bytes())
    _write_atomic(root / SIGNATURE_FILE, signature.to_bytes())
    return signature


def pack_archive(directory: str | Path, archive: str | Path, arcname: str | None = None) -> Path:
    """Write the bundle in ``directory`` as a reproducible .tar.gz, atomically.

    bundle.json comes first (the reader checks every later member against it), then
    bundle.sig, then the files bundle.json lists; nothing else in the directory is packed.
    Members are sorted, owned by 0:0 with mode 644/755 and mtime 0, so the same bundle always
    gives the same archive bytes.
    """
    import gzip

    directory, archive = Path(directory), Path(archive)
    arcname = arcname or directory.name
    _, spec, _ = read_bundle_manifest(directory)
    members = [BUNDLE_MANIFEST]
    if (directory / SIGNATURE_FILE).is_file():
        members.append(SIGNATURE_FILE)
    listed = sorted(set(spec.files) | {p.as_posix() for name in spec.files
                                       for p in PurePosixPath(name).parents if p.parts})
    members += listed
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                   mtime=_ARCHIVE_TIME) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(directory, arcname=arcname, recursive=False, filter=_normalise)
            for rel in members:
                tar.add(directory / rel, arcname=f"{arcname}/{rel}", recursive=False,
                        filter=_normalise)
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


# --- reading archives ------------------------------------------------------------------------


def _blocks(stream: IO[bytes], size: int):
    """The ``size`` bytes of a member, in chunks; a short member is damage."""
    left = size
    while left:
        block = stream.read(min(_CHUNK, left))
        if not block:
            raise EOFError(f"member ends {left} bytes early")
        left -= len(block)
        yield block


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link to {m.linkname!r}"
    if m.islnk():
        return f"hard link to {m.linkname!r}"
    if m.ischr() or m.isblk():
        return "device"
    if m.isfifo():
        return "FIFO"
    if m.issparse():
        return "sparse file"
    return f"member of tar type {m.type!r}"


class _ArchiveWalk:
    """One pass over a bundle archive's members (see :func:`_walk_archive`): what is known so
    far (the top directory, the manifest, the files seen) and the checks on each member."""

    def __init__(self, archive: Path, on_file: Callable[[str, IO[bytes], int], None],
                 on_dir: Callable[[str], None], on_skip: Callable[[str, str], None] | None = None):
        self.archive = archive
        self.on_file = on_file
        self.on_dir = on_dir
        self.on_skip = on_skip
        self.top: str | None = None
        self.spec: BundleManifest | None = None
        self.seen: set[str] = set()
        self.allowed_dirs: set[str] = set()
        self.budget = 0

    def refuse(self, name: str, why: str) -> BundleDamaged:
        return BundleDamaged(
            f"bundle archive {self.archive}: member {name!r} {why}; refusing to extract it "
            "(nothing after it was read)",
            stage="bundle",
            hint="rebuild the archive on the host with `qcexport bundle --archive`, and never "
            "unpack an archive you cannot check with tar")

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        name = m.name
        if not (m.isdir() or m.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
            raise self.refuse(name, f"is a {_member_kind(m)}, not a plain file or directory")
        try:
            check_relpath(name, where=str(self.archive), field="member", stage="bundle")
        except UserError:
            raise self.refuse(name, "has an absolute path or one that leaves the archive "
                              "('..')") from None
        parts = PurePosixPath(name).parts
        if self.spec is None:
            self._before_manifest(tar, m, parts)
        else:
            self._listed(tar, m, parts, self.spec)

    def _before_manifest(self, tar: tarfile.TarFile, m: tarfile.TarInfo,
                         parts: tuple[str, ...]) -> None:
        # nothing is known before bundle.json: allow one top directory
        if m.isdir() and self.top is None and len(parts) == 1:
            self.top = parts[0]
            self.on_dir("")
            return
        if parts[-1] != BUNDLE_MANIFEST or len(parts) > 2 or (
                len(parts) == 2 and self.top not in (None, parts[0])) or m.isdir():
            raise self.refuse(m.name, f"comes before {BUNDLE_MANIFEST}, which must be the "
                              "first file of a bundle archive")
        if m.size > MAX_JSON_BYTES:
            raise self.refuse(m.name, f"holds {m.size} bytes, over the {MAX_JSON_BYTES} a "
                              "manifest may have")
        self.top = parts[0] if len(parts) == 2 else ""
        if self.top:
            self.on_dir("")
        raw = b"".join(_blocks(tar.extractfile(m), m.size))
        spec, _ = parse_manifest(raw, str(self.archive))
        self.spec = spec
        self.budget = sum(e.bytes for e in spec.files.values()) + signing.MAX_SIGNATURE_BYTES
        self.allowed_dirs = {p.as_posix() for f in spec.files
                             for p in PurePosixPath(f).parents if p.parts}
        self.seen.add(BUNDLE_MANIFEST)
        self.on_file(BUNDLE_MANIFEST, _BytesStream(raw), len(raw))

    def _listed(self, tar: tarfile.TarFile, m: tarfile.TarInfo, parts: tuple[str, ...],
                spec: BundleManifest) -> None:
        name, top = m.name, self.top
        if top and (parts[0] != top or len(parts) == 1):
            raise self.refuse(name, f"lies outside the bundle's directory {top!r}")
        rel = "/".join(parts[1:] if top else parts)
        if m.isdir():
            if rel not in self.allowed_dirs:
                raise self.refuse(name, "is a directory in which bundle.json lists no file")
            self.on_dir(rel)
            return
        if rel in self.seen:
            raise self.refuse(name, "comes twice")
        if rel == SIGNATURE_FILE:
            limit = signing.MAX_SIGNATURE_BYTES
        elif rel in spec.files:
            limit = spec.files[rel].bytes
        else:
            raise self.refuse(name, f"is not listed in {BUNDLE_MANIFEST}")
        if m.size > limit and _in_cache(spec, rel) and self.on_skip is not None:
            # A compiled-model cache only saves time: left out (its data streamed past, never
            # written), it is a missing cache, and the IR is compiled instead.
            self.seen.add(rel)
            self.on_skip(rel, f"the archive holds {m.size} bytes, more than the {limit} "
                         f"{BUNDLE_MANIFEST} lists: not extracted")
            return
        if m.size > limit:
            raise self.refuse(name, f"holds {m.size} bytes, more than the {limit} "
                              f"{BUNDLE_MANIFEST} lists")
        self.budget -= m.size
        if self.budget < 0:  # cannot happen with the checks above; the bound is the point
            raise self.refuse(name, "goes past the total size bundle.json lists")
        self.seen.add(rel)
        self.on_file(rel, tar.extractfile(m), m.size)


def _walk_archive(archive: Path, *, on_file: Callable[[str, IO[bytes], int], None],
                  on_dir: Callable[[str], None], on_skip: Callable[[str, str], None] | None = None
                  ) -> tuple[str, BundleManifest]:
    """Stream a bundle archive: each member is checked against bundle.json (which must be the
    first file) from its header alone, before its data is read; ``on_file(rel, stream, size)``
    then consumes a listed file, bundle.json and bundle.sig included. Stops with BundleDamaged
    at the first member that is not a plain file or directory, has an absolute or '..' path,
    lies outside the bundle's directory, is not listed, holds more bytes than listed, or comes
    twice; so no more than the listed total is ever read. An oversized compiled-model cache is
    the exception: with ``on_skip(rel, why)`` it is passed over, not refused, because its
    damage only costs load time. Returns (top-level directory name, or "" when the files are
    at the root; the manifest)."""
    walk = _ArchiveWalk(archive, on_file, on_dir, on_skip)
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for m in tar:
                walk.member(tar, m)
    except (tarfile.TarError, EOFError, zlib.error, ValueError) as e:
        raise BundleDamaged(
            f"bundle archive {archive} cannot be read as .tar.gz: {e}",
            stage="bundle",
            hint="the archive is truncated or damaged: copy it again from the host",
        ) from None
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise
        raise BundleDamaged(
            f"bundle archive {archive} cannot be read as .tar.gz: {e.strerror or e}",
            stage="bundle",
            hint="the archive is truncated or damaged: copy it again from the host",
        ) from None
    if walk.spec is None:
        raise UserError(f"bundle archive {archive} holds no {BUNDLE_MANIFEST}", stage="bundle",
                        hint="pass an archive written by `qcexport bundle --archive`")
    return walk.top or "", walk.spec


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EEXIST, errno.ELOOP)


class _BytesStream:
    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def read(self, n: int) -> bytes:
        block = self._data[self._at:self._at + n]
        self._at += len(block)
        return block


def _extract(archive: Path, into: Path, skipped: dict[str, str] | None = None) -> Path:
    """Extract a bundle archive into the new or empty directory ``into``, which becomes the
    bundle root (the archive's top-level directory name is not kept), checking every member
    against bundle.json while streaming (``_walk_archive``). ``skipped`` receives the members
    left out (an oversized compiled-model cache) with the reason."""
    into.mkdir(parents=True, exist_ok=True)

    def on_dir(rel: str) -> None:
        (into / rel).mkdir(exist_ok=True)

    def on_file(rel: str, stream: IO[bytes], size: int) -> None:
        path = into / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL | O_NOFOLLOW: never write through anything already there
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            for block in _blocks(stream, size):
                f.write(block)

    try:
        _walk_archive(archive, on_file=on_file, on_dir=on_dir,
                      on_skip=None if skipped is None else skipped.__setitem__)
    except OSError as e:
        raise UserError(f"cannot extract bundle archive {archive} into {into}: "
                        f"{e.strerror or e}", stage="bundle",
                        hint="free space there, or set TMPDIR to a directory with room (the "
                        "archive is extracted into a temporary directory)") from None
    return into


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

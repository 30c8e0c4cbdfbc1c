"""Ed25519 signatures of bundles: who wrote a bundle, not only whether it is intact.

The self-digest of ``bundle.json`` catches accidents; anyone who edits the file can recompute
it. A signature by a private key only the host holds cannot be recomputed: ``qcexport bundle
--sign KEY`` signs the exact bytes of ``bundle.json`` (which lists the sha256 and size of every
other file, so the signature covers the whole bundle) and writes ``bundle.sig``; ``qcrun verify
--trust PUBKEY`` and ``qcrun.load(..., trusted_keys=[...])`` accept the bundle only when one of
the trusted public keys made that signature.

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), as ``qcexport keygen`` or
``openssl genpkey -algorithm ed25519 -out KEY.pem`` and ``openssl pkey -in KEY.pem -pubout
-out KEY.pub`` write them. The ``cryptography`` package is an optional extra
(``pip install 'qcrun[sign]'``): an unsigned bundle is checked without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcrun.errors import UserError

SIGNATURE_KIND = "qcrun-bundle-signature"
SIGNATURE_FORMAT = 1
ALGORITHM = "ed25519"
#: Signatures are over this prefix + the bytes of bundle.json, so a signature made for another
#: purpose with the same key can never pass as a bundle signature.
CONTEXT = b"qcrun-bundle-signature-v1\n"
MAX_SIGNATURE_BYTES = 4096
INSTALL_HINT = "install it: pip install 'qcrun[sign]' (or pip install cryptography)"


def _crypto(purpose: str):
    """The cryptography Ed25519 and serialization modules, or a UserError saying how to
    install them (they are needed only for signed bundles)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise UserError(f"{purpose} needs the 'cryptography' package, which is not installed",
                        stage="trust", hint=INSTALL_HINT) from None
    return ed25519, serialization


def key_id(public_key) -> str:
    """sha256 of the raw 32-byte public key: the name a key goes by in messages and files."""
    _, serialization = _crypto("reading a key")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def short_id(kid: str) -> str:
    return kid[:16]


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist", stage="trust",
                        hint="make a key pair with `qcexport keygen -o DIR`") from None
    except OSError as e:
        raise UserError(f"{what} {path} cannot be read: {e.strerror or e}",
                        stage="trust") from None
    if len(data) > 64 * 1024:
        raise UserError(f"{what} {path} is {len(data)} bytes, not a PEM key", stage="trust",
                        hint="pass a PEM file written by `qcexport keygen`")
    return data


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8), or a UserError."""
    ed25519, serialization = _crypto("--sign")
    path = Path(path)
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise UserError(f"signing key {path} is encrypted with a password", stage="trust",
                        hint="pass an unencrypted key (keep it in a protected place instead), "
                        "e.g. one written by `qcexport keygen`") from None
    except (ValueError, binascii.Error) as e:
        hint = ("that is a public key: --sign needs the private key"
                if b"PUBLIC KEY" in data else
                "make one with `qcexport keygen -o DIR` or "
                "`openssl genpkey -algorithm ed25519 -out KEY.pem`")
        raise UserError(f"signing key {path} is not a PEM private key ({_first_line(e)})",
                        stage="trust", hint=hint) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UserError(f"signing key {path} is a {type(key).__name__.removeprefix('_')}, "
                        "not an Ed25519 key", stage="trust",
                        hint="make one with `qcexport keygen -o DIR` or "
                        "`openssl genpkey -algorithm ed25519 -out KEY.pem`")
    return key


def load_public_key(source: Any):
    """An Ed25519 public key from a PEM file path, PEM bytes or a key object, or a UserError."""
    ed25519, serialization = _crypto("checking a bundle signature (--trust, trusted_keys)")
    if isinstance(source, ed25519.Ed25519PublicKey):
        return source
    if isinstance(source, ed25519.Ed25519PrivateKey):
        raise UserError("a trusted key must be a public key, not the private key",
                        stage="trust", hint="pass the .pub file written by `qcexport keygen`")
    if isinstance(source, bytes):
        data, label = source, "trusted key (bytes)"
    elif isinstance(source, str | os.PathLike):
        data, label = _read_key_file(Path(source), "trusted key"), f"trusted key {source}"
    else:
        raise UserError(f"trusted key {source!r} is not a path, PEM bytes or an Ed25519 public "
                        "key", stage="trust", hint="pass the path of a .pub PEM file")
    if b"PRIVATE KEY" in data:
        raise UserError(f"{label} is a private key; trust is given to public keys",
                        stage="trust",
                        hint="pass the .pub file (`openssl pkey -in KEY.pem -pubout` prints it) "
                        "and keep the private key on the host")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, binascii.Error) as e:
        raise UserError(f"{label} is not a PEM public key ({_first_line(e)})", stage="trust",
                        hint="pass the .pub file written by `qcexport keygen`") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UserError(f"{label} is a {type(key).__name__.removeprefix('_')}, not an Ed25519 "
                        "key", stage="trust", hint="pass the .pub file written by "
                        "`qcexport keygen`")
    return key


def load_public_keys(sources: Iterable[Any]) -> dict[str, Any]:
    """{key id: public key} of every trusted key given."""
    keys = {}
    for source in sources:
        key = load_public_key(source)
        keys[key_id(key)] = key
    return keys


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass(frozen=True)
class Signature:
    """The content of ``bundle.sig``: which key signed which bytes of bundle.json."""

    key_id: str
    signed_sha256: str  # sha256 of the bundle.json bytes that were signed
    signature: bytes

    def to_bytes(self) -> bytes:
        data = {"kind": SIGNATURE_KIND, "format": SIGNATURE_FORMAT, "algorithm": ALGORITHM,
                "key_id": self.key_id, "signed": "bundle.json",
                "signed_sha256": self.signed_sha256,
                "signature": base64.b64encode(self.signature).decode()}
        return (json.dumps(data, indent=2) + "\n").encode()

    @classmethod
    def parse(cls, raw: bytes) -> Signature:
        """A signature from the bytes of bundle.sig; ValueError says what is wrong."""
        if len(raw) > MAX_SIGNATURE_BYTES:
            raise ValueError(f"{len(raw)} bytes, a signature file has at most "
                             f"{MAX_SIGNATURE_BYTES}")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"not valid JSON: {e}") from None
        expected = {"kind", "format", "algorithm", "key_id", "signed", "signed_sha256",
                    "signature"}
        if not isinstance(data, dict) or set(data) != expected:
            raise ValueError(f"not a {SIGNATURE_KIND} (expected exactly the keys "
                             f"{', '.join(sorted(expected))})")
        if data["kind"] != SIGNATURE_KIND or data["signed"] != "bundle.json":
            raise ValueError(f"not a {SIGNATURE_KIND} of bundle.json")
        if data["format"] != SIGNATURE_FORMAT:
            raise ValueError(f"signature format {data['format']!r}; this qcrun reads format "
                             f"{SIGNATURE_FORMAT}")
        if data["algorithm"] != ALGORITHM:
            raise ValueError(f"algorithm {data['algorithm']!r}, expected {ALGORITHM!r}")
        for key in ("key_id", "signed_sha256"):
            value = data[key]
            if not isinstance(value, str) or len(value) != 64 or value.strip(
                    "0123456789abcdef"):
                raise ValueError(f"{key} is not a sha256 hex digest")
        try:
            signature = base64.b64decode(data["signature"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ValueError("signature is not base64") from None
        if len(signature) != 64:
            raise ValueError(f"an Ed25519 signature has 64 bytes, this one {len(signature)}")
        return cls(data["key_id"], data["signed_sha256"], signature)


def sign(private_key, data: bytes) -> Signature:
    """Sign the bytes of bundle.json."""
    signature = private_key.sign(CONTEXT + data)
    return Signature(key_id(private_key.public_key()), hashlib.sha256(data).hexdigest(),
                     signature)


def check(signature: Signature, data: bytes, trusted: dict[str, Any]) -> str | None:
    """Why ``signature`` is not a trusted key's signature of ``data``; None when it is."""
    from cryptography.exceptions import InvalidSignature

    key = trusted.get(signature.key_id)
    if key is None:
        return (f"it is signed by key {short_id(signature.key_id)}, which is not among the "
                f"trusted keys ({', '.join(short_id(k) for k in trusted) or 'none'})")
    actual = hashlib.sha256(data).hexdigest()
    if actual != signature.signed_sha256:
        return (f"bundle.json has sha256 {actual}, the signature is for "
                f"{signature.signed_sha256}: bundle.json was changed after signing")
    try:
        key.verify(signature.signature, CONTEXT + data)
    except InvalidSignature:
        return (f"the signature does not verify with key {short_id(signature.key_id)}: "
                "bundle.json or bundle.sig was changed after signing")
    return None


def generate_keypair(directory: str | os.PathLike, name: str = "qcexport-signing"
                     ) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``DIR/NAME.key`` (private, mode 600) and ``DIR/NAME.pub``.

    Existing files are never overwritten: losing a signing key is not undoable.
    """
    ed25519, serialization = _crypto("qcexport keygen")
    directory = Path(directory)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    taken = [str(p) for p in (private_path, public_path) if p.exists() or p.is_symlink()]
    if taken:
        raise UserError(f"{', '.join(taken)} already exist(s); refusing to overwrite a key",
                        stage="keygen", hint="pass another -o or --name")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem, 0o600)
        try:
            _write_new(public_path, public_pem, 0o644)
        except BaseException:
            private_path.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise UserError(f"cannot write the key pair into {directory}: {e.strerror or e}",
                        stage="keygen", hint="choose a writable -o") from None
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (it must not exist) with ``mode`` from the start: a private key is never
    readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise

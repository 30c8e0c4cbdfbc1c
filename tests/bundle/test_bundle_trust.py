"""Authentic bundles: Ed25519 signatures, pinned digests, and a verdict that never comes from
an unauthenticated bundle.

The forged bundles here are made the way an attacker would: edit bundle.json (another model,
a tolerance of 1000, a golden path outside the bundle) and recompute its self-digest with the
documented rule (sha256 of the file with the digest field zeroed), written out here
independently of the code under test. Every verify runs the real qcrun command line (in a
fresh interpreter without torch and onnx, as on a device, or in-process) on real engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import qcrun
from click.testing import CliRunner
from onnx import numpy_helper
from qcrun.bundle import BundleDamaged, BundleUntrusted, open_bundle, pack_archive
from qcrun.cli import main as qcrun_main
from qcrun.errors import UserError
from qcrun.golden import load_golden
from qcrun.parity import TolerancePolicy, run_parity
from qcrun.signing import key_id, load_public_key

from qcexport.bundle import make_bundle
from qcexport.cli import main as qcexport_main

ZERO = "0" * 64


def invoke(main, *args):
    return CliRunner().invoke(main, [str(a) for a in args])


def clean_error(result_or_proc, stage: str, *parts: str, fix: bool = True) -> str:
    """The stderr of a failed command: exit 1, `error: <stage>: ...`, a fix (a parity verdict
    has none: the model is wrong), no traceback."""
    code = getattr(result_or_proc, "exit_code", None)
    code = result_or_proc.returncode if code is None else code
    err = result_or_proc.stderr
    assert code == 1, (code, err)
    assert f"error: {stage}: " in err and ("\n  fix: " in err or not fix), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


def rehash(root: Path, edit) -> str:
    """Edit bundle.json as data and recompute its self-digest, as a forger would; returns it."""
    path = root / "bundle.json"
    data = json.loads(path.read_text())
    edit(data)
    data["manifest_sha256"] = ZERO
    text = json.dumps(data, indent=2) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    path.write_text(text.replace(f'"manifest_sha256": "{ZERO}"', f'"manifest_sha256": "{digest}"'))
    return digest


def scale_weights(model_path: Path, factor: float = 1.05) -> None:
    """The wrong model: every float weight scaled by ``factor`` (still fp32, same graph)."""
    model = onnx.load(str(model_path))
    scaled = 0
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 1:
            init.CopyFrom(numpy_helper.from_array(array * np.float32(factor), init.name))
            scaled += 1
    assert scaled > 4
    onnx.save(model, str(model_path))


def forge_wrong_model(root: Path, *, precision: str | None = None) -> str:
    """Swap in the scaled model, list its real hash, loosen every tolerance to 1000."""
    scale_weights(root / "model.onnx")
    forged = ["model.onnx"]
    if (root / "model.xml").is_file():  # an OpenVINO bundle: forge the IR OpenVINO reads too
        from qcexport.ir import ir_from_onnx

        ir_from_onnx(root / "model.onnx", root)
        forged += ["model.xml", "model.bin"]

    def edit(data):
        for name in forged:
            raw = (root / name).read_bytes()
            data["files"][name] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
        for fields in data["tolerances"]["defaults"].values():
            fields.update(max_abs=1000.0, max_rel=1000.0, min_cosine=-1.0)
        data["tolerances"]["targets"] = {}
        if precision:
            data["precision"] = precision

    return rehash(root, edit)


@pytest.fixture
def signed_copy(tmp_path, signed_bundle) -> Path:
    return Path(shutil.copytree(signed_bundle, tmp_path / "copy" / "signed.bundle"))


# --- signing and trusting --------------------------------------------------------------------


def test_signed_bundle_verifies_with_its_key_without_torch(signed_bundle, keys, qcrun_no_torch):
    assert (signed_bundle / "bundle.sig").is_file()
    listed = json.loads((signed_bundle / "bundle.json").read_text())["files"]
    assert "bundle.sig" not in listed  # it signs bundle.json, so it cannot be listed in it
    proc = qcrun_no_torch("verify", signed_bundle, "--trust", keys[2], "--trust", keys[1])
    assert proc.returncode == 0, proc.stderr
    kid = key_id(load_public_key(keys[1]))
    assert f"signature: valid, by trusted key {kid[:16]}" in proc.stdout
    assert "policy: the host's tolerances recorded in the bundle" in proc.stdout
    assert "not part of the bundle" not in proc.stdout  # bundle.sig is not an extra file
    assert "3 passed, 0 failed, 0 skipped" in proc.stdout


def test_unsigned_bundle_verifies_and_says_it_is_not_authenticated(bundle_copy):
    result = invoke(qcrun_main, "verify", bundle_copy)
    assert result.exit_code == 0, result.output
    assert "signature: none: the bundle is unsigned" in result.stdout
    assert "who wrote it is not authenticated" in result.stdout
    assert "policy: qcrun's built-in tolerances for fp32" in result.stdout


def test_signed_bundle_without_trust_is_not_authenticated(signed_bundle):
    result = invoke(qcrun_main, "verify", signed_bundle)
    assert result.exit_code == 0, result.output
    assert "not checked: pass --trust PUBKEY to authenticate it" in result.stdout
    assert "policy: qcrun's built-in tolerances" in result.stdout


def test_unsigned_bundle_with_trust_fails(bundle_copy, keys):
    result = invoke(qcrun_main, "verify", bundle_copy, "--trust", keys[1])
    clean_error(result, "trust", "is not signed (no bundle.sig)", "--sign")
    assert "passed" not in result.stdout  # nothing ran


def test_a_key_that_is_not_trusted_fails(signed_bundle, keys):
    result = invoke(qcrun_main, "verify", signed_bundle, "--trust", keys[2])
    stranger = key_id(load_public_key(keys[2]))[:16]
    clean_error(result, "trust", "which is not among the trusted keys", stranger)


def test_a_changed_signature_fails(signed_copy, keys):
    path = signed_copy / "bundle.sig"
    data = json.loads(path.read_text())
    first = data["signature"][0]
    data["signature"] = ("B" if first == "A" else "A") + data["signature"][1:]
    path.write_text(json.dumps(data))
    result = invoke(qcrun_main, "verify", signed_copy, "--trust", keys[1])
    clean_error(result, "trust", "the signature does not verify")


def test_an_unreadable_signature_is_damage_even_without_trust(signed_copy):
    (signed_copy / "bundle.sig").write_text("not a signature")
    result = invoke(qcrun_main, "verify", signed_copy)
    clean_error(result, "bundle", "bundle.sig: unreadable")


def test_trust_needs_a_public_key(signed_bundle, keys, tmp_path):
    result = invoke(qcrun_main, "verify", signed_bundle, "--trust", keys[0])
    clean_error(result, "trust", "is a private key; trust is given to public keys")
    result = invoke(qcrun_main, "verify", signed_bundle, "--trust", tmp_path / "missing.pub")
    clean_error(result, "trust", "does not exist")
    junk = tmp_path / "junk.pub"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    result = invoke(qcrun_main, "verify", signed_bundle, "--trust", junk)
    clean_error(result, "trust", "is not a PEM public key")


def test_expect_sha256_pins_a_bundle(signed_bundle, bundle_copy):
    digest = json.loads((signed_bundle / "bundle.json").read_text())["manifest_sha256"]
    result = invoke(qcrun_main, "verify", signed_bundle, "--expect-sha256", digest.upper())
    assert result.exit_code == 0, result.output
    assert f"digest: bundle.json is the pinned one (manifest_sha256 {digest})" in result.stdout
    result = invoke(qcrun_main, "verify", bundle_copy, "--expect-sha256", digest)
    clean_error(result, "trust", f"not the expected {digest}")
    result = invoke(qcrun_main, "verify", bundle_copy, "--expect-sha256", "abc")
    clean_error(result, "trust", "is not a sha256 hex digest")


def test_trust_options_on_a_model_directory_are_refused(qformer_dir, keys):
    result = invoke(qcrun_main, "verify", qformer_dir, "--target", "ort-cpu", "--trust", keys[1])
    clean_error(result, "trust", "is not a bundle")


# --- a forged bundle.json never passes --------------------------------------------------------


def test_forged_bundle_json_fails_with_trust_pin_and_without_them(signed_copy, keys,
                                                                   qcrun_no_torch):
    original = json.loads((signed_copy / "bundle.json").read_text())["manifest_sha256"]
    forge_wrong_model(signed_copy)
    # the self-digest checks out: integrity alone cannot see the forgery
    with open_bundle(signed_copy) as bundle:
        assert bundle.verify().ok
        forged_policy = bundle.host_policy
        assert forged_policy.resolve("fp32", "openvino-cpu").max_abs == 1000.0
        # what judging by the bundle's own policy would do: the wrong model passes
        golden = load_golden(bundle.golden_path)
        lax = run_parity(bundle.model_path, golden, ["openvino-cpu"], forged_policy, "fp32")
        assert lax.passed
        strict = run_parity(bundle.model_path, golden, ["openvino-cpu"], TolerancePolicy(),
                            "fp32")
        assert not strict.passed  # the scaled weights are really wrong

    proc = qcrun_no_torch("verify", signed_copy, "--trust", keys[1])
    clean_error(proc, "trust", "is not authentic", "bundle.json was changed after signing")
    proc = qcrun_no_torch("verify", signed_copy, "--expect-sha256", original)
    clean_error(proc, "trust", "not the bundle you pinned")
    # no keys, no pin: the verdict is qcrun's built-in policy, not the bundle's 1000
    proc = qcrun_no_torch("verify", signed_copy)
    clean_error(proc, "verify", "parity failed on openvino-cpu", fix=False)
    assert "policy: qcrun's built-in tolerances for fp32" in proc.stdout
    assert "0 passed" in proc.stdout


def test_forged_unsigned_bundle_fails_on_every_target(bundle_copy):
    forge_wrong_model(bundle_copy)
    result = invoke(qcrun_main, "verify", bundle_copy, "--target", "ort-cpu", "--target",
                    "openvino-cpu")
    clean_error(result, "verify", "parity failed on openvino-cpu, ort-cpu", fix=False)


def test_a_false_precision_in_bundle_json_is_refused(bundle_copy):
    """int8-static would bring looser tolerances: the graph's precision decides, not the label."""
    forge_wrong_model(bundle_copy, precision="int8-static")
    result = invoke(qcrun_main, "verify", bundle_copy, "--target", "ort-cpu")
    clean_error(result, "bundle", "says precision int8-static, but the graph of model.onnx is "
                "fp32")
    assert "passed" not in result.stdout


@pytest.mark.parametrize("key, value, message", [
    ("golden", "../../g/forged", "golden '../../g/forged' leaves its directory"),
    ("golden", "/etc", "golden '/etc' is absolute"),
    ("model", "../model.onnx", "model '../model.onnx' leaves its directory"),
    ("files", "../../etc/passwd", "files entry '../../etc/passwd' leaves its directory"),
    ("tolerances", [1, 2, 3], "at tolerances: expected an object, got list"),
    ("format", 99, "format 99 was written by a newer qcexport"),
    ("tolerance", {}, "unknown key 'tolerance'"),
])
def test_paths_and_types_in_bundle_json_are_checked(bundle_copy, tmp_path, key, value, message):
    forged = tmp_path / "g" / "forged"  # a golden set the escape would reach, were it followed
    shutil.copytree(bundle_copy / "golden", forged)

    def edit(data):
        if key == "files":
            data["files"][value] = data["files"]["manifest.json"]
        else:
            data[key] = value

    rehash(bundle_copy, edit)
    result = invoke(qcrun_main, "verify", bundle_copy)
    clean_error(result, "bundle", message)
    assert "passed" not in result.stdout


def test_a_listed_file_that_is_a_symlink_out_of_the_bundle_is_refused(bundle_copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(bundle_copy / "manifest.json", outside)
    (bundle_copy / "manifest.json").unlink()
    os.symlink(outside, bundle_copy / "manifest.json")
    result = invoke(qcrun_main, "verify", bundle_copy)
    clean_error(result, "bundle", "manifest.json: unsafe-path", "symlink escape")


# --- qcrun.load -------------------------------------------------------------------------------


def test_load_with_trusted_keys(signed_bundle, bundle_copy, keys, qformer_dir):
    golden = load_golden(signed_bundle / "golden")
    with qcrun.load(signed_bundle, target="ort-cpu", trusted_keys=[keys[1]]) as model:
        assert model.bundle.authenticity.trusted
        assert model.bundle.policy == model.bundle.host_policy
        out = model(**golden.cases[0].inputs)["query_outputs"]
        np.testing.assert_allclose(out, golden.cases[0].outputs["query_outputs"], atol=1e-5)
    with qcrun.load(signed_bundle, target="ort-cpu", trusted_keys=[keys[1].read_bytes()],
                    expect_sha256=json.loads((signed_bundle / "bundle.json").read_text())[
                        "manifest_sha256"]) as model:
        assert model.bundle.authenticity.pinned
    with pytest.raises(BundleUntrusted, match="which is not among the trusted keys"):
        qcrun.load(signed_bundle, trusted_keys=[keys[2]])
    with pytest.raises(BundleUntrusted, match="is not signed"):
        qcrun.load(bundle_copy, trusted_keys=[keys[1]])
    with pytest.raises(BundleUntrusted, match="no trusted keys were given"):
        qcrun.load(signed_bundle, trusted_keys=[])
    with pytest.raises(BundleUntrusted, match="not the expected"):
        qcrun.load(signed_bundle, expect_sha256="0" * 64)
    with pytest.raises(UserError, match="is not a bundle"):
        qcrun.load(qformer_dir, trusted_keys=[keys[1]])
    # without keys the bundle's recorded policy does not judge
    with qcrun.load(signed_bundle, target="ort-cpu") as model:
        assert not model.bundle.authenticity.trusted
        assert model.bundle.policy == TolerancePolicy()


def test_load_of_a_forged_signed_bundle_fails(signed_copy, keys):
    forge_wrong_model(signed_copy)
    with pytest.raises(BundleUntrusted, match="bundle.json was changed after signing"):
        qcrun.load(signed_copy, trusted_keys=[keys[1]])


def test_signed_archive_round_trip(signed_bundle, keys, tmp_path, qcrun_no_torch):
    archive = pack_archive(signed_bundle, tmp_path / "signed.bundle.tar.gz")
    import tarfile

    with tarfile.open(archive) as tar:  # the reader needs bundle.json first, then the signature
        assert tar.getnames()[:3] == ["signed.bundle", "signed.bundle/bundle.json",
                                      "signed.bundle/bundle.sig"]
    proc = qcrun_no_torch("verify", archive, "--trust", keys[1], "--target", "ort-cpu")
    assert proc.returncode == 0, proc.stderr
    assert "signature: valid, by trusted key" in proc.stdout


# --- without the cryptography package ---------------------------------------------------------

NO_CRYPTOGRAPHY = r"""
class NoCrypto(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cryptography":
            raise ModuleNotFoundError(f"{name} is blocked: not installed")
        return None

sys.meta_path.insert(0, NoCrypto())
from qcrun.cli import main
sys.argv = ["qcrun", *sys.argv[1:]]
main()
"""


def test_without_cryptography(signed_bundle, bundle_copy, keys, qcrun_no_torch):
    proc = qcrun_no_torch("verify", bundle_copy, script=NO_CRYPTOGRAPHY)
    assert proc.returncode == 0, proc.stderr  # unsigned verification needs no cryptography
    assert "signature: none" in proc.stdout
    proc = qcrun_no_torch("verify", signed_bundle, "--trust", keys[1], script=NO_CRYPTOGRAPHY)
    clean_error(proc, "trust", "needs the 'cryptography' package",
                "pip install 'qcrun[sign]'")


# --- keys and signing on the host ------------------------------------------------------------


def test_keygen(tmp_path):
    result = invoke(qcexport_main, "keygen", "-o", tmp_path, "--name", "release")
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "release.key", tmp_path / "release.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    assert f"--trust {public}" in result.output
    before = private.read_bytes()
    result = invoke(qcexport_main, "keygen", "-o", tmp_path, "--name", "release")
    clean_error(result, "keygen", "refusing to overwrite a key")
    assert private.read_bytes() == before


@pytest.mark.parametrize("which, message", [
    ("public", "that is a public key: --sign needs the private key"),
    ("missing", "does not exist"),
    ("text", "is not a PEM private key"),
])
def test_sign_with_something_that_is_not_a_private_key(tmp_path, qformer_dir, keys, which,
                                                       message):
    key = {"public": keys[1], "missing": tmp_path / "nope.key",
           "text": tmp_path / "notes.txt"}[which]
    if which == "text":
        key.write_text("hello")
    out = tmp_path / "x.bundle"
    result = invoke(qcexport_main, "bundle", qformer_dir, "--target", "ort-cpu", "-o", out,
                    "--sign", key)
    clean_error(result, "trust", message)
    assert not out.exists()


def test_signature_covers_every_file(signed_copy, keys, corrupt):
    """bundle.json lists every file's hash, so a signature of it covers the model too."""
    corrupt(signed_copy / "golden" / "b1_t49_text.npz")
    result = invoke(qcrun_main, "verify", signed_copy, "--trust", keys[1])
    clean_error(result, "bundle", "golden/b1_t49_text.npz: modified")


def test_open_bundle_damage_is_not_trust(signed_copy):
    (signed_copy / "bundle.json").write_text("{")
    with pytest.raises(BundleDamaged, match="bundle.json: unreadable"):
        open_bundle(signed_copy)


def test_a_host_policy_file_judges_on_the_device_only_when_signed(tmp_path, qformer_dir, keys):
    policy = tmp_path / "host-policy.json"
    policy.write_text(json.dumps({"format": 1, "defaults": {"fp32": {"max_abs": 0.5}}}))
    result = make_bundle(qformer_dir, "ort-cpu", output=tmp_path / "p.bundle", cases=1,
                         host_targets=["ort-cpu"], sign=keys[0], policy_file=policy)
    assert result.signed_by == key_id(load_public_key(keys[1]))
    assert result.manifest["tolerances"]["defaults"]["fp32"]["max_abs"] == 0.5
    builtin = TolerancePolicy().resolve("fp32", "ort-cpu")
    with open_bundle(result.path) as bundle:
        assert bundle.policy.resolve("fp32", "ort-cpu") == builtin  # not authenticated yet
        bundle.authenticate(trusted_keys=[keys[1]])
        assert bundle.policy.resolve("fp32", "ort-cpu").max_abs == 0.5
        device = tmp_path / "device-policy.json"
        device.write_text(json.dumps({"format": 1, "defaults": {"fp32": {"max_abs": 2e-4}}}))
        # a policy file the device's user names wins over the bundle's, signed or not
        assert bundle.judging_policy(device).resolve("fp32", "ort-cpu").max_abs == 2e-4
    cli = invoke(qcrun_main, "verify", result.path, "--trust", keys[1], "--policy", device)
    assert cli.exit_code == 0, cli.output
    assert f"policy: {device} (--policy)" in cli.stdout
    report = tmp_path / "r.json"
    assert invoke(qcrun_main, "verify", result.path, "--policy", device, "--json",
                  report).exit_code == 0
    assert all(r["tolerance"]["max_abs"] == 2e-4 for r in json.loads(report.read_text())[
        "records"])


# --- who decides the tolerance: --policy FILE > signed host policy > qcrun's built-in ----------


def test_policy_precedence_on_a_slightly_wrong_model(tmp_path, qformer_dir, keys):
    """A model whose weights are 1% off, bundled and signed with a loose host policy: qcrun's
    built-in fp32 policy fails it; the host's loose policy passes it only when the signature
    is checked with --trust; a --policy file the device's user names wins over both."""
    wrong = Path(shutil.copytree(qformer_dir, tmp_path / "wrong"))
    scale_weights(wrong / "model.onnx", 1.01)
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["model_sha256"] = hashlib.sha256((wrong / "model.onnx").read_bytes()).hexdigest()
    (wrong / "manifest.json").write_text(json.dumps(manifest, indent=2))
    loose, strict = tmp_path / "loose.json", tmp_path / "strict.json"
    loose.write_text(json.dumps({"format": 1, "use_target_profiles": False, "defaults": {
        "fp32": {"max_abs": 0.5, "max_rel": None, "min_cosine": 0.99}}}))
    strict.write_text(json.dumps({"format": 1, "defaults": {"fp32": {"max_abs": 1e-4}}}))
    bundle = make_bundle(wrong, "ort-cpu", output=tmp_path / "wrong.bundle", cases=2,
                         host_targets=["ort-cpu"], sign=keys[0], policy_file=loose).path

    def verify(*extra):
        return invoke(qcrun_main, "verify", bundle, "--target", "ort-cpu", *extra)

    # built-in: the 1% error is far outside fp32's 1e-4
    result = verify()
    clean_error(result, "verify", "parity failed on ort-cpu", fix=False)
    assert "policy: qcrun's built-in tolerances for fp32" in result.stdout
    assert "0 passed, 2 failed" in result.stdout
    # the user's loose file, with or without a signature check
    result = verify("--policy", loose)
    assert result.exit_code == 0, result.output
    assert f"policy: {loose} (--policy)" in result.stdout and "2 passed, 0 failed" in result.stdout
    # the host's loose policy, recorded in the bundle, judges once the signature is trusted
    result = verify("--trust", keys[1])
    assert result.exit_code == 0, result.output
    assert "policy: the host's tolerances recorded in the bundle" in result.stdout
    # ...but a --policy file the device's user names wins over the signed host policy
    result = verify("--trust", keys[1], "--policy", strict)
    clean_error(result, "verify", "parity failed on ort-cpu", fix=False)
    assert f"policy: {strict} (--policy)" in result.stdout
    # qcrun.load judges nothing itself; its bundle reports the same policy as verify would
    with qcrun.load(bundle, target="ort-cpu") as model:
        assert model.bundle.policy == TolerancePolicy()
        assert model.bundle.judging_policy(loose).resolve("fp32", "ort-cpu").max_abs == 0.5
    with qcrun.load(bundle, target="ort-cpu", trusted_keys=[keys[1]]) as model:
        assert model.bundle.policy.resolve("fp32", "ort-cpu").max_abs == 0.5
        assert model.bundle.judging_policy(strict).resolve("fp32", "ort-cpu").max_abs == 1e-4

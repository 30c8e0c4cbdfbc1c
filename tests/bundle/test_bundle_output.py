"""No user file is lost: `qcexport bundle -o OUT` replaces OUT only when it is provably a
bundle this tool wrote (every file in it listed in its bundle.json, with that content); a
failed write (a full disk, simulated by an OSError(ENOSPC) from the write function) leaves the
old output as it was and no temporary behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from qcrun.bundle import pack_archive, verify_bundle
from qcrun.errors import UserError

from qcexport.bundle import make_bundle
from qcexport.cli import main as qcexport_main

FAST = ["--target", "ort-cpu", "--cases", "1", "--host-targets", "ort-cpu"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) with the sha256 of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[path.relative_to(root).as_posix()] = "link:" + os.readlink(path)
        elif path.is_file():
            found[path.relative_to(root).as_posix()] = hashlib.sha256(
                path.read_bytes()).hexdigest()
    return found


def bundle_cli(qformer_dir, out, *extra):
    return CliRunner().invoke(qcexport_main, ["bundle", str(qformer_dir), "-o", str(out),
                                              *FAST, *map(str, extra)])


def refused(result, *parts):
    assert result.exit_code == 1, result.output
    assert "error: bundle: " in result.stderr and "\n  fix: " in result.stderr, result.stderr
    assert "Traceback" not in result.output
    for part in parts:
        assert part in result.stderr, result.stderr


def test_a_directory_of_source_code_is_refused(tmp_path, qformer_dir):
    out = tmp_path / "project"
    out.mkdir()
    (out / "src.py").write_text("print('mine')\n")
    before = snapshot(out)
    refused(bundle_cli(qformer_dir, out), f"{out} exists and is not a bundle; refusing to "
            "replace it (no bundle.json in it)")
    assert snapshot(out) == before


def test_a_bundle_json_beside_user_files_does_not_make_a_bundle(tmp_path, qformer_dir):
    """The old rule (a file named bundle.json) deleted src.py here."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "src.py").write_text("print('mine')\n")
    (out / "bundle.json").write_text('{"name": "my own config"}\n')
    before = snapshot(out)
    refused(bundle_cli(qformer_dir, out), "is not a bundle", "bundle.json: unreadable")
    assert snapshot(out) == before


def test_files_added_to_an_older_bundle_are_named_not_deleted(tmp_path, ov_bundle, qformer_dir):
    out = Path(shutil.copytree(ov_bundle.path, tmp_path / "q.bundle"))
    (out / "notes.txt").write_text("measured on the Orin: 41 ms\n")
    (out / "results").mkdir()
    (out / "results" / "run1.json").write_text("{}")
    before = snapshot(out)
    refused(bundle_cli(qformer_dir, out), "holds what qcexport did not write there",
            "notes.txt (not listed in bundle.json)", "results/run1.json (not listed",
            "refusing to replace it (that would delete them)", "move those files out")
    assert snapshot(out) == before


def test_an_edited_file_of_an_older_bundle_is_named(tmp_path, ov_bundle, qformer_dir):
    out = Path(shutil.copytree(ov_bundle.path, tmp_path / "q.bundle"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["notes"] = "mine"
    (out / "manifest.json").write_text(json.dumps(manifest))
    os.symlink("/etc/hostname", out / "link")
    before = snapshot(out)
    refused(bundle_cli(qformer_dir, out), "manifest.json (changed since the bundle was written)",
            "link (a link)")
    assert snapshot(out) == before


def test_an_unchanged_older_bundle_is_replaced_signed_or_not(tmp_path, signed_bundle, keys,
                                                             qformer_dir):
    out = Path(shutil.copytree(signed_bundle, tmp_path / "q.bundle"))
    result = bundle_cli(qformer_dir, out)
    assert result.exit_code == 0, result.output
    assert not (out / "bundle.sig").exists()  # the new, unsigned one replaced it whole
    assert verify_bundle(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.bundle"]


def test_an_archive_is_replaced_only_when_it_is_ours(tmp_path, ov_bundle, qformer_dir):
    out = tmp_path / "q.bundle.tar.gz"
    out.write_bytes(b"not an archive of ours")
    refused(bundle_cli(qformer_dir, tmp_path / "q.bundle", "--archive"), "is not a bundle")
    assert out.read_bytes() == b"not an archive of ours"
    pack_archive(ov_bundle.path, out)
    result = bundle_cli(qformer_dir, tmp_path / "q.bundle", "--archive")
    assert result.exit_code == 0, result.output
    with tarfile.open(out) as tar:
        assert len(json.loads(tar.extractfile(tar.getmember("q.bundle/bundle.json")).read())[
            "provenance"]["golden"]["cases"]) == 1  # the new one (the old one had 3)


def test_a_file_added_during_the_build_is_not_lost(tmp_path, ov_bundle, qformer_dir):
    """The proof is taken again right before the swap: the build takes a while."""
    out = Path(shutil.copytree(ov_bundle.path, tmp_path / "q.bundle"))

    def meanwhile(stage, seconds, detail):
        if stage == "parity":
            (out / "late.txt").write_text("written while the bundle was built")

    with pytest.raises(UserError, match="late.txt .not listed in bundle.json"):
        make_bundle(qformer_dir, "ort-cpu", output=out, cases=1, host_targets=["ort-cpu"],
                    on_stage=meanwhile)
    assert (out / "late.txt").is_file() and verify_bundle(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.bundle"]  # no staging left


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_a_bundle(tmp_path, ov_bundle, qformer_dir, monkeypatch):
    out = Path(shutil.copytree(ov_bundle.path, tmp_path / "q.bundle"))
    before = snapshot(out)
    import qcrun.files

    monkeypatch.setattr(qcrun.files, "write_atomic", _disk_full)  # bundle.json's writer
    result = bundle_cli(qformer_dir, out)
    refused(result, "writing the bundle failed: No space left on device", f"{out} was not "
            "replaced (it is as it was)", "free space in")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.bundle"]  # no staging left


def test_a_full_disk_while_writing_an_archive(tmp_path, ov_bundle, qformer_dir, monkeypatch):
    out = pack_archive(ov_bundle.path, tmp_path / "q.bundle.tar.gz")
    before = out.read_bytes()
    monkeypatch.setattr(tarfile, "copyfileobj", _disk_full)  # the archive's data writes
    result = bundle_cli(qformer_dir, tmp_path / "q.bundle", "--archive")
    refused(result, "writing the bundle failed: No space left on device")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.bundle.tar.gz"]


def test_a_full_disk_into_a_new_output(tmp_path, qformer_dir, monkeypatch):
    import qcrun.files

    monkeypatch.setattr(qcrun.files, "write_atomic", _disk_full)
    result = bundle_cli(qformer_dir, tmp_path / "new.bundle")
    refused(result, "No space left on device")
    assert list(tmp_path.iterdir()) == []

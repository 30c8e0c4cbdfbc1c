"""Bundle archives are checked while they stream: bundle.json first, then every member against
it from its header, before its data is read or written.

The hostile archives are written here by hand with tarfile and gzip (bombs, links, devices,
escapes, unlisted and oversized members); extraction goes through the real reader
(``open_bundle`` / ``qcrun verify``), and each test checks what reached the disk.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from qcrun.bundle import BundleDamaged, open_bundle, pack_archive
from qcrun.cli import main as qcrun_main

GIB = 1 << 30
TOP = "q.bundle"


def bundle_members(root: Path) -> list[tuple[str, bytes]]:
    """(archive name, data) of a bundle directory, in the order the writer uses: bundle.json
    first, then every listed file."""
    listed = json.loads((root / "bundle.json").read_text())["files"]
    names = ["bundle.json", *sorted(listed)]
    return [(f"{TOP}/{name}", (root / name).read_bytes()) for name in names]


def file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def write_archive(path: Path, members, tail: tuple[tarfile.TarInfo, int] | None = None) -> Path:
    """A .tar.gz of ``members`` ((TarInfo, data or None) or (name, data)). ``tail``: a last
    member whose header claims a size but of which only ``n`` zero bytes follow, as a stream
    that ends there (enough for a reader that stops at the header)."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for member in members:
                info, data = member
                if isinstance(info, str):
                    info = file_info(info, len(data))
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
            if tail is not None:
                info, written = tail
                gz.write(info.tobuf(tarfile.PAX_FORMAT))
                gz.write(b"\0" * written)
                # the stream ends here: no rest of the member, no end-of-archive blocks
                tar.closed = True
    return path


@pytest.fixture(scope="module")
def members(ov_bundle):
    return bundle_members(ov_bundle.path)


def refused(archive: Path, tmp_path: Path, message: str) -> list[str]:
    """Open ``archive`` into a fresh directory: it must be refused with ``message``; returns
    what reached the disk."""
    into = tmp_path / "extracted"
    with pytest.raises(BundleDamaged) as info:
        open_bundle(archive, extract_to=into)
    assert message in str(info.value), str(info.value)
    assert "refusing to extract it" in str(info.value)
    return sorted(p.relative_to(into).as_posix() for p in into.rglob("*") if p.is_file())


def test_the_writer_puts_bundle_json_first_and_round_trips(ov_bundle, tmp_path):
    archive = pack_archive(ov_bundle.path, tmp_path / "q.bundle.tar.gz", arcname=TOP)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[:2] == [TOP, f"{TOP}/bundle.json"]
    assert sorted(names[2:]) == sorted(
        [f"{TOP}/golden", *(name for name, _ in bundle_members(ov_bundle.path)[1:])])
    with open_bundle(archive) as bundle:
        assert bundle.verify().ok and not bundle.verify().extra


def test_a_hand_made_archive_in_the_writer_order_is_accepted(members, tmp_path):
    """The control for every refusal below: the same members, nothing added, extract fine."""
    archive = write_archive(tmp_path / "ok.tar.gz", members)
    with open_bundle(archive, extract_to=tmp_path / "x") as bundle:
        assert bundle.verify().ok


def test_an_unlisted_gigabyte_member_is_refused_at_its_header(members, tmp_path):
    archive = write_archive(tmp_path / "bomb.tar.gz", members[:3],
                            tail=(file_info(f"{TOP}/huge.bin", GIB), 1 << 20))
    assert archive.stat().st_size < 1_500_000  # small on the wire, 1 GiB unpacked
    start = time.perf_counter()
    written = refused(archive, tmp_path, "member 'q.bundle/huge.bin' is not listed in bundle.json")
    assert time.perf_counter() - start < 10
    assert written == [name.removeprefix(f"{TOP}/") for name, _ in members[:3]]
    # the command line: a clean error, nothing ran
    result = CliRunner().invoke(qcrun_main, ["verify", str(archive)])
    assert result.exit_code == 1
    assert "error: bundle: " in result.stderr and "fix: " in result.stderr
    assert "huge.bin' is not listed" in result.stderr and "Traceback" not in result.output


def test_a_listed_member_with_more_bytes_than_listed_is_refused(members, tmp_path):
    listed = dict(members)[f"{TOP}/bundle.json"]
    size = json.loads(listed)["files"]["model.onnx"]["bytes"]
    archive = write_archive(tmp_path / "big.tar.gz", members[:1],
                            tail=(file_info(f"{TOP}/model.onnx", GIB), 1 << 20))
    written = refused(archive, tmp_path, f"member 'q.bundle/model.onnx' holds {GIB} bytes, more "
                      f"than the {size} bundle.json lists")
    assert "model.onnx" not in written
    # one byte more is refused too
    body = dict(members)[f"{TOP}/model.onnx"] + b"\0"
    archive = write_archive(tmp_path / "one.tar.gz", [*members[:1], (f"{TOP}/model.onnx", body)])
    refused(archive, tmp_path / "one", f"holds {size + 1} bytes, more than the {size}")


@pytest.mark.parametrize("member, message", [
    ((special(f"{TOP}/golden/evil", tarfile.SYMTYPE, "/etc/passwd"), None),
     "is a symbolic link to '/etc/passwd'"),
    ((special(f"{TOP}/golden/hard", tarfile.LNKTYPE, f"{TOP}/model.onnx"), None),
     "is a hard link"),
    ((special(f"{TOP}/null", tarfile.CHRTYPE), None), "is a device"),
    ((special(f"{TOP}/pipe", tarfile.FIFOTYPE), None), "is a FIFO"),
    (("/tmp/qcrun-escape", b"x"), "has an absolute path"),
    ((f"{TOP}/../escape", b"x"), "leaves the archive ('..')"),
    (("other/model.onnx", b"x"), "lies outside the bundle's directory 'q.bundle'"),
    ((f"{TOP}/notes.txt", b"mine"), "is not listed in bundle.json"),
    ((special(f"{TOP}/extra", tarfile.DIRTYPE), None),
     "is a directory in which bundle.json lists no"),
])
def test_members_that_are_not_listed_plain_files_are_refused(members, tmp_path, member,
                                                             message):
    archive = write_archive(tmp_path / "bad.tar.gz", [*members[:2], member, *members[2:]])
    written = refused(archive, tmp_path, message)
    # stopped at the bad member: what came after it was never written
    assert written == [name.removeprefix(f"{TOP}/") for name, _ in members[:2]]
    assert not Path("/tmp/qcrun-escape").exists()
    assert not (tmp_path / "escape").exists()


def test_bundle_json_must_come_first(members, tmp_path):
    archive = write_archive(tmp_path / "late.tar.gz", [members[1], members[0], *members[2:]])
    written = refused(archive, tmp_path, "comes before bundle.json, which must be the first file")
    assert written == []


def test_a_member_twice_is_refused(members, tmp_path):
    archive = write_archive(tmp_path / "twice.tar.gz", [*members, members[-1]])
    refused(archive, tmp_path, "comes twice")


def test_a_truncated_archive_is_damage(ov_bundle, tmp_path):
    archive = pack_archive(ov_bundle.path, tmp_path / "q.bundle.tar.gz")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleDamaged, match="cannot be read as .tar.gz"):
        open_bundle(archive)

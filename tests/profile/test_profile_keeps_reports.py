"""A failed profile never replaces a previous good report, a full disk is a clean error, and
sizes whose inputs would not fit in memory are refused before anything is allocated."""

from __future__ import annotations

import errno
import os

import pytest
from click.testing import CliRunner
from qcrun import files
from qcrun.cli import main as qcrun_main
from qcrun.engines import availability
from qcrun.latency import input_memory_bound
from qcrun.targets import list_targets

FAST = ["--runs", "3", "--warmup", "1", "--op-runs", "0", "--gemm-sizes", "0"]


def qcrun(*args):
    return CliRunner().invoke(qcrun_main, [str(a) for a in args])


@pytest.fixture
def good_reports(toy_dir, tmp_path):
    paths = {"--json": tmp_path / "p.json", "--html": tmp_path / "p.html",
             "--markdown": tmp_path / "p.md"}
    args = [a for flag, path in paths.items() for a in (flag, path)]
    result = qcrun("profile", toy_dir, "--target", "ort-cpu", "--tokens", "9", *FAST, *args)
    assert result.exit_code == 0, result.output
    return args, {p: p.read_bytes() for p in paths.values()}


@pytest.mark.slow
def test_a_profile_where_nothing_ran_keeps_the_previous_report(toy_dir, good_reports):
    absent = [t.name for t in list_targets() if not availability(t)[0]]
    if not absent:
        pytest.skip("every target runs on this machine")
    args, before = good_reports
    result = qcrun("profile", toy_dir, "--target", absent[0], *FAST, *args)
    assert result.exit_code == 1
    assert "no target could run here" in result.stderr
    assert "the report files were not written (a previous report is kept)" in result.stderr
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.slow
def test_a_full_disk_is_a_clean_error_that_keeps_the_file(toy_dir, good_reports, monkeypatch):
    args, before = good_reports

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "write_atomic", full)
    result = qcrun("profile", toy_dir, "--target", "ort-cpu", "--tokens", "9", *FAST, *args)
    assert result.exit_code == 1
    assert "error: report: could not write" in result.stderr
    assert "No space left on device" in result.stderr and "is unchanged" in result.stderr
    assert "Traceback" not in result.output
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("flag", ["--tokens", "--batch"])
def test_huge_sizes_are_refused_naming_the_bound_and_the_flag(toy_dir, flag):
    result = qcrun("profile", toy_dir, "--target", "ort-cpu", flag, "1000000000000", *FAST)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and result.exception.__class__ is SystemExit
    bound = f"{input_memory_bound() / 2**30:.3g} GiB per shape"
    assert f"over the bound of {bound}" in result.stderr
    assert f"fix: lower {flag}" in result.stderr


def test_the_bound_is_an_eighth_of_memory_at_most_4_gib():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert input_memory_bound() == min(total // 8, 4 * 2**30)

"""replace_dir: a staged directory takes the place of an output only if the old one is ours."""

from __future__ import annotations

import errno
import os

import pytest

from qcexport import replace
from qcexport.replace import replace_dir


def _staged(root, name="new", text="new"):
    staged = root / f".{name}.staged"
    staged.mkdir()
    (staged / "a.txt").write_text(text)
    return staged


def _ours(path):
    if (path / "user.txt").exists():
        raise ValueError(f"{path} holds user.txt")


def test_a_new_output_is_renamed_into_place(tmp_path):
    replace_dir(_staged(tmp_path), tmp_path / "out", _ours)
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_old_output_of_ours_is_replaced_and_removed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    replace_dir(_staged(tmp_path), tmp_path / "out", _ours)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_old_output_that_is_not_ours_is_left_as_it_was(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "user.txt").write_text("mine")
    staged = _staged(tmp_path)
    with pytest.raises(ValueError, match="user.txt"):
        replace_dir(staged, tmp_path / "out", _ours)
    assert (tmp_path / "out" / "user.txt").read_text() == "mine"
    assert staged.is_dir()  # the caller removes its staging


def test_a_failed_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the staged directory's rename
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(replace.os, "replace", second_fails)
    with pytest.raises(OSError):
        replace_dir(_staged(tmp_path), tmp_path / "out", _ours)
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new.staged", "out"]

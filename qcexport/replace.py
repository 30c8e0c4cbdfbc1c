"""Replacing an output directory (a bundle, a golden set, a report's images) with a complete
new one, written beside it first, without ever losing what the tool did not write there."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def replace_dir(new: Path, final: Path, check: Callable[[Path], None]) -> None:
    """Put the complete directory ``new`` (on the same file system, e.g. a hidden sibling) at
    ``final`` by renames.

    An existing ``final`` is first given to ``check``, which raises when it is not provably
    the tool's own (a file someone added, another tool's directory): it runs here, right
    before the swap, because the new one took a while to build. The old directory is then
    moved aside, ``new`` renamed into its place (the old one put back if that fails), and only
    then the old one deleted, so a failure leaves the old output or the new one, never half.
    """
    old = None
    if final.exists() or final.is_symlink():
        check(final)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

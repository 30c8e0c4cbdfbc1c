"""A matrix cell's result: what ``qcrun verify --cell ID --json F`` and ``qcrun profile --cell
ID --json F`` write, so that ``qcexport matrix merge`` can put results from many devices into
one report.

A parity/latency matrix is planned on the host as cells (model x precision x target), each
with a stable id and the bundle it runs. A device runs one cell and writes a ``CellResult``:
the cell id, the digest of the bundle it really ran (the sha256 of the bundle's
``bundle.json`` file as read here, never the digest the bundle records about itself, so that
``sha256sum NAME.bundle/bundle.json`` gives the same value), the device it ran on, the engine
versions, and the command's own report (a parity or profile report, as ``--json`` writes it
without ``--cell``). When the command fails before it has a report (a damaged bundle, a target
that failed to profile), the result carries the error instead, so the matrix says why rather
than "no result".

The merge re-reads the report with its own schema and judges it again; nothing in this file
decides a verdict by itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

from qcrun import machine
from qcrun.errors import UserError

FORMAT = 1
KIND = "qcrun-cell-result"
CHECKS = ("verify", "profile")
#: A cell id: what file names, CI artifact names and job names all accept.
CELL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: Set by a CI job to name the runner (e.g. ``${{ runner.name }}``); the hostname otherwise.
DEVICE_ENV = "QCRUN_DEVICE"


@dataclass(frozen=True)
class Device:
    """The machine a cell ran on (``qcrun.machine``), with the label a CI runner gives it."""

    WRITE_NULLS: ClassVar[bool] = True

    name: str  # $QCRUN_DEVICE, else the hostname: what the report groups latency by
    hostname: str
    cpu: str
    cpu_flags: list[str]
    logical_cpus: int | None
    physical_cores: int | None
    memory_bytes: int | None
    platform: str
    arch: str
    python: str
    board: str | None = None  # /proc/device-tree/model, e.g. "NVIDIA Jetson AGX Orin"


@dataclass(frozen=True)
class CellResult:
    """One check (verify or profile) of one matrix cell on one device.

    ``report`` is the command's report as JSON data (``ParityReport.to_dict`` or
    ``ProfileReport.to_dict``), re-read by the merge with that report's own schema; ``error``
    replaces it when the command failed before it had one.
    """

    VERSION_KEY: ClassVar[str] = "format"
    VERSIONS: ClassVar[tuple[int, ...]] = (FORMAT,)
    WRITE_NULLS: ClassVar[bool] = True

    format: int
    kind: Literal["qcrun-cell-result"]
    cell: str
    check: Literal["verify", "profile"]
    created: str  # UTC, ISO 8601: a repeated cell keeps its newest result
    subject: str  # the bundle (or model directory) as given on the command line
    bundle_sha256: str | None  # None: the subject is not a bundle (or bundle.json is unreadable)
    targets: list[str]
    device: Device
    engines: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    error: str | None = None


def check_cell_id(cell: str) -> str:
    """``cell`` when it is a valid cell id, else a UserError."""
    if not CELL_ID.match(cell or ""):
        raise UserError(f"--cell {cell!r} is not a cell id (letters, digits, '.', '_', '-'; at "
                        "most 200)", stage="cell",
                        hint="pass the id `qcexport matrix plan` wrote for the cell")
    return cell


def bundle_digest(path: str | Path) -> str | None:
    """sha256 of the ``bundle.json`` of the bundle at ``path`` (directory or .tar.gz), as read
    here; None when ``path`` is not a bundle or its bundle.json cannot be read."""
    from qcrun.bundle import BUNDLE_MANIFEST, is_bundle, open_bundle

    path = Path(path)
    if not is_bundle(path):
        return None
    if path.is_dir():
        try:
            return hashlib.sha256((path / BUNDLE_MANIFEST).read_bytes()).hexdigest()
        except OSError:
            return None
    try:  # an archive: its bundle.json as extracted and checked by qcrun.bundle
        with open_bundle(path) as bundle:
            return hashlib.sha256(bundle.raw).hexdigest()
    except (UserError, OSError):
        return None


def this_device() -> Device:
    hw, sw = machine.hardware(), machine.software()
    hostname = str(hw.get("hostname") or platform.node())
    return Device(
        name=os.environ.get(DEVICE_ENV, "").strip() or hostname,
        hostname=hostname,
        cpu=str(hw["cpu"]),
        cpu_flags=list(hw["cpu_flags"]),
        logical_cpus=hw["logical_cpus"],
        physical_cores=hw["physical_cores"],
        memory_bytes=hw["memory_bytes"],
        platform=str(sw["platform"]),
        arch=str(sw["machine"]),
        python=str(sw["python"]),
        board=_board(),
    )


def _board() -> str | None:
    try:
        text = Path("/proc/device-tree/model").read_bytes().rstrip(b"\x00").decode()
    except (OSError, UnicodeDecodeError):
        return None
    return text.strip() or None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")  # noqa: UP017 (3.10)


@dataclass
class CellStamp:
    """The ``--cell`` of one command run: turns its report into a ``CellResult`` JSON text,
    and remembers whether it did (so that a failure after the report keeps the report)."""

    cell: str
    check: str
    subject: Path
    targets: list[str]
    written: bool = False

    def result(self, report: dict[str, Any] | None = None, error: str | None = None
               ) -> CellResult:
        return CellResult(format=FORMAT, kind=KIND, cell=self.cell, check=self.check,
                          created=now(), subject=str(self.subject),
                          bundle_sha256=bundle_digest(self.subject), targets=self.targets,
                          device=this_device(), engines=machine.versions(), report=report,
                          error=error)

    def text(self, report: dict[str, Any] | None = None, error: str | None = None) -> str:
        from qcrun.schema import dump

        self.written = self.written or report is not None
        return json.dumps(dump(self.result(report, error)), indent=2) + "\n"


_ACTIVE: contextvars.ContextVar[CellStamp | None] = contextvars.ContextVar("qcrun_cell",
                                                                           default=None)


@contextlib.contextmanager
def stamping(stamp: CellStamp) -> Iterator[CellStamp]:
    """Make ``stamp`` the cell of the reports written inside (``report_json``)."""
    token = _ACTIVE.set(stamp)
    try:
        yield stamp
    finally:
        _ACTIVE.reset(token)


def report_json(report: dict[str, Any]) -> str:
    """The JSON text a command's ``--json`` writes for ``report``: the report itself, or, when
    the command runs with ``--cell``, the ``CellResult`` that carries it."""
    stamp = _ACTIVE.get()
    if stamp is None:
        return json.dumps(report, indent=2) + "\n"
    return stamp.text(report)


def read_result(path: str | Path) -> CellResult:
    """A result file as a ``CellResult``, or a UserError saying why it is not one."""
    from qcrun.schema import parse, read_json

    data = read_json(Path(path), what="cell result", stage="merge")
    if isinstance(data, dict) and data.get("kind") != KIND:
        raise UserError(f"{path} is not a cell result (kind {data.get('kind')!r})",
                        stage="merge", hint="pass files written by `qcrun verify --cell ID "
                        "--json F` or `qcrun profile --cell ID --json F`")
    return parse(CellResult, data, where=f"cell result {path}", stage="merge")

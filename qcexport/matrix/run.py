"""Running a plan's cells on this machine, as a device job would: ``qcrun verify`` and
``qcrun profile`` of each cell's bundle in child processes, each writing its cell result.

Verify runs of different cells go in parallel (``jobs`` processes); profiles run one at a
time after them, because latency measured beside other work measures the other work. A cell
whose target cannot run here (``qcrun.engines.availability``) is not run, and the reason is
returned, so the merge reports it as "no result" unless it runs elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qcrun.engines import availability

from qcexport.matrix.plan import Cell, MatrixPlan, cell_commands

Say = Callable[[str], None]
#: The executable a device calls ``qcrun``; here, the qcrun of this Python.
QCRUN = (sys.executable, "-m", "qcrun.cli")


@dataclass(frozen=True)
class CommandRun:
    cell: str
    check: str
    argv: list[str]
    returncode: int
    seconds: float
    output: str  # the last lines of its output, for a failure


@dataclass(frozen=True)
class RunSummary:
    ran: list[CommandRun]
    not_here: dict[str, str]  # cell id -> why it cannot run on this machine

    def failed(self) -> list[CommandRun]:
        return [r for r in self.ran if r.returncode != 0]


def runnable(plan: MatrixPlan, cells: Sequence[str] = ()) -> tuple[list[Cell], dict[str, str]]:
    """The plan's cells (those named in ``cells``, default all) this machine can run, and
    why each other one cannot."""
    chosen = [c for c in plan.cells if not cells or c.id in cells]
    here, not_here = [], {}
    for cell in chosen:
        ok, reason = availability(cell.target)
        if ok:
            here.append(cell)
        else:
            not_here[cell.id] = f"{cell.target} is not available here: {reason}"
    return here, not_here


def run_cells(plan: MatrixPlan, cells: Sequence[Cell], workdir: Path, *, jobs: int = 1,
              say: Say = lambda _: None) -> list[CommandRun]:
    """Run the device commands of ``cells`` from ``workdir`` (bundles already built)."""
    (workdir / plan.results_dir).mkdir(parents=True, exist_ok=True)
    commands = []
    for cell in cells:
        bundle = f"{plan.bundles_dir}/{plan.bundle(cell.bundle).path}"
        for argv in cell_commands(cell, bundle, plan.results_dir, plan.profile_args):
            commands.append((cell, argv))
    verifies = [(c, a) for c, a in commands if a[1] == "verify"]
    profiles = [(c, a) for c, a in commands if a[1] != "verify"]
    done: list[CommandRun] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for result in pool.map(lambda job: _run(job[0], job[1], workdir, say), verifies):
            done.append(result)
    for cell, argv in profiles:  # one at a time: see the module docstring
        done.append(_run(cell, argv, workdir, say))
    return done


def _run(cell: Cell, argv: list[str], workdir: Path, say: Say) -> CommandRun:
    start = time.perf_counter()
    proc = subprocess.run([*QCRUN, *argv[1:]], cwd=workdir, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    verdict = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    say(f"{cell.id} {argv[1]}: {verdict} ({seconds:.1f} s)")
    return CommandRun(cell.id, argv[1], argv, proc.returncode, seconds, tail)

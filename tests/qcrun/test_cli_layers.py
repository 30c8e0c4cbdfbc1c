"""The two command lines share one kit and one spelling of the target option.

qcrun is the lower layer: qcexport's commands import ``qcrun.clikit`` (the error-handling
group and the shared options), never qcrun's own command line (``qcrun.cli``,
``qcrun.commands``), and nothing in qcrun imports qcexport. Every command that takes several
targets reads ``--target T`` (repeatable, each value possibly a comma-separated list) and its
alias ``--targets a,b`` the same way, in both CLIs.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import qcrun
from click.testing import CliRunner
from qcrun.cli import main as qcrun_main

import qcexport
from qcexport.cli import main as qcexport_main

QCEXPORT = Path(qcexport.__file__).parent
QCRUN = Path(qcrun.__file__).parent
QCRUN_CLI = ("qcrun.cli", "qcrun.commands")
FAST = ["--runs", "2", "--warmup", "0", "--op-runs", "0", "--gemm-sizes", "0"]
TARGETS = ["ort-cpu", "onnx-reference"]
# Every way to name the two targets: both spellings, as a comma list and repeated.
SPELLINGS = {
    "target-comma": ["--target", "ort-cpu,onnx-reference"],
    "target-repeated": ["--target", "ort-cpu", "--target", "onnx-reference"],
    "targets-comma": ["--targets", "ort-cpu,onnx-reference"],
    "targets-repeated": ["--targets", "ort-cpu", "--targets", "onnx-reference"],
    "mixed": ["--targets", "ort-cpu", "--target", "onnx-reference"],
}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source``: ``import a.b``, ``from a import b``
    (as ``a.b``, since b may be a module) and ``importlib.import_module("a.b")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def offenders(package: Path, forbidden: tuple[str, ...]) -> list[str]:
    """``file:line module`` for each import of a forbidden module (or one inside it), once
    per line."""
    bad: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for line, module in imported_modules(path.read_text()):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.setdefault(f"{path.relative_to(package.parent)}:{line}", module)
    return [f"{where} {module}" for where, module in bad.items()]


def test_the_import_check_finds_every_form_of_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "bad.py").write_text(
        "from qcrun.cli import main\n"
        "import qcrun.commands.verify\n"
        "from qcrun import cli\n"
        "def f():\n    from qcrun import commands\n"
        "import importlib\nimportlib.import_module('qcrun.cli')\n"
    )
    (package / "good.py").write_text(
        "from qcrun.clikit import UserErrorGroup\nimport qcrun.clikit\nfrom qcrun import clikit\n"
        "import qcrun.client_tools\n"
    )
    assert offenders(package, QCRUN_CLI) == [
        "pkg/bad.py:1 qcrun.cli", "pkg/bad.py:2 qcrun.commands.verify", "pkg/bad.py:3 qcrun.cli",
        "pkg/bad.py:5 qcrun.commands", "pkg/bad.py:7 qcrun.cli",
    ]


def test_qcexport_never_imports_the_qcrun_command_line():
    assert offenders(QCEXPORT, QCRUN_CLI) == []
    assert len(list((QCEXPORT / "commands").glob("*.py"))) >= 9  # the scan saw the commands


def test_qcrun_never_imports_qcexport():
    assert offenders(QCRUN, ("qcexport",)) == []
    assert len(list((QCRUN / "commands").glob("*.py"))) >= 4


def test_loading_the_qcexport_cli_loads_no_qcrun_cli():
    """The same at run time, which also sees imports the scan cannot (a name built at run
    time): every qcexport command is registered, and qcrun's command line stays unloaded."""
    script = ("import json, sys\nfrom qcexport.cli import main\n"
              "print(json.dumps({'commands': sorted(main.commands), 'loaded': sorted("
              "m for m in sys.modules if m == 'qcrun.cli' or m.startswith('qcrun.commands'))}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "commands": ["bundle", "convert", "diff", "golden", "inspect", "ir", "keygen", "list",
                     "matrix", "parity", "profile", "quantize"],
        "loaded": [],
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, linear, lib):
    return lib.write_model_dir(tmp_path_factory.mktemp("spelling") / "linear-tiny",
                               linear.model, linear.golden, mechanism="linear")


def _ran_on_both(report: dict) -> None:
    """Both targets asked for, both required (named, not optional), every record a pass."""
    assert report["targets"] == TARGETS and report["required"] == TARGETS
    assert {(r["target"], r["verdict"]) for r in report["records"]} == {
        (t, "pass") for t in TARGETS}


def _invoke(main, *args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_qcrun_verify_reads_both_spellings(model_dir, tmp_path, spelling):
    report = tmp_path / "r.json"
    _invoke(qcrun_main, "verify", model_dir, *SPELLINGS[spelling], "--json", report)
    _ran_on_both(json.loads(report.read_text()))


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_qcexport_parity_reads_both_spellings(model_dir, tmp_path, spelling):
    report = tmp_path / "r.json"
    _invoke(qcexport_main, "parity", model_dir, *SPELLINGS[spelling], "--golden",
            model_dir / "golden", "--json", report)
    _ran_on_both(json.loads(report.read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["target-repeated", "targets-comma"])
@pytest.mark.parametrize("cli", ["qcrun", "qcexport"])
def test_profile_reads_both_spellings(model_dir, tmp_path, cli, spelling):
    report = tmp_path / "p.json"
    main = qcrun_main if cli == "qcrun" else qcexport_main
    _invoke(main, "profile", model_dir, *SPELLINGS[spelling], *FAST, "--json", report)
    profiled = json.loads(report.read_text())["targets"]
    assert [(t["target"], t["status"]) for t in profiled] == [(t, "ok") for t in TARGETS]


@pytest.mark.parametrize("command", [
    (qcrun_main, "verify"), (qcrun_main, "profile"), (qcexport_main, "parity"),
    (qcexport_main, "profile"),
])
@pytest.mark.parametrize("flag", ["--target", "--targets"])
def test_an_unknown_target_is_refused_under_either_spelling(model_dir, command, flag):
    main, name = command
    result = CliRunner().invoke(main, [name, str(model_dir), flag, "ort-cpu,nope"])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: unknown target 'nope'"), result.stderr
    assert "Traceback" not in result.output

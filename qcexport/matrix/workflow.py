"""CI workflows generated from a plan: GitHub Actions and GitLab CI.

Three jobs, as a device farm runs today (self-hosted runners labelled per device):

1. **build** (a hosted runner): checks that the plan file is the one the workflow was made
   from (its sha256), makes every bundle (``qcexport matrix build``) and uploads each as an
   artifact, plus one small artifact with every ``bundle.json`` for the merge;
2. **device**, one job per cell (a GitHub job matrix whose ``include`` is the plan's cells;
   ``runs-on`` from the target's runner labels): installs qcrun with the target's engine,
   downloads its bundle, runs the cell's commands and uploads its results, even on failure;
3. **merge** (runs even when device jobs failed): ``qcexport matrix merge`` over every result,
   the Markdown as the job summary (and a pull-request comment), the report as an artifact;
   its exit status is the gate.

The YAML is written by a small emitter (block style, every string quoted where YAML could
read it as something else), so qcexport needs no YAML library.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

from qcexport.matrix.plan import MatrixPlan

WORKFLOWS = ("github", "gitlab")
DEFAULT_PATHS = {"github": ".github/workflows/qcexport-matrix.yml", "gitlab": ".gitlab-ci.yml"}
PYTHON = "3.11"
#: GitHub-only labels that are no GitLab runner tag.
_GITHUB_LABELS = ("self-hosted", "ubuntu-latest", "linux", "x64", "arm64")


def _shell(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _device_script(plan: MatrixPlan, cell_commands: list[list[str]]) -> str:
    """The commands of a cell, every one run (a failed verify still profiles), failing at the
    end if any failed: the merge judges from the results, the job status is for the log."""
    lines = [f"mkdir -p {plan.results_dir}", "status=0"]
    lines += [f"{_shell(argv)} || status=1" for argv in cell_commands]
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"


def _plan_check(plan_path: str, digest: str) -> str:
    return (f'echo "{digest}  {plan_path}" | sha256sum -c - || {{ echo "::error::{plan_path} '
            "changed since this workflow was generated: run the `qcexport matrix plan` "
            f'command recorded in it again"; exit 1; }}\n')


def _merge_command(plan: MatrixPlan, plan_path: str) -> str:
    return _shell(["qcexport", "matrix", "merge", plan.results_dir, "--plan", plan_path,
                   "--bundles", plan.bundles_dir, "-o", "report"])


# --- GitHub Actions --------------------------------------------------------------------------


_SETUP_PYTHON = {"uses": "actions/setup-python@v5", "with": {"python-version": PYTHON}}


def github_workflow(plan: MatrixPlan, plan_path: str) -> dict[str, Any]:
    """The workflow as data (``to_yaml`` writes it); its device matrix is the plan's cells."""
    return {
        "name": "qcexport parity matrix",
        "on": {"pull_request": {}, "workflow_dispatch": {}},
        "jobs": {"build": _github_build(plan, plan_path), "device": _github_device(plan),
                 "merge": _github_merge(plan, plan_path)},
    }


def _github_build(plan: MatrixPlan, plan_path: str) -> dict[str, Any]:
    upload_bundles = [{
        "name": f"upload bundle {b.id}", "uses": "actions/upload-artifact@v4",
        "with": {"name": f"bundle-{b.id}", "path": f"{plan.bundles_dir}/{b.path}",
                 "if-no-files-found": "error"}} for b in plan.bundles]
    manifests = [f"{plan.bundles_dir}/{b.path}/bundle.json" for b in plan.bundles]
    return {
        "runs-on": "ubuntu-latest",
        "steps": [
            {"uses": "actions/checkout@v4"},
            _SETUP_PYTHON,
            {"name": "plan unchanged", "run": _plan_check(plan_path, plan.sha256())},
            {"name": "install qcexport", "run": plan.host_setup + "\n"},
            {"name": "build bundles", "run": _shell(["qcexport", "matrix", "build", plan_path])
             + "\n"},
            *upload_bundles,
            # the merge needs only each bundle.json (its digest), kept in its bundle's folder
            {"name": "collect bundle manifests",
             "run": _shell(["tar", "-cf", "bundle-manifests.tar", *manifests]) + "\n"},
            {"name": "upload bundle manifests", "uses": "actions/upload-artifact@v4",
             "with": {"name": "bundle-manifests", "path": "bundle-manifests.tar"}},
        ],
    }


def _github_device(plan: MatrixPlan) -> dict[str, Any]:
    include = [{"cell": c.id, "bundle": c.bundle, "target": c.target, "runs-on": c.runs_on,
                "setup": c.setup, "required": c.required,
                "script": _device_script(plan, c.commands)} for c in plan.cells]
    return {
        "needs": "build",
        "name": "${{ matrix.cell }}",
        "runs-on": "${{ matrix.runs-on }}",
        "continue-on-error": "${{ !matrix.required }}",
        "strategy": {"fail-fast": False, "matrix": {"include": include}},
        "env": {"QCRUN_DEVICE": "${{ runner.name }}"},
        "steps": [
            {**_SETUP_PYTHON, "if": "${{ !contains(matrix.runs-on, 'self-hosted') }}"},
            {"name": "install qcrun", "run": "${{ matrix.setup }}\n"},
            {"uses": "actions/download-artifact@v4",
             "with": {"name": "bundle-${{ matrix.bundle }}",
                      "path": f"{plan.bundles_dir}/${{{{ matrix.bundle }}}}.bundle"}},
            {"name": "run cell", "run": "${{ matrix.script }}"},
            {"name": "upload results", "if": "${{ always() }}",
             "uses": "actions/upload-artifact@v4",
             "with": {"name": "result-${{ matrix.cell }}", "path": f"{plan.results_dir}/",
                      "if-no-files-found": "ignore"}},
        ],
    }


def _github_merge(plan: MatrixPlan, plan_path: str) -> dict[str, Any]:
    comment = ('gh pr comment "${{ github.event.pull_request.number }}" --body-file '
               "report/matrix.md")
    return {
        "needs": ["build", "device"],
        "if": "${{ always() }}",
        "runs-on": "ubuntu-latest",
        "permissions": {"contents": "read", "pull-requests": "write"},
        "steps": [
            {"uses": "actions/checkout@v4"},
            _SETUP_PYTHON,
            {"name": "install qcexport", "run": plan.host_setup + "\n"},
            {"uses": "actions/download-artifact@v4", "with": {"name": "bundle-manifests"}},
            {"name": "unpack bundle manifests", "run": "tar -xf bundle-manifests.tar\n"},
            {"uses": "actions/download-artifact@v4",
             "with": {"pattern": "result-*", "path": plan.results_dir,
                      "merge-multiple": True}},
            {"name": "merge", "id": "merge",
             "run": f"{_merge_command(plan, plan_path)} || status=$?\n"
                    'cat report/matrix.md >> "$GITHUB_STEP_SUMMARY"\n'
                    'exit "${status:-0}"\n'},
            {"name": "comment on the pull request",
             "if": "${{ always() && github.event_name == 'pull_request' }}",
             "env": {"GH_TOKEN": "${{ github.token }}"},
             "run": f"{comment} --edit-last || {comment}\n"},
            {"name": "upload report", "if": "${{ always() }}",
             "uses": "actions/upload-artifact@v4",
             "with": {"name": "matrix-report", "path": "report/"}},
        ],
    }


# --- GitLab CI -------------------------------------------------------------------------------


def gitlab_pipeline(plan: MatrixPlan, plan_path: str) -> dict[str, Any]:
    """The pipeline as data: one device job per cell (explicit jobs, so each has its tags)."""
    image = f"python:{PYTHON}"
    pipeline: dict[str, Any] = {
        "stages": ["build", "device", "merge"],
        "matrix-build": {
            "stage": "build", "image": image,
            "script": [_plan_check(plan_path, plan.sha256()).strip(), plan.host_setup,
                       _shell(["qcexport", "matrix", "build", plan_path])],
            "artifacts": {"paths": [f"{plan.bundles_dir}/"]},
        },
    }
    device_jobs = []
    for cell in plan.cells:
        tags = [t for t in cell.runs_on if t not in _GITHUB_LABELS]
        job: dict[str, Any] = {
            "stage": "device", "needs": ["matrix-build"],
            "variables": {"QCRUN_DEVICE": "$CI_RUNNER_DESCRIPTION"},
            "script": [cell.setup, _device_script(plan, cell.commands)],
            "artifacts": {"when": "always", "paths": [f"{plan.results_dir}/"]},
        }
        if tags:
            job["tags"] = tags
        else:
            job["image"] = image
        if not cell.required:
            job["allow_failure"] = True
        name = f"cell {cell.id}"
        pipeline[name] = job
        device_jobs.append(name)
    pipeline["matrix-merge"] = {
        "stage": "merge", "image": image, "when": "always",
        "needs": [{"job": "matrix-build", "artifacts": True},
                  *({"job": j, "artifacts": True} for j in device_jobs)],
        "script": [plan.host_setup, _merge_command(plan, plan_path)],
        "artifacts": {"when": "always", "paths": ["report/"],
                      "reports": {"junit": "report/junit.xml"}},
    }
    return pipeline


# --- YAML ------------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_./][A-Za-z0-9_./ -]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED and not text.endswith(" "):
        return text
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


def _key(key: str) -> str:
    # `on` as a key is a boolean in YAML 1.1 readers; GitHub reads it, but quoting is safe
    return _scalar(key) if key != "on" else '"on"'


def to_yaml(data: Any, indent: int = 0) -> str:
    """Block-style YAML of plain data (dicts, lists, strings, numbers, booleans)."""
    return "\n".join(_lines(data, indent)) + "\n"


def _lines(data: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(data, dict):
        if not data:
            return [pad + "{}"]
        out = []
        for key, value in data.items():
            out += _entry(f"{pad}{_key(str(key))}:", value, indent)
        return out
    if isinstance(data, list):
        if not data:
            return [pad + "[]"]
        out = []
        for item in data:
            inner = _lines(item, indent + 2)
            out.append(pad + "- " + inner[0][indent + 2:])
            out += inner[1:]
        return out
    return [pad + _scalar(data)]


def _entry(head: str, value: Any, indent: int) -> list[str]:
    if isinstance(value, str) and "\n" in value:
        body = value if value.endswith("\n") else value + "\n"
        chomp = "" if value.endswith("\n") else "-"
        lines = [f"{head} |{chomp}"]
        lines += [(" " * (indent + 2) + line) if line else "" for line in body[:-1].split("\n")]
        return lines
    if isinstance(value, dict) and value:
        return [head, *_lines(value, indent + 2)]
    if isinstance(value, list) and value:
        if all(not isinstance(v, (dict, list)) and not (isinstance(v, str) and "\n" in v)
               for v in value) and len(value) <= 6:
            return [f"{head} [{', '.join(_scalar(v) for v in value)}]"]
        return [head, *_lines(value, indent + 2)]
    return [f"{head} {_lines(value, 0)[0]}"]


def render(kind: str, plan: MatrixPlan, plan_path: str) -> str:
    data = github_workflow(plan, plan_path) if kind == "github" else gitlab_pipeline(plan,
                                                                                     plan_path)
    header = (f"# Generated by `qcexport matrix plan` from {plan_path} (sha256 "
              f"{plan.sha256()[:16]}...).\n# Edit the plan and generate again rather than "
              "editing this file.\n")
    return header + to_yaml(data)

"""qcexport matrix plan: cells, bundles and the generated CI workflows (no model is built)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qcexport.cli import main
from qcexport.matrix.plan import read_plan

CHECK_JSONSCHEMA = shutil.which("check-jsonschema") or str(
    Path(sys.executable).parent / "check-jsonschema")


def _plan(tmp_path: Path, *args: str) -> tuple[object, Path]:
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["matrix", "plan", "-o", str(out), *args])
    return result, out


def test_plan_cells_ids_and_shared_bundles(tmp_path):
    result, out = _plan(tmp_path, "--models", "qformer:tiny,perceiver", "--precisions",
                        "fp32,int8-dynamic", "--targets", "ort-cpu,openvino-cpu,jetson-orin",
                        "--optional", "jetson-orin")
    assert result.exit_code == 0, result.output
    plan = read_plan(out)
    ids = [c.id for c in plan.cells]
    # jetson-orin (TensorRT) has no int8-dynamic: left out, with the reason
    assert "qformer-tiny.int8-dynamic.jetson-orin" not in ids
    assert any("int8-dynamic on jetson-orin" in line for line in plan.not_planned)
    assert len(ids) == 2 * (3 + 2) == len(set(ids))
    cell = plan.cell("perceiver-tiny.fp32.openvino-cpu")
    # the CPU targets read one bundle; TensorRT gets its own (decomposed, shape ranges)
    assert cell.bundle == "perceiver-tiny.fp32.ort-cpu"
    assert plan.cell("perceiver-tiny.fp32.jetson-orin").bundle == "perceiver-tiny.fp32.jetson-orin"
    assert plan.cell("perceiver-tiny.fp32.jetson-orin").runs_on == ["self-hosted", "jetson-orin"]
    assert not plan.cell("perceiver-tiny.fp32.jetson-orin").required
    assert cell.commands[0] == [
        "qcrun", "verify", "bundles/perceiver-tiny.fp32.ort-cpu.bundle", "--target",
        "openvino-cpu", "--cell", "perceiver-tiny.fp32.openvino-cpu", "--json",
        "results/perceiver-tiny.fp32.openvino-cpu.verify.json"]
    # planning again gives the same file: ids and the workflow's plan digest are stable
    again, out2 = _plan(tmp_path / "again", "--models", "qformer:tiny,perceiver",
                        "--precisions", "fp32,int8-dynamic", "--targets",
                        "ort-cpu,openvino-cpu,jetson-orin", "--optional", "jetson-orin")
    assert again.exit_code == 0
    assert [c.id for c in read_plan(out2).cells] == ids


@pytest.mark.parametrize("args, message", [
    (["--models", "nosuch"], "unknown mechanism 'nosuch'"),
    (["--models", "qformer:huge"], "unknown preset 'huge'"),
    (["--models", "qformer", "--targets", "ort-gpu9"], "unknown target 'ort-gpu9'"),
    (["--models", "qformer", "--targets", "ort-cpu", "--precisions", "bf16"],
     "no cell left to plan"),
    (["--models", "qformer", "--runner", "jetson-orin"], "is not TARGET=LABEL"),
])
def test_plan_refuses_bad_input_cleanly(tmp_path, args, message):
    result, out = _plan(tmp_path, *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def _schema_check(path: Path, schema: str) -> None:
    if not Path(CHECK_JSONSCHEMA).exists():
        pytest.skip("check-jsonschema is not installed (pip install -e '.[dev]')")
    proc = subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_github_workflow_matrix_is_the_plan(tmp_path):
    wf = tmp_path / "wf.yml"
    result, out = _plan(tmp_path, "--models", "qformer:tiny", "--targets",
                        "ort-cpu,openvino-cpu,onnx-reference,ort-cuda,jetson-orin",
                        "--runner", "ort-cuda=self-hosted,gpu-a100", "--workflow", "github",
                        "--workflow-file", str(wf))
    assert result.exit_code == 0, result.output
    plan = read_plan(out)
    data = yaml.safe_load(wf.read_text())
    include = data["jobs"]["device"]["strategy"]["matrix"]["include"]
    assert [(i["cell"], i["bundle"], i["target"], i["runs-on"], i["required"])
            for i in include] == [(c.id, c.bundle, c.target, c.runs_on, c.required)
                                  for c in plan.cells]
    runs_on = {i["target"]: i["runs-on"] for i in include}
    assert runs_on == {"ort-cpu": ["ubuntu-latest"], "openvino-cpu": ["ubuntu-latest"],
                       "onnx-reference": ["ubuntu-latest"],
                       "ort-cuda": ["self-hosted", "gpu-a100"],
                       "jetson-orin": ["self-hosted", "jetson-orin"]}
    for item, cell in zip(include, plan.cells, strict=True):
        for argv in cell.commands:
            assert " ".join(argv) in item["script"]
    build_steps = data["jobs"]["build"]["steps"]
    uploads = [s["with"]["name"] for s in build_steps if "upload-artifact" in s.get("uses", "")]
    assert uploads == [f"bundle-{b.id}" for b in plan.bundles] + ["bundle-manifests"]
    # the build job refuses a plan.json other than the one the workflow was made from
    check = next(s["run"] for s in build_steps if s.get("name") == "plan unchanged")
    digest = __import__("hashlib").sha256(out.read_bytes()).hexdigest()
    assert f"{digest}  {out.as_posix()}" in check
    merge = data["jobs"]["merge"]
    assert merge["needs"] == ["build", "device"] and merge["if"] == "${{ always() }}"
    _schema_check(wf, "vendor.github-workflows")


def test_gitlab_pipeline_has_a_job_per_cell(tmp_path):
    ci = tmp_path / "gitlab.yml"
    result, out = _plan(tmp_path, "--models", "qformer:tiny", "--targets",
                        "ort-cpu,jetson-orin", "--workflow", "gitlab", "--workflow-file",
                        str(ci))
    assert result.exit_code == 0, result.output
    plan = read_plan(out)
    data = yaml.safe_load(ci.read_text())
    jobs = {k: v for k, v in data.items() if isinstance(v, dict) and v.get("stage") == "device"}
    assert sorted(jobs) == sorted(f"cell {c.id}" for c in plan.cells)
    assert jobs["cell qformer-tiny.fp32.jetson-orin"]["tags"] == ["jetson-orin"]
    assert "tags" not in jobs["cell qformer-tiny.fp32.ort-cpu"]
    assert data["matrix-merge"]["when"] == "always"
    _schema_check(ci, "vendor.gitlab-ci")


def test_yaml_emitter_round_trips_awkward_strings():
    from qcexport.matrix.workflow import to_yaml

    data = {"on": {"a": "yes", "b": "no: really", "c": "${{ x }}", "d": "1.0", "e": "",
                   "f": "line one\nline two\n", "g": "trailing\nno newline", "h": "# hash",
                   "i": ["- dash", "x: y", True, 3, None], "j": [{"k": "v", "m": ["a\nb"]}],
                   "k": "'quoted'", "l": "@at", "m": "null", "n": "tab\there"}}
    assert yaml.safe_load(to_yaml(data)) == data


def test_plan_file_is_checked_when_read(tmp_path):
    result, out = _plan(tmp_path, "--models", "qformer:tiny", "--targets", "ort-cpu")
    data = json.loads(out.read_text())
    data["cells"][0]["bundle"] = "elsewhere"
    out.write_text(json.dumps(data))
    bad = CliRunner().invoke(main, ["matrix", "merge", "--plan", str(out), "-o",
                                    str(tmp_path / "r")])
    assert bad.exit_code == 1 and "names an unknown bundle" in bad.output


def test_run_says_which_cells_cannot_run_here(tmp_path):
    from qcrun.engines import availability

    if availability("ort-cuda")[0]:
        pytest.skip("this machine runs ort-cuda")
    result, out = _plan(tmp_path, "--models", "qformer:tiny", "--targets", "ort-cuda")
    assert result.exit_code == 0
    run = CliRunner().invoke(main, ["matrix", "run", str(out), "--workdir", str(tmp_path)])
    assert run.exit_code == 1
    assert "cannot run here: qformer-tiny.fp32.ort-cuda: ort-cuda is not available here" \
        in run.output
    assert "no cell of the plan can run on this machine" in run.output
    assert not (tmp_path / "bundles").exists()  # nothing built for cells that cannot run

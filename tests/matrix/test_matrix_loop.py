"""The whole loop on this machine: plan -> build (real `qcexport bundle` of a tiny model) ->
`matrix run` on the CPU targets (real `qcrun verify` / `qcrun profile` processes) -> merge,
then the same results with a missing, a stale, a repeated, a doctored and an unreadable one."""

from __future__ import annotations

import hashlib
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcexport.cli import main

pytestmark = pytest.mark.slow
CPU = ("ort-cpu", "openvino-cpu", "onnx-reference")
CELLS = [f"perceiver-tiny.fp32.{t}" for t in CPU]


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A plan run on this machine: the results every test below starts from (read-only)."""
    work = tmp_path_factory.mktemp("matrix")
    plan = _invoke("matrix", "plan", "--models", "perceiver:tiny", "--targets", ",".join(CPU),
                   "--runs", "3", "-o", str(work / "plan.json"))
    assert plan.exit_code == 0, plan.output
    run = _invoke("matrix", "run", str(work / "plan.json"), "--jobs", "2", "--workdir",
                  str(work))
    assert run.exit_code == 0, run.output
    assert "cannot run here:" not in run.output and "0 cells cannot run here" in run.output
    return work


def _results(workdir: Path, tmp_path: Path) -> Path:
    results = tmp_path / "results"
    shutil.copytree(workdir / "results", results)
    return results


def _merge(workdir: Path, results: Path, out: Path):
    return _invoke("matrix", "merge", str(results), "--plan", str(workdir / "plan.json"),
                   "--bundles", str(workdir / "bundles"), "-o", str(out))


def _cells(out: Path) -> dict[str, dict]:
    return {c["cell"]: c for c in json.loads((out / "matrix.json").read_text())["cells"]}


def test_every_cpu_cell_passes_with_its_bundle_digest(workdir, tmp_path):
    result = _merge(workdir, workdir / "results", tmp_path / "report")
    assert result.exit_code == 0, result.output
    cells = _cells(tmp_path / "report")
    assert sorted(cells) == sorted(CELLS)
    bundle_json = workdir / "bundles" / "perceiver-tiny.fp32.ort-cpu.bundle" / "bundle.json"
    digest = hashlib.sha256(bundle_json.read_bytes()).hexdigest()
    for cell in cells.values():
        assert cell["status"] == "pass", cell
        assert cell["expected_sha256"] == digest
        assert {c["check"] for c in cell["checks"]} == {"verify", "profile"}
        assert all(c["bundle_sha256"] == digest for c in cell["checks"])
        profile = next(c for c in cell["checks"] if c["check"] == "profile")
        assert profile["latency"] and profile["latency"][0]["runs"] == 3
    html = (tmp_path / "report" / "matrix.html").read_text()
    assert "<svg" in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    suites = ET.fromstring((tmp_path / "report" / "junit.xml").read_text())
    assert suites.get("tests") == "3" and suites.get("failures") == "0"
    assert "3 of 3 required cells passed" in (tmp_path / "report" / "matrix.md").read_text()


def test_missing_stale_repeated_and_unreadable_results(workdir, tmp_path):
    results = _results(workdir, tmp_path)
    # missing: openvino-cpu's verify never reported
    (results / f"{CELLS[1]}.verify.json").unlink()
    # stale: onnx-reference's profile ran another bundle (another bundle.json)
    stale = results / f"{CELLS[2]}.profile.json"
    data = json.loads(stale.read_text())
    data["bundle_sha256"] = hashlib.sha256(b"an older bundle.json").hexdigest()
    stale.write_text(json.dumps(data))
    # repeated: an older, failing copy of ort-cpu's verify is ignored for the newer pass
    verify = json.loads((results / f"{CELLS[0]}.verify.json").read_text())
    older = dict(verify, created="2001-01-01T00:00:00+00:00", error="an old failure",
                 report=None)
    (results / "older-copy.json").write_text(json.dumps(older))
    (results / "garbage.json").write_text("{not json")
    out = tmp_path / "report"
    result = _merge(workdir, results, out)
    assert result.exit_code == 1
    assert "1 of 3 required cells passed (1 no result, 1 stale)" in result.output
    cells = _cells(out)
    assert cells[CELLS[0]]["status"] == "pass"
    kept = next(c for c in cells[CELLS[0]]["checks"] if c["check"] == "verify")
    assert kept["replaced"] == 1 and kept["created"] == verify["created"]
    assert cells[CELLS[1]]["status"] == "missing" and cells[CELLS[1]]["label"] == "no result"
    assert cells[CELLS[2]]["status"] == "stale"
    report = json.loads((out / "matrix.json").read_text())
    assert report["passed"] is False
    assert [Path(i["path"]).name for i in report["unreadable"]] == ["garbage.json"]
    markdown = (out / "matrix.md").read_text()
    assert "❓ no result" in markdown and "⚠️ stale" in markdown and "garbage.json" in markdown
    junit = ET.fromstring((out / "junit.xml").read_text())
    kinds = sorted(f.get("type") for f in junit.iter("failure"))
    assert kinds == ["missing", "stale"]


def test_the_verdict_is_recomputed_not_read(workdir, tmp_path):
    """A result whose records say "pass" under a tolerance looser than qcrun's, and one whose
    numbers break the tolerance while claiming a pass, both fail the cell."""
    results = _results(workdir, tmp_path)
    path = results / f"{CELLS[0]}.verify.json"
    data = json.loads(path.read_text())
    record = next(r for r in data["report"]["records"] if r["output"])
    record["tolerance"]["max_abs"] = 10.0
    path.write_text(json.dumps(data))
    other = results / f"{CELLS[1]}.verify.json"
    data = json.loads(other.read_text())
    record = next(r for r in data["report"]["records"] if r["output"])
    record["metrics"]["violations"] = 7
    other.write_text(json.dumps(data))
    out = tmp_path / "report"
    result = _merge(workdir, results, out)
    assert result.exit_code == 1
    cells = _cells(out)
    assert cells[CELLS[0]]["status"] == "fail"
    assert "looser than qcrun's" in " ".join(c["detail"] for c in cells[CELLS[0]]["checks"])
    assert cells[CELLS[1]]["status"] == "fail"
    assert cells[CELLS[2]]["status"] == "pass"


def test_optional_cells_do_not_gate(workdir, tmp_path):
    plan = json.loads((workdir / "plan.json").read_text())
    for cell in plan["cells"]:
        cell["required"] = cell["target"] != "onnx-reference"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "bundles").symlink_to(workdir / "bundles")
    results = _results(workdir, tmp_path)
    (results / f"{CELLS[2]}.verify.json").unlink()
    result = _invoke("matrix", "merge", str(results), "--plan", str(tmp_path / "plan.json"),
                     "--bundles", str(tmp_path / "bundles"), "-o", str(tmp_path / "r"))
    assert result.exit_code == 0, result.output
    assert "(optional)" in result.output


def test_a_damaged_bundle_is_reported_as_the_cells_error(workdir, tmp_path):
    """qcrun verify --cell writes the failure as the result when it has no report."""
    bundle = tmp_path / "b.bundle"
    shutil.copytree(workdir / "bundles" / "perceiver-tiny.fp32.ort-cpu.bundle", bundle)
    (bundle / "model.onnx").write_bytes(b"not the model")
    from qcrun.cli import main as qcrun_main

    out = tmp_path / "r.json"
    result = CliRunner().invoke(qcrun_main, ["verify", str(bundle), "--cell", CELLS[0],
                                             "--json", str(out)])
    assert result.exit_code == 1
    data = json.loads(out.read_text())
    assert data["cell"] == CELLS[0] and data["report"] is None
    assert "model.onnx: modified" in data["error"]
    assert data["bundle_sha256"] == hashlib.sha256(
        (bundle / "bundle.json").read_bytes()).hexdigest()
    missing = CliRunner().invoke(qcrun_main, ["verify", str(bundle), "--cell", CELLS[0]])
    assert missing.exit_code == 1 and "no --json was given" in missing.output

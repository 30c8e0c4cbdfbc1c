"""Empty never passes: a requested target that ran no case fails unless marked optional, and a
run in which no case ran at all fails whatever is optional (JSON, JUnit, exit status).

Which targets run here is read from ``qcrun.engines.availability`` (not from the report under
test), so each test checks the right behaviour on a CPU-only host and on a CUDA host.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner
from qcrun.cli import main
from qcrun.engines import availability
from qcrun.errors import UserError
from qcrun.golden import load_golden
from qcrun.parity import ParityReport, name_list, required_targets, run_parity

GPU_TARGETS = ["ort-cuda", "openvino-gpu"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _absent(names):
    return [n for n in names if not availability(n)[0]]


@pytest.fixture
def model_dir(tmp_path, linear, lib):
    return lib.write_model_dir(tmp_path / "linear-tiny", linear.model, linear.golden,
                               mechanism="linear")


def test_required_targets_and_name_lists():
    assert name_list(["ort-cpu,openvino-cpu", " ort-cuda ", "ort-cpu"]) == [
        "ort-cpu", "openvino-cpu", "ort-cuda"]
    assert required_targets(["ort-cpu", "ort-cuda"], ["ort-cuda"]) == ["ort-cpu"]
    assert required_targets(["ort-cpu", "ort-cuda"]) == ["ort-cpu", "ort-cuda"]
    with pytest.raises(UserError, match="optional target 'ort-cuda' is not among the targets"):
        required_targets(["ort-cpu"], ["ort-cuda"])
    with pytest.raises(UserError, match="ort-cpu is both required and optional"):
        required_targets(["ort-cpu"], ["ort-cpu"], ["ort-cpu"])


def test_a_run_where_every_target_is_skipped_is_not_a_pass(linear):
    absent = _absent(GPU_TARGETS)
    golden = load_golden(linear.golden)
    report = run_parity(linear.model, golden, GPU_TARGETS, optional=GPU_TARGETS)
    ran = [t for t in GPU_TARGETS if t not in absent]
    assert report.counts()["skip"] == len(absent) * len(linear.cases)
    assert report.ran() == bool(ran)
    assert report.passed == bool(ran)
    data = json.loads(report.to_json())
    assert data["passed"] is bool(ran) and data["ran"] is bool(ran)
    assert data["optional"] == GPU_TARGETS
    root = ET.fromstring(report.to_junit_xml())
    skipped = root.findall(".//testcase/skipped")
    assert len(skipped) == len(absent) * len(linear.cases)
    for element in skipped:  # each skip carries the reason availability gives
        assert element.get("message") in {availability(t)[1] for t in absent}
    if not ran:
        assert report.verdict_line().startswith("nothing ran: no case ran on any target")
        assert root.get("failures") == "1"
        failure = root.find(".//testcase[@name='any case ran']/failure")
        assert failure is not None and failure.get("type") == "nothing-ran"
        assert "nothing ran" in report.format_matrix()
    # the JSON reads back with the same verdict
    assert ParityReport.from_json(report.to_json()).passed == report.passed


def test_a_report_with_no_records_fails():
    report = ParityReport(records=[])
    assert not report.passed and not report.ran()
    assert ET.fromstring(report.to_junit_xml()).get("failures") == "1"


def test_a_required_target_that_cannot_run_is_a_junit_failure(linear):
    golden = load_golden(linear.golden)
    report = run_parity(linear.model, golden, ["ort-cpu", "ort-cuda"],
                        require=required_targets(["ort-cpu", "ort-cuda"]))
    root = ET.fromstring(report.to_junit_xml())
    suite = root.find("testsuite[@name='ort-cuda']")
    ok, reason = availability("ort-cuda")
    if ok:
        assert report.passed and suite.get("failures") == "0"
        return
    assert not report.passed and report.ran()
    assert suite.get("failures") == str(len(linear.cases))
    for failure in suite.findall("testcase/failure"):
        assert failure.get("type") == "unavailable"
        assert failure.get("message") == f"ort-cuda is required but was not run: {reason}"


def test_verify_requires_each_named_target_unless_optional(model_dir, tmp_path):
    absent = _absent(["ort-cuda"])
    required = invoke("verify", model_dir, "--target", "ort-cpu,ort-cuda")
    optional = invoke("verify", model_dir, "--target", "ort-cpu", "--target", "ort-cuda",
                      "--optional", "ort-cuda", "--json", tmp_path / "r.json")
    assert optional.exit_code == 0, optional.output
    assert ParityReport.from_json((tmp_path / "r.json").read_text()).passed
    if not absent:
        assert required.exit_code == 0, required.output
        return
    assert required.exit_code == 1
    assert required.stderr.startswith("error: verify: parity failed on ort-cuda")
    assert "--optional" in required.stderr
    assert "ort-cuda: " + availability("ort-cuda")[1] in optional.stdout  # the skip reason


def test_verify_where_nothing_ran_fails_even_when_optional(model_dir, tmp_path):
    absent = _absent(GPU_TARGETS)
    result = invoke("verify", model_dir, "--target", ",".join(GPU_TARGETS), "--optional",
                    ",".join(GPU_TARGETS), "--json", tmp_path / "r.json", "--junit",
                    tmp_path / "r.xml")
    if len(absent) < len(GPU_TARGETS):
        pytest.skip("a GPU target runs here: the run is not empty")  # covered below
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: verify: nothing ran: no case ran on any target")
    assert "Traceback" not in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is False and data["ran"] is False
    assert data["counts"] == {"pass": 0, "fail": 0, "skip": 2 * 2}
    assert ET.parse(tmp_path / "r.xml").getroot().get("failures") == "1"


def test_verify_optional_target_must_be_named(model_dir):
    result = invoke("verify", model_dir, "--target", "ort-cpu", "--optional", "ort-cuda")
    assert result.exit_code == 1
    assert "optional target 'ort-cuda' is not among the targets" in result.stderr

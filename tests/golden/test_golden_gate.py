"""The CI parity gate: every built-in mechanism's committed tiny golden set, replayed.

For each mechanism: PyTorch eager (with the stored weights) still reproduces the stored
outputs, and the exported model passes on every gate target. The gate targets are
ort-cpu, openvino-cpu and onnx-reference, or ``$QCEXPORT_GATE_TARGETS`` (comma-separated); each
must run here, unless ``$QCEXPORT_GATE_OPTIONAL`` names it (a device runner sets e.g.
``QCEXPORT_GATE_TARGETS=ort-cpu,ort-cuda QCEXPORT_GATE_OPTIONAL=ort-cuda``). A required target
that is skipped fails the gate, and so does a run in which nothing ran: the gate must not pass
by not running.
"""

from __future__ import annotations

import os

import pytest
from qcrun.engines import availability
from qcrun.golden import load_golden
from qcrun.parity import name_list

from qcexport import mechanisms
from qcexport.golden import eager_drift, golden_dir
from qcexport.parity import parity_for_mechanism

GATE_TARGETS = name_list(os.environ.get("QCEXPORT_GATE_TARGETS")
                         or "ort-cpu,openvino-cpu,onnx-reference")
GATE_OPTIONAL = name_list(os.environ.get("QCEXPORT_GATE_OPTIONAL", ""))


@pytest.mark.parametrize("name", mechanisms.names())
def test_committed_golden_set_exists_and_verifies(name):
    gset = load_golden(golden_dir(name, "tiny"), mechanism=name, preset="tiny")
    spec = mechanisms.get(name)
    assert [c.name for c in gset.cases] == [c.name for c in spec.golden_cases]
    for case in gset.cases:
        assert set(case.inputs) == set(spec.input_names)
        assert set(case.outputs) == set(spec.output_names)


@pytest.mark.parametrize("name", mechanisms.names())
def test_eager_reproduces_golden(name):
    gset = load_golden(golden_dir(name, "tiny"), mechanism=name, preset="tiny")
    assert eager_drift(gset) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", mechanisms.names())
def test_parity_gate(name, tmp_path):
    run = parity_for_mechanism(name, "tiny", GATE_TARGETS, work_dir=tmp_path,
                               optional=GATE_OPTIONAL)
    report = run.report
    spec = mechanisms.get(name)
    per_target = len(spec.golden_cases) * len(spec.output_names)
    # which targets run is decided here, independently of the report
    running = [t for t in GATE_TARGETS if availability(t)[0]]
    absent = [t for t in GATE_TARGETS if t not in running]
    assert not [t for t in absent if t not in GATE_OPTIONAL], (
        f"required gate targets cannot run here: {absent}")
    assert running, "no gate target runs here: the gate must not pass by not running"
    assert report.counts() == {"pass": per_target * len(running), "fail": 0,
                               "skip": len(spec.golden_cases) * len(absent)}, (
        report.format_matrix())
    assert {r.target for r in report.records if r.verdict == "pass"} == set(running)
    for record in report.skips():
        assert record.code == "unavailable" and record.message == availability(record.target)[1]
    assert run.passed

"""The CI parity gate: every built-in mechanism's committed tiny golden set, replayed.

For each mechanism: PyTorch eager (with the stored weights) still reproduces the stored
outputs, and the exported model passes on ort-cpu, openvino-cpu and onnx-reference. A target
that is skipped here fails the test: the gate must not pass by not running.
"""

from __future__ import annotations

import pytest
from qcrun.golden import load_golden

from qcexport import mechanisms
from qcexport.golden import eager_drift, golden_dir
from qcexport.parity import parity_for_mechanism

GATE_TARGETS = ["ort-cpu", "openvino-cpu", "onnx-reference"]


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


@pytest.mark.parametrize("name", mechanisms.names())
def test_parity_gate(name, tmp_path):
    run = parity_for_mechanism(name, "tiny", GATE_TARGETS, work_dir=tmp_path,
                               require=GATE_TARGETS)
    report = run.report
    counts = report.counts()
    cases = len(mechanisms.get(name).golden_cases)
    outputs = len(mechanisms.get(name).output_names)
    assert counts == {"pass": cases * outputs * len(GATE_TARGETS), "fail": 0, "skip": 0}, (
        report.format_matrix()
    )
    assert run.passed

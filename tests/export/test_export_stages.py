"""The one stage runner of convert, quantize and bundle (``qcexport.stages``)."""

from __future__ import annotations

import pytest
from qcrun.errors import UserError

from qcexport.stages import StageRunner


def test_a_stage_reports_its_time_and_detail_and_a_repeated_stage_its_total():
    seen = []
    stages = StageRunner(lambda name, seconds, detail: seen.append((name, seconds, detail)))
    assert stages("eager", lambda x: x * 2, 21, detail=lambda r: f"got {r}") == 42
    stages("eager", lambda: None)
    stages("save", lambda: "out/model.onnx", detail=str)
    assert [(n, d) for n, _, d in seen] == [("eager", "got 42"), ("eager", ""),
                                            ("save", "out/model.onnx")]
    assert seen[1][1] >= seen[0][1]  # the total of both runs
    assert set(stages.timings) == {"eager", "save"}
    assert stages.timings["eager"] == seen[1][1]


def test_an_error_without_a_stage_is_given_the_stage_that_failed_and_is_not_reported():
    seen = []
    stages = StageRunner(lambda *a: seen.append(a))

    def fails():
        raise UserError("boom")

    def fails_elsewhere():
        raise UserError("bad input", stage="calibrate")

    with pytest.raises(UserError) as caught:
        stages("lower", fails)
    assert caught.value.stage == "lower"
    with pytest.raises(UserError) as caught:
        stages("quantize", fails_elsewhere)
    assert caught.value.stage == "calibrate"  # a stage the error names itself is kept
    with pytest.raises(ZeroDivisionError):  # a bug keeps its type (and traceback)
        stages("check", lambda: 1 / 0)
    assert seen == []  # a line of progress means the stage finished
    assert set(stages.timings) == {"lower", "quantize", "check"}

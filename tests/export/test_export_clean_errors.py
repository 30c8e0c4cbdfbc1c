"""Bad input ends in `error: <stage>: <what>` / `fix: <how>`, exit 1, no traceback and nothing
half-written: a factory that exits, raises or returns bad dynamic_axes, a module with 3-D SDPA,
a truncated model into quantize, a pickled calibration file, and close() under 8 threads."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import qcrun
from click.testing import CliRunner
from qcrun.errors import UserError

from qcexport.cli import main

# Converts and quantizes (seconds each): `make test-fast` leaves them out.
pytestmark = pytest.mark.slow

FACTORIES = textwrap.dedent('''
    import sys
    import torch
    import torch.nn.functional as F

    class Sdpa3d(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)

        def forward(self, x):
            return F.scaled_dot_product_attention(self.q(x), x, x)  # 3-D q/k/v

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 32)
            self.b = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    def sdpa():
        return Sdpa3d(), {"x": torch.randn(2, 5, 8)}, {"x": {1: "tokens"}}

    def exits():
        sys.exit(3)

    def raises():
        raise RuntimeError("no weights here")

    def list_axes():
        return Mlp(), {"x": torch.randn(2, 5, 16)}, [0, 1]

    def str_axes():
        return Mlp(), {"x": torch.randn(2, 5, 16)}, {"x": "batch"}

    def mlp():
        torch.manual_seed(0)
        return Mlp(), {"x": torch.randn(2, 5, 16)}, {"x": {0: "batch", 1: "tokens"}}
''')


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "factories_mod.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def qcexport(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _clean_failure(result, stage: str, *parts: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # not a traceback, not a silent exit
    assert "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {stage}: "), result.stderr
    assert "\n  fix: " in result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


@pytest.mark.parametrize(("factory", "parts"), [
    ("exits", ["factories_mod:exits() called sys.exit(3) instead of returning"]),
    ("raises", ["factories_mod:raises() raised RuntimeError: no weights here"]),
    ("list_axes", ["factories_mod:list_axes() returned dynamic_axes of type list: [0, 1]"]),
    ("str_axes", ["returned dynamic_axes of type dict: {'x': 'batch'}"]),
])
def test_bad_factories_are_clean_errors_naming_the_factory(workdir, factory, parts):
    result = qcexport("convert", "--module", f"factories_mod:{factory}", "-o", "out")
    _clean_failure(result, "load", *parts)
    assert not (workdir / "out").exists()


def test_3d_sdpa_keeps_the_exporters_cause(workdir):
    result = qcexport("convert", "--module", "factories_mod:sdpa", "-o", "out")
    _clean_failure(result, "export", "only 4D query, key, and value are supported",
                   "aten.scaled_dot_product_attention", "4-D q/k/v")
    assert "Next steps:" not in result.stderr
    assert not (workdir / "out").exists()


@pytest.fixture
def fp32_dir(workdir) -> Path:
    result = qcexport("convert", "--module", "factories_mod:mlp", "-o", "fp32", "--json")
    assert result.exit_code == 0, result.output
    return workdir / "fp32"


def test_truncated_model_into_quantize(fp32_dir, workdir):
    model = fp32_dir / "model.onnx"
    model.write_bytes(model.read_bytes()[:3000])
    result = qcexport("quantize", fp32_dir, "--precision", "int8-dynamic", "-o", "q")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stderr.startswith(("error: quantize: ", "error: manifest: "))
    assert str(model.name) in result.stderr
    assert not (workdir / "q").exists()


def test_pickled_calibration_is_refused(fp32_dir, workdir):
    rng = np.random.default_rng(0)
    pickled = workdir / "cal.npz"
    np.savez(pickled, x=np.array([rng.standard_normal((2, 5, 16)), None], dtype=object))
    result = qcexport("quantize", fp32_dir, "--precision", "int8-static", "--calibration",
                      pickled, "-o", "q")
    _clean_failure(result, "calibrate", "pickled (object) arrays, which are refused")
    assert not (workdir / "q").exists()
    not_zip = workdir / "cal2.npz"
    not_zip.write_bytes(b"not a zip at all")
    result = qcexport("quantize", fp32_dir, "--precision", "int8-static", "--calibration",
                      not_zip, "-o", "q")
    _clean_failure(result, "calibrate", "cannot read calibration file")


def test_close_while_eight_threads_call_the_model(fp32_dir):
    model = qcrun.load(fp32_dir, "ort-cpu")
    x = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    expected = model(x=x)
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(9)

    def call():
        start.wait()
        while True:  # until close() is seen: every thread meets it
            try:
                out = model(x=x)
            except UserError as e:  # after close: the one clean error
                assert "was closed" in str(e) and e.stage == "run"
                with lock:
                    outcomes.append("closed")
                return
            for name, value in out.items():  # a call that ran finished with the right result
                np.testing.assert_array_equal(value, expected[name])
            with lock:
                outcomes.append("ran")

    errors: list[BaseException] = []

    def guarded():
        try:
            call()
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=guarded) for _ in range(8)]
    for t in threads:
        t.start()
    start.wait()
    model.close()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert outcomes.count("closed") == 8  # every thread ended in the clean error
    with pytest.raises(UserError, match="was closed"):
        model(x=x)
    model.close()  # twice is fine

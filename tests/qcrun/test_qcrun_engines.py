"""Engines are plugins: generic qcrun code never asks which engine it holds, every target
names a registered engine, and each engine's adapter serves concurrent calls its own way."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import qcrun
from qcrun.engines import ENGINES, Adapter, adapter_for, availability, engine_of, get_engine
from qcrun.errors import UserError
from qcrun.targets import list_targets

PACKAGE = Path(qcrun.__file__).parent
ENGINE_DIR = PACKAGE / "engines"
#: `x.engine == ...`, `x.engine in (...)`, `x.engine != ...`, and engine names compared as text
BRANCH = re.compile(r"\.engine\s*(==|!=|\bin\b|\bnot in\b)")
ADAPTER_CLASSES = {cls.__name__ for e in ENGINES.values() for cls in type(e.adapter).mro(e.adapter)
                   if issubclass(cls, Adapter)}


def engine_branches(source: str, path: str) -> list[str]:
    """Every place in ``source`` that branches on an engine: a comparison of ``.engine`` or an
    ``isinstance`` check against an adapter class."""
    found = [f"{path}:{n}: {line.strip()}" for n, line in enumerate(source.splitlines(), 1)
             if BRANCH.search(line)]
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance" and len(node.args) == 2):
            classes = node.args[1]
            names = [c.id if isinstance(c, ast.Name) else getattr(c, "attr", "")
                     for c in (classes.elts if isinstance(classes, ast.Tuple) else [classes])]
            if any(n in ADAPTER_CLASSES or n.endswith("Adapter") for n in names):
                found.append(f"{path}:{node.lineno}: isinstance(..., {', '.join(names)})")
    return found


def test_generic_qcrun_code_never_branches_on_an_engine():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ENGINE_DIR in path.parents:
            continue
        offenders += engine_branches(path.read_text(), str(path.relative_to(PACKAGE)))
    assert offenders == [], "engine knowledge outside qcrun/engines/:\n" + "\n".join(offenders)


@pytest.mark.parametrize("source", [
    "if target.engine == 'openvino':\n    pass\n",
    "ok = adapter.engine in ('onnxruntime', 'openvino')\n",
    "if t.engine != 'onnxruntime':\n    pass\n",
    "if isinstance(adapter, OrtAdapter):\n    pass\n",
    "if isinstance(a, (int, OpenVinoAdapter)):\n    pass\n",
])
def test_the_branch_check_catches_each_form(source):
    assert engine_branches(source, "x.py"), source


def test_the_branch_check_lets_plain_code_through():
    assert engine_branches("engine = engine_of(target)\nx = isinstance(y, int)\n", "x.py") == []


def test_every_target_names_a_registered_engine():
    for target in list_targets():
        engine = engine_of(target)
        assert engine.name == target.engine
        assert engine.adapter.engine == target.engine
        assert isinstance(availability(target)[1], str) and availability(target)[1]
    with pytest.raises(UserError, match="unknown engine 'tensorrt-native'; valid engines: "
                                        "onnx-reference, onnxruntime, openvino"):
        get_engine("tensorrt-native")


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu", "onnx-reference"])
def test_concurrent_calls_match_serial_calls(linear, target):
    """Each adapter owns its concurrency (shared session, request pool, lock): threads get the
    outputs serial calls give."""
    from concurrent.futures import ThreadPoolExecutor

    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 3 + i, 8)).astype(np.float32)}
             for i in range(6)]
    with adapter_for(linear.model, target).load() as adapter:
        serial = [adapter.run(f) for f in feeds]
        with ThreadPoolExecutor(4) as pool:
            threaded = list(pool.map(adapter.run, feeds * 3))
        assert adapter.concurrency == type(adapter).concurrency
    for got, want in zip(threaded, serial * 3, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_shape_observation_comes_from_the_engine(linear):
    from qcrun.flops import observe_shapes

    feed = {"x": np.ones((2, 5, 8), np.float32)}
    observed = observe_shapes(linear.model, feed)
    assert observed.tensors["x"] == (2, 5, 8)
    assert observed.executed  # nodes ran
    assert get_engine("openvino").observe_shapes(linear.model, feed) is None

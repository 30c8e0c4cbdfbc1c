"""``qcexport quantize --auto-exclude``: the module that breaks int8 is found and kept in float.

The sensitive layer is made on purpose: in the tiny flamingo-resampler, one hidden channel of
the first feed-forward block is scaled up 200x by its first Linear (``ff.1``) and scaled back
down by its second (``ff.3``). The fp32 function is that of a real model with an activation
outlier, and per-tensor int8 activations of that block lose every other channel: plain
int8-static misses the int8 policy by far. Auto-exclude must name that block, keep it in
float, and pass; a budget too small must fail with nothing written.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from qcrun.boundaries import node_key, node_modules
from qcrun.engines import open_adapter
from qcrun.errors import UserError
from qcrun.files import MANIFEST_FILE, read_model_dir
from qcrun.localize import ModuleError

from qcexport import mechanisms
from qcexport.cli import main as cli
from qcexport.export.save import save_model_and_manifest
from qcexport.optimize import quantize_model_dir
from qcexport.optimize.auto_exclude import AutoExclusion, _Structure, choose

MECHANISM = "flamingo-resampler"
SENSITIVE = "layers.0.ff"  # its Linears: ff.1 (up) and ff.3 (down)
SCALE = 200.0


def _linear(model, module: str):
    """The weight and bias initializers of the matrix product of ``module``."""
    paths = node_modules(model)
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node
                if n.op_type in ("Gemm", "MatMul") and paths.get(node_key(n)) == module)
    weight = next(inits[i] for i in node.input if i in inits and len(inits[i].dims) == 2)
    bias = next((inits[i] for i in node.input[2:] if i in inits), None)
    return weight, bias


def _set(tensor, array) -> None:
    tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float32), tensor.name))


def _with_outlier(source: Path, out: Path) -> Path:
    """``source`` with hidden channel 0 of ``SENSITIVE`` carried SCALE times larger."""
    model_dir = read_model_dir(source)
    model = onnx.load(str(model_dir.model))
    up, up_bias = _linear(model, f"{SENSITIVE}.1")
    down, _ = _linear(model, f"{SENSITIVE}.3")
    w_up, w_down = numpy_helper.to_array(up).copy(), numpy_helper.to_array(down).copy()
    assert w_up.shape[1] == w_down.shape[0]  # (in, hidden) and (hidden, out): Gemm, no trans
    w_up[:, 0] *= SCALE
    w_down[0, :] /= SCALE
    _set(up, w_up)
    _set(down, w_down)
    if up_bias is not None:
        b = numpy_helper.to_array(up_bias).copy()
        b[0] *= SCALE
        _set(up_bias, b)
    manifest = json.loads((model_dir.path / MANIFEST_FILE).read_text())
    out.mkdir()
    save_model_and_manifest(model, out / model_dir.model.name, out / MANIFEST_FILE, manifest)
    return out


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _fresh_cosine(fp32_dir: Path, reduced_dir: Path) -> float:
    """Worst output cosine on an input of this test's own seed (not an evaluation case)."""
    manifest = read_model_dir(fp32_dir).manifest
    spec = mechanisms.get(manifest.mechanism)
    feed = {k: v.numpy() for k, v in
            spec.make_inputs(spec.config_cls(**manifest.config), seed=4242).items()}
    with open_adapter(read_model_dir(fp32_dir).model, "ort-cpu") as ref, \
            open_adapter(read_model_dir(reduced_dir).model, "ort-cpu") as low:
        want, got = ref.run(feed), low.run(feed)
    return min(_cosine(got[k], v) for k, v in want.items())


@pytest.fixture(scope="module")
def sensitive(tiny_models, tmp_path_factory) -> Path:
    return _with_outlier(tiny_models.dir(MECHANISM), tmp_path_factory.mktemp("s") / "fp32")


@pytest.mark.slow
def test_auto_exclude_keeps_the_sensitive_block_in_float(sensitive, tmp_path):
    with pytest.raises(UserError, match="loses more accuracy than the policy allows"):
        quantize_model_dir(sensitive, "int8-static", tmp_path / "plain")
    assert not (tmp_path / "plain").exists()

    result = quantize_model_dir(sensitive, "int8-static", tmp_path / "auto", auto_exclude=True)
    q = result.manifest["quantization"]
    record = AutoExclusion.from_manifest(q)
    assert record is not None and record.kept, q
    assert record.kept[0].module == SENSITIVE or record.kept[0].module.startswith(SENSITIVE + ".")
    assert all(k.module.startswith(SENSITIVE) for k in record.kept)
    assert record.attempts[0].passed is False and record.attempts[0].cosine < 0.99
    assert record.attempts[-1].passed is True
    # only the block's two products stay float; every other one is still int8
    assert q["counts"]["float"]["top"] == 2 and q["counts"]["quantized"]["top"] > 2
    assert record.float_nodes > 0 and len(q["excluded_nodes"]) == record.float_nodes
    cost = record.latency
    assert cost is not None and min(cost.int8_ms, cost.auto_ms, cost.fp32_ms) > 0
    # an input of our own, not one the search was judged on
    assert _fresh_cosine(sensitive, tmp_path / "auto") > 0.99


@pytest.mark.slow
def test_a_model_that_meets_the_policy_keeps_nothing_in_float(tiny_models, tmp_path):
    result = quantize_model_dir(tiny_models.dir(MECHANISM), "int8-static", tmp_path / "a",
                                auto_exclude=True)
    record = AutoExclusion.from_manifest(result.manifest["quantization"])
    assert record.kept == [] and record.latency is None and len(record.attempts) == 1
    assert result.manifest["quantization"]["counts"]["float"]["top"] == 0


@pytest.mark.slow
def test_budget_too_small_fails_cleanly_and_leaves_no_output(sensitive, tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(cli, ["quantize", str(sensitive), "--precision", "int8-static",
                                      "--auto-exclude", "--exclusion-budget", "0",
                                      "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "error: quantize: --auto-exclude could not bring int8-static" in result.output
    assert "budget of 0 modules is spent" in result.output and "plain int8-static" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_tighter_policy_file_fails_without_touching_a_good_output(tiny_models, tmp_path):
    source = tiny_models.dir(MECHANISM)
    good = tmp_path / "good"
    quantize_model_dir(source, "int8-static", good)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in good.iterdir()}
    policy = tmp_path / "policy.json"  # int8 that no tiny int8 model reaches
    policy.write_text(json.dumps({"format": 1,
                                  "defaults": {"int8-static": {"min_cosine": 0.999999}}}))
    result = CliRunner().invoke(cli, ["quantize", str(source), "--precision", "int8-static",
                                      "--auto-exclude", "--exclusion-budget", "1",
                                      "--policy", str(policy), "-o", str(good)])
    assert result.exit_code == 1, result.output
    assert "cosine >= 0.999999" in result.output and "budget of 1 modules" in result.output
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in good.iterdir()}
    assert after == before


@pytest.mark.parametrize(("precision", "said"), [("fp16", "not fp16"),
                                                 ("int8-nncf", "--accuracy-control")])
def test_auto_exclude_is_refused_where_it_does_not_apply(precision, said, tmp_path):
    with pytest.raises(UserError, match=said):
        quantize_model_dir(tmp_path / "no-model", precision, tmp_path / "o", auto_exclude=True)
    assert not (tmp_path / "o").exists()


def test_choose_prefers_the_module_that_adds_noise_per_product():
    # a -> b -> c in a chain; b's two products add the noise, c only carries it on
    structure = _Structure(
        modules={"n1": "a", "n2": "b.x", "n3": "b.y", "n4": "c"},
        names={"n1": "A", "n2": "BX", "n3": "BY", "n4": "C"},
        products=["n1", "n2", "n3", "n4"],
        reads={"b": {"a"}, "b.x": {"a"}, "b.y": {"b.x"}, "c": {"b"}})

    def row(module, snr):
        return ModuleError(module, module.count(".") + 1, "t", "fail", cosine=0.9, snr_db=snr)

    rows = [row("a", 40.0), row("b.x", 30.0), row("b.y", 10.0), row("b", 10.0), row("c", 9.5)]
    pick = choose(rows, structure, [])
    assert pick.module == "b.y" and pick.nodes == 1
    assert math.isclose(pick.added_noise, 10 ** -1 - 10 ** -3)
    # with b.y in float, what is left of b is b.x; the whole model is never a choice
    assert choose(rows, structure, ["b.y"]).module in ("b", "b.x")
    assert choose(rows, structure, ["a", "b", "c"]) is None
    # products the mechanism already keeps in float do not count
    assert choose(rows, structure, [], floating={"BY"}).module != "b.y"

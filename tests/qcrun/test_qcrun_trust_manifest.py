"""A model directory is judged by what it is, not by what its manifest says.

Replayed through the real commands (``qcrun verify``, ``qcexport parity DIR``, ``qcexport
profile DIR``, ``qcrun.load``) on the tiny Q-Former and Matryoshka exported here: a loosened
tolerance, a false precision, a flipped byte, weights scaled by 1.05 with the manifest edited to
match, paths that leave the directory and manifests of the wrong JSON types all end in
``error: <stage>: ...`` with exit status 1 and no traceback; out-of-range inputs are refused by
``qcrun.load`` as PyTorch refuses them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import qcrun
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from qcrun.cli import main as qcrun_main
from qcrun.errors import UserError
from qcrun.golden import file_sha256

from qcexport.cli import main as qcexport_main
from qcexport.export.pipeline import convert

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "golden" / "qformer" / "tiny"


@pytest.fixture(scope="module")
def exported(tiny_models) -> dict[str, Path]:
    """Tiny model directories shared by the session (testsupport.models): copy before editing."""
    return {name: tiny_models.dir(name, "tiny") for name in ("qformer", "matryoshka")}


@pytest.fixture
def qformer(tmp_path, exported) -> Path:
    """A writable copy of the exported tiny Q-Former directory."""
    return Path(shutil.copytree(exported["qformer"], tmp_path / "qformer"))


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _write(directory: Path, manifest) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _run(command: str, directory: Path, *extra):
    if command == "verify":
        args = ["verify", directory, "--target", "ort-cpu", "--golden", GOLDEN, *extra]
        result = CliRunner().invoke(qcrun_main, [str(a) for a in args])
    elif command == "parity":
        args = ["parity", directory, "--targets", "ort-cpu", *extra]
        result = CliRunner().invoke(qcexport_main, [str(a) for a in args])
    else:
        args = ["profile", directory, "--targets", "ort-cpu", "--runs", "2", "--warmup", "0",
                "--op-runs", "0", "--gemm-sizes", "0", "--json", directory / "p.json"]
        result = CliRunner().invoke(qcexport_main, [str(a) for a in args])
    # a UserError ends in SystemExit(1); any other exception is a bug with a traceback
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exception
    return result


def _fails_cleanly(result, stage: str, *causes: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith(f"error: {stage}: "), result.stderr
    for cause in causes:
        assert cause in result.stderr, result.stderr


COMMANDS = ("verify", "parity", "profile")
STAGES = {"verify": "verify", "parity": "parity", "profile": "profile"}


def _scaled(directory: Path, factor: float = 1.05) -> None:
    """Scale every float weight of the model by ``factor`` and fix the manifest's hash, as
    someone who edits both would."""
    model = onnx.load(str(directory / "model.onnx"))
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            scaled = numpy_helper.to_array(tensor) * np.float32(factor)
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(np.float32), tensor.name))
    onnx.save(model, str(directory / "model.onnx"))
    manifest = _manifest(directory)
    manifest["model_sha256"] = file_sha256(directory / "model.onnx")
    _write(directory, manifest)


# --- the control: the intact directory passes, so every failure below is the fault's ---------


@pytest.mark.parametrize("command", ("verify", "parity"))
def test_intact_model_passes(qformer, command):
    result = _run(command, qformer)
    assert result.exit_code == 0, result.output


# --- wrong model passes ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ("verify", "parity"))
def test_scaled_weights_fail_whatever_the_manifest_says(qformer, command):
    _scaled(qformer)
    manifest = _manifest(qformer)
    manifest["tolerances"] = {"defaults": {"fp32": {"max_abs": 1000, "max_rel": 1000,
                                                    "min_cosine": 0}}}
    _write(qformer, manifest)
    result = _run(command, qformer)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "0 passed, 3 failed" in result.output


@pytest.mark.parametrize("command", ("verify", "parity"))
def test_policy_file_is_the_users_choice(qformer, tmp_path, command):
    # the same loosened policy works when the user names it: the verdict is theirs to set
    _scaled(qformer)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": 1, "defaults": {"fp32": {
        "max_abs": 1000, "max_rel": 1000, "min_cosine": 0}}}))
    assert _run(command, qformer, "--policy", policy).exit_code == 0
    policy.write_text(json.dumps({"format": 1, "defaults": {"fp32": {"max_abss": 1000}}}))
    _fails_cleanly(_run(command, qformer, "--policy", policy), "policy",
                   "unknown tolerance field 'max_abss'")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("claimed", ("int8-dynamic", "int8-static", "fp16"))
def test_false_precision_is_an_error(qformer, command, claimed):
    _scaled(qformer)
    manifest = _manifest(qformer)
    manifest["precision"] = claimed  # a looser default policy, if it were believed
    _write(qformer, manifest)
    _fails_cleanly(_run(command, qformer), STAGES[command],
                   f"says precision {claimed}, but the graph of model.onnx is fp32")


@pytest.mark.parametrize("command", COMMANDS)
def test_byte_flipped_model_is_an_error(qformer, command):
    data = bytearray((qformer / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (qformer / "model.onnx").write_bytes(bytes(data))
    _fails_cleanly(_run(command, qformer), STAGES[command], "model.onnx has sha256 ",
                   "the file was changed after export")
    assert not (qformer / "p.json").exists()


def test_byte_flipped_model_is_refused_by_load(qformer):
    assert qcrun.load(qformer, "ort-cpu").target == "ort-cpu"
    data = bytearray((qformer / "model.onnx").read_bytes())
    data[-10] ^= 0x40
    (qformer / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="changed after export"):
        qcrun.load(qformer, "ort-cpu")


def test_weights_hash_of_another_golden_set_is_an_error(qformer):
    manifest = _manifest(qformer)
    manifest["weights_sha256"] = "f" * 64
    _write(qformer, manifest)
    # the model's own metadata names the weights it was exported from
    _fails_cleanly(_run("verify", qformer), "verify", "exported from weights")


# --- paths -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("model, problem", [
    ("../../outside/evil.onnx", "leaves its directory ('..')"),
    ("/etc/passwd", "is absolute"),
])
def test_model_path_leaving_the_directory(qformer, command, model, problem):
    outside = qformer.parent.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(qformer / "model.onnx", outside / "evil.onnx")
    manifest = _manifest(qformer)
    manifest["model"] = model
    _write(qformer, manifest)
    _fails_cleanly(_run(command, qformer), STAGES[command], f"model {model!r} {problem}")


@pytest.mark.parametrize("command", COMMANDS)
def test_model_symlink_escape(qformer, tmp_path, command):
    (tmp_path / "elsewhere").mkdir()
    shutil.move(qformer / "model.onnx", tmp_path / "elsewhere" / "model.onnx")
    os.symlink(tmp_path / "elsewhere" / "model.onnx", qformer / "model.onnx")
    _fails_cleanly(_run(command, qformer), STAGES[command], "(a symlink escape)")


@pytest.fixture
def golden_copy(tmp_path) -> Path:
    return Path(shutil.copytree(GOLDEN, tmp_path / "golden"))


def test_golden_file_path_leaving_the_directory(qformer, golden_copy):
    manifest = _manifest(golden_copy)
    manifest["cases"][0]["file"] = "../../../../etc/passwd"
    _write(golden_copy, manifest)
    result = CliRunner().invoke(qcrun_main, ["verify", str(qformer), "--target", "ort-cpu",
                                             "--golden", str(golden_copy)])
    _fails_cleanly(result, "golden", "cases[0].file '../../../../etc/passwd' leaves its "
                                     "directory")


def test_golden_file_symlink_escape(qformer, golden_copy, tmp_path):
    # the link points at an identical copy, so only the escape itself can refuse it
    name = _manifest(golden_copy)["cases"][0]["file"]
    shutil.move(golden_copy / name, tmp_path / name)
    os.symlink(tmp_path / name, golden_copy / name)
    result = CliRunner().invoke(qcrun_main, ["verify", str(qformer), "--target", "ort-cpu",
                                             "--golden", str(golden_copy)])
    _fails_cleanly(result, "golden", "(a symlink escape)")


# --- JSON of the wrong types -----------------------------------------------------------------

TYPE_CASES = [
    (lambda m: [1, 2, 3], "expected an object, got list"),
    (lambda m: {**m, "model": 5}, "at model: expected a string, got number 5"),
    (lambda m: {**m, "inputs": "x"}, "at inputs: expected a list, got string 'x'"),
    (lambda m: {**m, "precison": "fp32"}, "unknown key 'precison'"),
    (lambda m: {**m, "format": 2}, "format 2 was written by a newer qcexport"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("edit, cause", TYPE_CASES)
def test_model_manifest_json_types(qformer, command, edit, cause):
    _write(qformer, edit(_manifest(qformer)))
    _fails_cleanly(_run(command, qformer), STAGES[command], cause)


@pytest.mark.parametrize("edit, cause", [
    *TYPE_CASES[:1],
    (lambda m: {**m, "cases": [{**m["cases"][0], "file": 5}]},
     "at cases[0].file: expected a string, got number 5"),
    (lambda m: {**m, "cases": "x"}, "at cases: expected a list, got string 'x'"),
    (lambda m: {**m, "seeed": 1}, "unknown key 'seeed'"),
    (lambda m: {**m, "format": 2}, "format 2 was written by a newer qcexport"),
])
def test_golden_manifest_json_types(qformer, golden_copy, edit, cause):
    _write(golden_copy, edit(_manifest(golden_copy)))
    result = CliRunner().invoke(qcrun_main, ["verify", str(qformer), "--target", "ort-cpu",
                                             "--golden", str(golden_copy)])
    _fails_cleanly(result, "golden", cause)
    result = CliRunner().invoke(qcexport_main, ["parity", str(qformer), "--targets", "ort-cpu",
                                                "--golden", str(golden_copy)])
    _fails_cleanly(result, "golden", cause)


# --- input ranges ----------------------------------------------------------------------------


def test_ranges_recorded_at_export(exported):
    qf = {s["name"]: s for s in _manifest(exported["qformer"])["inputs"]}
    assert qf["text_ids"]["range"] == {"min": 0, "max": 99}  # tiny vocab_size 100
    assert "range" not in qf["image_features"] and "range" not in qf["text_mask"]
    mat = {s["name"]: s for s in _manifest(exported["matryoshka"])["inputs"]}
    assert mat["num_queries"]["range"] == {"min": 1, "max": 16}  # tiny max_queries


def _qformer_feed(ids):
    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    rng = np.random.default_rng(0)
    return {"image_features": rng.standard_normal((1, 5, 48)).astype(np.float32),
            "text_ids": ids, "text_mask": np.ones(ids.shape, dtype=bool)}


def test_load_refuses_token_ids_out_of_range(exported):
    with qcrun.load(exported["qformer"], "ort-cpu") as model:
        assert model(**_qformer_feed([0, 5, 99]))["query_outputs"].shape == (1, 8, 64)
        for bad in (-1, 100):
            with pytest.raises(UserError, match=rf"'text_ids' holds {bad}, outside its valid "
                                                r"range \[0, 99\]"):
                model(**_qformer_feed([3, bad]))


def test_load_refuses_num_queries_out_of_range(exported):
    x = np.random.default_rng(1).standard_normal((1, 7, 48)).astype(np.float32)
    with qcrun.load(exported["matryoshka"], "ort-cpu") as model:
        assert model(image_features=x, num_queries=np.array(16))["query_outputs"].shape[1] == 16
        for bad in (-1, 0, 17):
            with pytest.raises(UserError, match=r"'num_queries' holds .*\[1, 16\]"):
                model(image_features=x, num_queries=np.array(bad))


def test_load_refuses_a_mask_value_of_two(tmp_path, lib):
    # x * mask with an integer 0/1 mask, its range recorded as export records it
    graph = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "m"], ["y"])],
        "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = lib.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                     tmp_path / "masked.onnx")
    directory = lib.write_model_dir(tmp_path / "m", model, None, mechanism="custom")
    manifest = _manifest(directory)
    manifest["inputs"][1]["range"] = {"min": 0, "max": 1}
    _write(directory, manifest)
    x = np.ones((1, 4), np.float32)
    with qcrun.load(directory, "ort-cpu") as loaded:
        np.testing.assert_array_equal(loaded(x=x, mask=np.array([[1, 0, 1, 1]]))["y"],
                                      [[1, 0, 1, 1]])
        with pytest.raises(UserError, match=r"'mask' holds 2, outside its valid range \[0, 1\]"):
            loaded(x=x, mask=np.array([[1, 2, 0, 1]]))


class _Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x, ids):
        return self.proj(torch.cat([x, self.emb(ids)], 1))


@pytest.mark.slow
def test_ranges_derived_generically_for_a_users_module(tmp_path):
    torch.manual_seed(0)
    inputs = {"x": torch.randn(2, 5, 16), "ids": torch.randint(0, 50, (2, 3))}
    axes = {"x": {0: "batch", 1: "tokens"}, "ids": {0: "batch", 1: "text"}}
    result = convert(_Embedder().eval(), inputs, axes, output_dir=tmp_path / "m",
                     metadata={"mechanism": "custom"})
    specs = {s["name"]: s for s in _manifest(result.path.parent)["inputs"]}
    assert specs["ids"]["range"] == {"min": 0, "max": 49}  # the embedding table's rows
    assert "range" not in specs["x"]
    with qcrun.load(result.path.parent, "ort-cpu") as model:
        with pytest.raises(UserError, match=r"'ids' holds 50"):
            model(x=inputs["x"].numpy(), ids=np.array([[1, 50, 2], [0, 0, 0]]))

"""The model + manifest pair is replaced as one unit (convert, quantize), and reports only on
success: a failure at any point (a failed rename, a full disk, Ctrl-C) leaves the complete old
pair or the complete new one, the message says which, and no file the tool did not write is
touched."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from qcrun import files

from qcexport.export import save
from qcexport.export.save import PairNotReplaced, save_model_and_manifest


def _model(value: float) -> onnx.ModelProto:
    w = np.full((4, 300), value, dtype=np.float32)  # over 1 KiB: external data when asked
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 300])],
        initializer=[numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(out: Path, value: float) -> list[Path]:
    return save_model_and_manifest(_model(value), out / "model.onnx", out / "manifest.json",
                                   {"format": 1, "precision": "fp32", "model": "model.onnx",
                                    "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}],
                                    "outputs": [{"name": "y", "dtype": "float32",
                                                 "shape": [2, 300]}],
                                    "config": {"value": value}})


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def existing(tmp_path) -> Path:
    """A directory with a saved pair (value 1.0) and a file of the user's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.onnx.backup.data").write_text("also mine")  # looks like ours, is not
    _save(out, 1.0)
    return out


def _weight(out: Path) -> float:
    model = onnx.load(str(out / "model.onnx"))
    return float(numpy_helper.to_array(model.graph.initializer[0]).flat[0])


def _pair_is(out: Path, value: float) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["value"] == value and _weight(out) == value
    from qcrun.golden import file_sha256

    assert manifest["model_sha256"] == file_sha256(out / "model.onnx")


def test_success_replaces_the_pair_and_nothing_else(existing):
    _save(existing, 2.0)
    _pair_is(existing, 2.0)
    assert sorted(p.name for p in existing.iterdir()) == [
        "manifest.json", "model.onnx", "model.onnx.backup.data", "notes.txt"]
    assert (existing / "notes.txt").read_text() == "mine"


def _failing_move(name: str, exc: BaseException):
    real = save._move

    def move(src: Path, dst: Path) -> None:
        if dst.name == name and not dst.parent.name.startswith(".qcexport-"):
            raise exc
        real(src, dst)

    return move


@pytest.mark.parametrize("failing", ["manifest.json", "model.onnx"])
def test_a_failed_rename_leaves_the_previous_pair(existing, monkeypatch, failing):
    before = _snapshot(existing)
    monkeypatch.setattr(save, "_move", _failing_move(failing, OSError(errno.EIO, "I/O error")))
    with pytest.raises(PairNotReplaced) as info:
        _save(existing, 2.0)
    text = str(info.value)
    assert text.startswith("save: could not write the model and manifest")
    assert f"{existing} still holds the previous model and manifest, unchanged" in text
    assert "previous model untouched" not in text
    assert _snapshot(existing) == before  # byte for byte, and no hidden directory left
    _pair_is(existing, 1.0)


def test_a_full_disk_leaves_the_previous_pair(existing, monkeypatch):
    before = _snapshot(existing)
    calls = []

    def full(path, data):
        calls.append(path.name)
        if path.name == "manifest.json":  # the model fitted, the manifest did not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        with open(path, "wb") as f:
            f.write(data)

    monkeypatch.setattr(files, "fsync_write", full)
    with pytest.raises(PairNotReplaced, match="No space left on device; .* still holds the "
                       "previous model and manifest, unchanged"):
        _save(existing, 2.0)
    assert calls == ["model.onnx", "manifest.json"]
    assert _snapshot(existing) == before


def test_ctrl_c_mid_swap_leaves_the_previous_pair(existing, monkeypatch):
    before = _snapshot(existing)
    monkeypatch.setattr(save, "_move", _failing_move("manifest.json", KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _save(existing, 2.0)
    assert _snapshot(existing) == before


def test_a_failure_in_an_empty_directory_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "fresh"
    out.mkdir()
    monkeypatch.setattr(save, "_move", _failing_move("manifest.json", OSError(errno.EIO, "x")))
    with pytest.raises(PairNotReplaced, match=f"nothing was written to {out}"):
        _save(out, 2.0)
    assert list(out.iterdir()) == []


def test_a_failed_rollback_says_where_the_files_are(existing, monkeypatch):
    real_replace = os.replace
    monkeypatch.setattr(save, "_move", _failing_move("manifest.json", OSError(errno.EIO, "x")))

    def replace(src, dst):  # the rollback's renames fail too
        if Path(dst).parent == existing:
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(save.os, "replace", replace)
    with pytest.raises(PairNotReplaced) as info:
        _save(existing, 2.0)
    monkeypatch.undo()
    text = str(info.value)
    assert f"{existing} is incomplete: the previous files are in" in text
    hidden = {p.name.split("-")[1]: p for p in existing.iterdir() if p.name.startswith(".")}
    assert set(hidden) == {"old", "new"}
    assert str(hidden["old"]) in text and str(hidden["new"]) in text
    # nothing is lost: the previous manifest waits in the old directory
    assert json.loads((hidden["old"] / "manifest.json").read_text())["config"]["value"] == 1.0
    assert (existing / "notes.txt").read_text() == "mine"


def test_external_data_pair_is_swapped_as_one_unit(existing, monkeypatch):
    monkeypatch.setattr(save, "EXTERNAL_DATA_THRESHOLD", 0)
    files = _save(existing, 3.0)
    data = [f for f in files if f.name.endswith(".data")]
    assert len(data) == 1 and data[0].parent == existing
    _pair_is(existing, 3.0)
    before = _snapshot(existing)
    monkeypatch.setattr(save, "_move", _failing_move("manifest.json", OSError(errno.EIO, "x")))
    with pytest.raises(PairNotReplaced, match="still holds the previous model and manifest"):
        _save(existing, 4.0)
    assert _snapshot(existing) == before
    monkeypatch.setattr(save, "_move", os.replace)
    _save(existing, 4.0)  # the old data file goes, the user's look-alike stays
    names = sorted(p.name for p in existing.iterdir())
    assert data[0].name not in names and "model.onnx.backup.data" in names
    _pair_is(existing, 4.0)


# --- quantize: the reduced model and its manifest ---------------------------------------------


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory) -> Path:
    from qcexport.export import convert

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mlp") / "fp32"
    convert(Mlp(), {"x": torch.randn(2, 5, 16)}, {"x": {0: "batch", 1: "tokens"}},
            output_dir=out, metadata={"mechanism": "custom"})
    return out


@pytest.mark.slow
def test_quantize_failure_never_mixes_precisions(fp32_dir, tmp_path, monkeypatch):
    from qcexport.optimize import quantize_model_dir

    out = tmp_path / "q"
    quantize_model_dir(fp32_dir, "int8-dynamic", out)
    before = _snapshot(out)
    assert json.loads(before["manifest.json"])["precision"] == "int8-dynamic"
    monkeypatch.setattr(save, "_move", _failing_move("manifest.json", OSError(errno.EIO, "x")))
    with pytest.raises(PairNotReplaced, match="still holds the previous model and manifest"):
        quantize_model_dir(fp32_dir, "fp16", out)
    assert _snapshot(out) == before  # no fp16 model under the int8 manifest
    monkeypatch.setattr(files, "fsync_write", _enospc)
    with pytest.raises(PairNotReplaced, match="No space left on device"):
        quantize_model_dir(fp32_dir, "fp16", out)
    assert _snapshot(out) == before


def _enospc(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

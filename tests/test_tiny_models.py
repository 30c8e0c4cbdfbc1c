"""The session's shared tiny models (testsupport.models): one export per distinct model, the
same directory for equal spellings of the options, and a shared directory changed in place is
caught. The exporter here is a stand-in that writes a file: what is tested is the cache, and
the real exports are checked by every test that uses ``tiny_models``."""

from __future__ import annotations

from pathlib import Path

import pytest
import qcrun

from testsupport.models import TinyModels


class Exporter:
    """Writes a one-file "model" directory and counts the calls; fails for a name in ``bad``."""

    def __init__(self, bad=()):
        self.calls: list[tuple] = []
        self.bad = set(bad)

    def __call__(self, name, preset, *, output_dir, **options):
        self.calls.append((name, preset, tuple(sorted(options.items()))))
        if name in self.bad:
            raise RuntimeError(f"cannot export {name}")
        output_dir.mkdir(parents=True)
        (output_dir / "model.onnx").write_bytes(f"{name} {options}".encode())
        return type("Result", (), {"path": output_dir / "model.onnx"})()


def test_qcrun_is_the_package_not_the_test_folder():
    assert qcrun.__file__ is not None
    assert Path(qcrun.__file__).parent.parent.name == "runtimes"


def test_equal_spellings_share_one_export(tmp_path):
    models = TinyModels(tmp_path, export=(export := Exporter()))
    auto = models.dir("qformer")
    # ort-cpu's first attention form is "onnx", its default opset for "decomposed" is 17, and
    # the Q-Former has no precision overrides: each pair is one model.
    assert models.dir("qformer", "tiny", attention="onnx", precision="fp16") == auto
    decomposed = models.dir("qformer", attention="decomposed")
    assert models.dir("qformer", attention="decomposed", opset=17) == decomposed
    assert len(export.calls) == 2
    # Options that change the model are exported apart.
    others = {models.dir("qformer", attention="ort"), models.dir("qformer", num_layers=1),
              models.dir("qformer", with_attention_maps=True), models.dir("routing")}
    assert len(others | {auto, decomposed}) == 6 and len(export.calls) == 6


def test_a_failed_export_is_raised_again_without_exporting_again(tmp_path):
    models = TinyModels(tmp_path, export=(export := Exporter(bad={"perceiver"})))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="cannot export perceiver"):
            models.get("perceiver")
    assert len(export.calls) == 1


def test_a_shared_directory_changed_in_place_is_named(tmp_path):
    models = TinyModels(tmp_path, export=Exporter())
    shared = models.dir("qformer")
    copy = models.copy(tmp_path / "mine", "qformer")
    (copy / "model.onnx").write_bytes(b"edited")  # a copy may be changed
    (copy / "extra.txt").write_text("x")
    assert models.changed() == []
    (shared / "model.onnx").write_bytes(b"edited")
    (shared / "notes.txt").write_text("x")
    assert models.changed() == [f"{shared / 'model.onnx'}: changed",
                                f"{shared / 'notes.txt'}: added"]
    (shared / "model.onnx").unlink()
    assert f"{shared / 'model.onnx'}: removed" in models.changed()


def test_a_test_that_uses_the_shared_models_is_slow(tiny_models, request):
    assert request.node.get_closest_marker("slow") is not None

"""Bundles for OpenVINO targets carry IR and, with --ov-cache, the compiled model; fixed
axes are recorded and checked against the golden cases. Verified in a fresh interpreter
without torch, as on a device; a damaged cache only costs load time."""

from __future__ import annotations

import json
import shutil

import pytest
import qcrun
from qcrun.bundle import open_bundle
from qcrun.errors import UserError

from qcexport.bundle import make_bundle

pytestmark = pytest.mark.slow
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def cached_bundle(tmp_path_factory, qformer_dir):
    out = tmp_path_factory.mktemp("ir-bundles") / "qformer-ov.bundle"
    return make_bundle(qformer_dir, "openvino-cpu", output=out, ov_cache=True,
                       fix_axes={"batch": 1}, host_targets=["ort-cpu", "openvino-cpu"])


def test_ir_bundle_verified_without_torch(cached_bundle, qcrun_no_torch):
    m = cached_bundle.manifest
    assert {"model.xml", "model.bin", "ov-cache/model.blob"} <= set(m["files"])
    assert m["openvino"]["cache"] == "ov-cache/model.blob"
    assert m["fixed_axes"]["axes"] == {"batch": 1}
    assert set(m["fixed_axes"]["skipped_cases"]) == {"b2_t17_textpad", "b2_t65_notext"}
    assert "contradict the fixed axes batch=1" in m["fixed_axes"]["skipped_cases"]["b2_t65_notext"]
    assert m["provenance"]["golden"]["cases"] == ["b1_t49_text"]
    done = qcrun_no_torch("verify", cached_bundle.path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled-model cache: intact" in done.stdout
    assert "fixed axes: batch=1; left out b2_t17_textpad" in done.stdout
    script = """
import sys, qcrun
m = qcrun.load(sys.argv[1], target="openvino-cpu")
assert m.cache == "used", m.cache
assert m._adapter.model_path.name == "model.xml"
assert [i.shape for i in m._adapter.inputs][0][0] == 1, m._adapter.inputs
assert "torch" not in sys.modules or sys.modules["torch"] is None
print("ok", m.load_seconds)
"""
    done = qcrun_no_torch(cached_bundle.path, script=script)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("damage", ["modify", "remove"])
def test_cache_damage_costs_speed_only(tmp_path, cached_bundle, damage):
    path = shutil.copytree(cached_bundle.path, tmp_path / "b.bundle")
    blob = path / "ov-cache" / "model.blob"
    if damage == "remove":
        blob.unlink()
    else:  # the middle of the blob: OpenVINO itself would import it and compute garbage
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    with open_bundle(path) as bundle:
        check = bundle.require_intact()  # not damage: the model and golden data are intact
        assert check.ok and [p.path for p in check.cache_problems] == ["ov-cache/model.blob"]
        assert bundle.cache_state().startswith("not used")
    with qcrun.load(path, target="openvino-cpu") as model:
        assert model.cache == "none"  # not offered to the engine at all
    from click.testing import CliRunner
    from qcrun.cli import main

    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "the IR is compiled instead" in result.output


def test_cache_with_other_settings_not_used(cached_bundle):
    # the blob was compiled with batch fixed at 1 in fp32; another hint must not import it
    with open_bundle(cached_bundle.path) as bundle:
        options = bundle.adapter_options("openvino-cpu")
    adapter = qcrun.engines.adapter_for(cached_bundle.path / "model.xml", "openvino-cpu",
                                        **{**options, "num_threads": 1})
    with adapter:
        assert adapter.cache_state.startswith("not used: compiled with other settings")


def test_fix_axis_leaving_no_case_is_refused(tmp_path, qformer_dir):
    with pytest.raises(UserError, match="no golden case is left"):
        make_bundle(qformer_dir, "openvino-cpu", output=tmp_path / "x.bundle",
                    fix_axes={"tokens": 257})
    assert not (tmp_path / "x.bundle").exists()


def test_fixed_bundle_refuses_other_size(cached_bundle):
    with pytest.raises(UserError, match="built with batch=1, not 2"):
        qcrun.load(cached_bundle.path, target="ort-cpu", fix_axes={"batch": 2})
    with qcrun.load(cached_bundle.path, target="ort-cpu") as model:
        assert model.fixed_axes == {"batch": 1}
        assert model._adapter.inputs[0].shape[0] == 1
    spec = json.loads((cached_bundle.path / "bundle.json").read_text())
    assert spec["roles"] == json.loads((cached_bundle.path / "manifest.json").read_text())["roles"]


def _grown_archive(tmp_path, cached_bundle, rel):
    """The bundle packed as an archive after ``rel`` grew by 1000 bytes (bundle.json kept)."""
    from qcrun.bundle import pack_archive

    path = shutil.copytree(cached_bundle.path, tmp_path / "grown.bundle")
    with open(path / rel, "ab") as f:
        f.write(b"\0" * 1000)
    return pack_archive(path, tmp_path / "grown.bundle.tar.gz")


def test_oversized_cache_in_archive_costs_speed_only(tmp_path, cached_bundle):
    from qcrun.bundle import foreign_content

    archive = _grown_archive(tmp_path, cached_bundle, "ov-cache/model.blob")
    size = cached_bundle.manifest["files"]["ov-cache/model.blob"]["bytes"]
    with open_bundle(archive) as bundle:
        assert not (bundle.root / "ov-cache" / "model.blob").exists()  # never written
        check = bundle.require_intact()
        assert check.ok
        [problem] = check.cache_problems
        assert problem.path == "ov-cache/model.blob"
        assert f"holds {size + 1000} bytes, more than the {size}" in problem.detail
        assert bundle.cache_state().startswith("not used")
    with qcrun.load(archive, target="openvino-cpu") as model:
        assert model.cache == "none"
    is_bundle, changed = foreign_content(archive)
    assert is_bundle and changed == [f"ov-cache/model.blob (changed since the bundle was "
                                     f"written: the archive holds {size + 1000} bytes, more "
                                     f"than the {size} bundle.json lists: not extracted)"]


def test_oversized_model_file_in_archive_is_still_damage(tmp_path, cached_bundle):
    from qcrun.bundle import BundleDamaged

    archive = _grown_archive(tmp_path, cached_bundle, "model.bin")
    with pytest.raises(BundleDamaged, match="model.bin' holds .* more than"):
        open_bundle(archive)


def test_verify_reports_cached_and_uncached_load(tmp_path, cached_bundle):
    from click.testing import CliRunner
    from qcrun.cli import main
    from qcrun.parity import LoadTime
    from qcrun.schema import parse

    out = tmp_path / "verify.json"
    result = CliRunner().invoke(main, ["verify", str(cached_bundle.path), "--json", str(out)])
    assert result.exit_code == 0, result.output
    load = parse(LoadTime, json.loads(out.read_text())["loads"]["openvino-cpu"], where="test")
    assert load.file == "model.xml" and load.cache == "used"
    assert load.seconds > 0 and load.uncached_s is not None and load.uncached_s > 0
    assert "load on openvino-cpu: " in result.output and "without it" in result.output

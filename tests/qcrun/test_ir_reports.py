"""OpenVINO IR in the reports: profile and inspect read the IR on OpenVINO targets (and say
which file each target read, and how long it took to load); `convert --ir` and
`quantize --ir` end with the `qcexport ir` step. Real OpenVINO and onnxruntime."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from qcexport.ir import write_ir

pytestmark = pytest.mark.slow
pytest.importorskip("openvino")

QUICK = ["--runs", "2", "--warmup", "1", "--op-runs", "0", "--gemm-sizes", "0"]


def _run(main, args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_profile_reads_ir_on_openvino(tmp_path, tiny_models):
    from qcrun.cli import main

    directory = tiny_models.copy(tmp_path / "qformer", "qformer")
    write_ir(directory)
    out = tmp_path / "p.json"
    result = _run(main, ["profile", directory, "--target", "openvino-cpu,ort-cpu", *QUICK,
                         "--json", out])
    targets = {t["target"]: t for t in json.loads(out.read_text())["targets"]}
    assert targets["openvino-cpu"]["model_file"] == "model.xml"
    assert targets["ort-cpu"]["model_file"] == "model.onnx"
    assert "(model.xml)" in result.output  # the load column names the file


def test_profile_of_ir_only_model_skips_onnx_engines(tmp_path, tiny_models):
    from qcrun.files import read_model_dir
    from qcrun.golden import load_golden
    from qcrun.latency import SweepPoint
    from qcrun.profile import profile_model

    directory = tiny_models.copy(tmp_path / "qformer", "qformer")
    write_ir(directory)
    model = read_model_dir(directory)
    (directory / "model.onnx").unlink()  # the files, not the manifest: what profile reads
    files = type(model.model_files())(None, model.ir, "model directory x")
    golden = load_golden(f"golden/{model.manifest.mechanism}/{model.manifest.preset}")
    feed = dict(golden.cases[0].inputs)
    report = profile_model(model.ir, ["ort-cpu", "openvino-cpu"], [SweepPoint.of({})],
                           lambda point: feed, runs=2, warmup=1, op_runs=0, gemm_sizes=None,
                           count=False, files=files)
    by = {t.target: t for t in report.targets}
    assert by["ort-cpu"].status == "skipped" and "only OpenVINO IR" in by["ort-cpu"].reason
    assert by["openvino-cpu"].status == "ok" and by["openvino-cpu"].model_file == "model.xml"


def test_qcrun_inspect_reads_ir_and_records_the_load(tmp_path, tiny_models):
    from qcrun.cli import main

    directory = tiny_models.copy(tmp_path / "qformer", "qformer", with_attention_maps=True)
    write_ir(directory)
    out = tmp_path / "inspect.json"
    result = _run(main, ["inspect", directory, "--target", "openvino-cpu", "--json", out])
    load = json.loads(out.read_text())["load"]
    assert load["file"] == "model.xml" and load["cache"] == "none" and load["seconds"] > 0
    assert "loaded in" in result.output and "model.xml" in result.output


def test_convert_and_quantize_with_ir(tmp_path):
    from qcexport.cli import main

    out = tmp_path / "qformer"
    result = _run(main, ["convert", "qformer", "--target", "openvino-cpu", "--ir", "-o", out,
                         "--json"])
    summary = json.loads(result.output)
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary["ir"]["xml_sha256"] == manifest["ir"]["xml_sha256"]
    assert (out / "model.xml").is_file() and (out / "model.bin").is_file()
    half = tmp_path / "qformer-fp16"
    _run(main, ["quantize", out, "--precision", "fp16", "--ir", "-o", half])
    from qcrun.files import read_model_dir
    from qcrun.ir import ir_precision

    reduced = read_model_dir(half)
    assert reduced.ir is not None and ir_precision(reduced.ir) == "fp16"


def test_ir_flag_refused_for_int8_nncf_before_work(tmp_path, tiny_models):
    from qcexport.cli import main

    directory = tiny_models.dir("qformer")
    result = CliRunner().invoke(main, ["quantize", str(directory), "--precision", "int8-nncf",
                                       "--ir", "-o", str(tmp_path / "q")])
    assert result.exit_code == 1 and "OpenVINO IR already" in result.output
    assert not (tmp_path / "q").exists()

"""Attention maps exported to ONNX: they match the math path, and the regular outputs stay
identical to the model without maps (golden parity)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from qcrun.engines import open_adapter
from qcrun.golden import load_golden
from qcrun.parity import run_parity

from qcexport import mechanisms
from qcexport.export.lowering import count_ops
from qcexport.export.pipeline import weights_sha256
from qcexport.golden import golden_dir


def test_qformer_maps_from_onnx_match_the_math_path(exported, eager_maps, golden_feed):
    result = exported("qformer")
    spec = mechanisms.get("qformer")
    with open_adapter(result.path, "ort-cpu") as session:
        names = [o.name for o in session.outputs]
        assert names == ["query_outputs", "attn_map.layers.0.cross_attn"]
        for index in range(len(spec.golden_cases)):  # 49, 17 and 65 tokens, padded text
            feed = golden_feed("qformer", index)
            got = session.run(feed)
            _, ref = eager_maps("qformer", feed)
            np.testing.assert_allclose(got["attn_map.layers.0.cross_attn"],
                                       ref["attn_map.layers.0.cross_attn"], atol=1e-5, rtol=0)
            assert got["attn_map.layers.0.cross_attn"].shape[-1] == feed["image_features"].shape[1]
    # Fused attention is still fused: the maps are an extra MatMul/Softmax beside it.
    assert result.fused_expected == result.fused_found == 3
    assert all(r.passed for r in result.verification)
    assert {r.output for r in result.verification} == set(names)


def test_regular_outputs_are_those_of_the_model_without_maps(exported, golden_feed):
    result = exported("qformer")
    # The golden set holds PyTorch eager outputs of the model without maps.
    golden = load_golden(golden_dir("qformer", "tiny"), mechanism="qformer", preset="tiny")
    report = run_parity(result.path, golden, ["ort-cpu", "onnx-reference"])
    assert report.passed, report.format_matrix()
    assert {r.output for r in report.records} == {"query_outputs"}
    # Same weights, same names: the manifest's hash is the plain module's.
    manifest = json.loads((result.path.parent / "manifest.json").read_text())
    assert manifest["weights_sha256"] == weights_sha256(mechanisms.create("qformer", "tiny"))
    maps = manifest["attention_maps"]
    assert [m["output"] for m in maps["maps"]] == ["attn_map.layers.0.cross_attn"]
    assert maps["visual_input"] == "image_features" and maps["query_output"] == "query_outputs"
    # And directly, against the plain module at a shape of its own.
    feed = golden_feed("qformer", 2)
    with torch.no_grad():
        plain = mechanisms.create("qformer", "tiny")(
            **{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    with open_adapter(result.path, "ort-cpu") as session:
        np.testing.assert_allclose(session.run(feed)["query_outputs"], plain, atol=1e-5)


def test_routing_maps_survive_onnx_if(exported, eager_maps, golden_feed):
    """Hard routing stays an If; the maps (taken outside it) match eager for every branch."""
    result = exported("routing", layers=1)
    assert count_ops(onnx.load(str(result.path)))["If"] == 2  # nested: global | (local | mlp)
    spec = mechanisms.get("routing")
    ran = set()
    with open_adapter(result.path, "ort-cpu") as session:
        for index in range(len(spec.golden_cases)):
            feed = golden_feed("routing", index, layers=1)
            got = session.run(feed)
            _, ref = eager_maps("routing", feed, layers=1)
            for name in ref:
                np.testing.assert_allclose(got[name], ref[name], atol=1e-5, err_msg=name)
            branch = int(got["routing_weights"][0, 0].argmax())
            ran.add(branch)
            assert np.any(got["attn_map.layers.0.global_attn"] > 0) == (branch == 0)
            assert np.any(got["attn_map.layers.0.local_attn"] > 0) == (branch == 1)
    assert ran == {0, 1, 2}

"""Every supported Hugging Face component: taken from a real transformers model saved with
save_pretrained, converted, given a golden set and replayed on three engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qcrun.golden import load_golden

from qcexport.hf import components, load_component
from qcexport.parity import parity_for_model_dir

TARGETS = ["ort-cpu", "openvino-cpu", "onnx-reference"]

# What each component's ONNX model must look like, written out by hand (not read from the
# specs under test): input names, output names and output shapes (symbolic axes by name).
EXPECTED = {
    "qformer": (["image_features"],
                {"last_hidden_state": ["batch", 8, 32], "pooler_output": ["batch", 32]}),
    "instructblip-qformer": (["image_features", "instruction_ids", "instruction_mask"],
                             {"last_hidden_state": ["batch", "text + 8", 32],
                              "pooler_output": ["batch", 32]}),
    "idefics-resampler": (["context"], {"perceiver_embeddings": ["batch", 8, 32]}),
    "idefics-gated-xattn": (["hidden_states", "image_hidden_states", "image_attention_mask"],
                            {"output": ["batch", "text", 32]}),
    "idefics2-resampler": (["context", "attention_mask"],
                           {"perceiver_embeddings": ["batch", 8, 64]}),
    "kosmos2-projection": (["features"], {"image_embeds": ["batch", 8, 32]}),
}
# The transformers class each component takes.
CLASSES = {
    "qformer": "Blip2QFormerModel",
    "instructblip-qformer": "InstructBlipQFormerModel",
    "idefics-resampler": "IdeficsPerceiverResampler",
    "idefics-gated-xattn": "IdeficsGatedCrossAttentionLayer",
    "idefics2-resampler": "Idefics2PerceiverResampler",
    "kosmos2-projection": "Kosmos2ImageToTextProjection",
}


def test_every_component_is_tested():
    assert sorted(EXPECTED) == sorted(components.names()) == sorted(CLASSES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_component_takes_the_transformers_class(name, tiny_hf):
    comp = load_component(tiny_hf[name], name)
    found = {type(m).__name__ for m in comp.module.modules()}
    assert CLASSES[name] in found
    assert comp.metadata["source"]["component_class"] == CLASSES[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_convert_and_parity(name, converted):
    c = converted(name)
    manifest = json.loads((c.model_dir / "manifest.json").read_text())
    inputs, outputs = EXPECTED[name]
    assert [s["name"] for s in manifest["inputs"]] == inputs
    assert {s["name"]: s["shape"] for s in manifest["outputs"]} == outputs
    assert manifest["source"]["component"] == name
    assert manifest["mechanism"] == "custom"

    gset = load_golden(c.golden_dir)
    assert gset.manifest.source["component"] == name
    assert all(set(case.outputs) == set(outputs) for case in gset.cases)
    assert len(gset.cases) == 3

    run = parity_for_model_dir(c.model_dir, TARGETS, golden=c.golden_dir)
    assert run.passed, run.report.format_matrix()
    ran = [r for r in run.report.records if r.verdict == "pass"]
    # every case x output x target ran and passed: nothing skipped into a pass
    assert len(ran) == len(gset.cases) * len(outputs) * len(TARGETS)


def test_instructblip_padding_is_masked(converted):
    """Padded instruction tokens do not reach the queries: changing their ids changes no query
    output, in eager and in the exported model."""
    import onnxruntime as ort

    c = converted("instructblip-qformer")
    comp = load_component(c.hf_dir, "instructblip-qformer")
    case = next(feed for case, feed in comp.cases() if case.name == "padded")
    padded = case["instruction_mask"] == 0
    assert padded.any()
    other = {k: v.clone() for k, v in case.items()}
    other["instruction_ids"][padded] = (other["instruction_ids"][padded] + 7) % 90 + 1
    session = ort.InferenceSession(str(c.model_dir / "model.onnx"))
    queries = 8
    for feed in (case, other):
        with torch.no_grad():
            eager = comp.module(**feed).last_hidden_state[:, :queries].numpy()
        onnx_out = session.run(["last_hidden_state"],
                               {k: v.numpy() for k, v in feed.items()})[0][:, :queries]
        np.testing.assert_allclose(onnx_out, eager, atol=1e-4)
        if feed is case:
            first = eager
    np.testing.assert_allclose(eager, first, atol=1e-5)


def test_idefics_gate_is_open(tiny_hf):
    """The tiny model's gates are open, so the layer is no identity and parity is not trivial;
    a token that sees no image only goes through the (gated) MLP branch."""
    comp = load_component(tiny_hf["idefics-gated-xattn"], "idefics-gated-xattn")
    layer = comp.module.layer
    assert float(layer.alpha_cross_attn.detach().abs().min()) > 0.5
    feed = comp.example_inputs
    with torch.no_grad():
        out = comp.module(**feed)
    assert float((out - feed["hidden_states"]).abs().max()) > 0.1
    # changing the image changes tokens that see it, not the token that sees none (row 0, t 0)
    other = dict(feed, image_hidden_states=feed["image_hidden_states"] + 1.0)
    with torch.no_grad():
        moved = (comp.module(**other) - out).abs().amax(dim=-1)
    assert float(moved[0, 0]) == 0.0
    assert float(moved[0, 1:].min()) > 1e-3

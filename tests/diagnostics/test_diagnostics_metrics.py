"""qcrun.diagnostics: the numpy-only metrics, on arrays whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from qcrun.diagnostics import (
    Run,
    analyse,
    entropy,
    near_duplicates,
    normalized_entropy,
    pairwise_cosine,
    parse_grid,
    parse_sizes,
    random_feed,
    require_maps,
    sweep_feeds,
    token_grid,
)
from qcrun.errors import UserError
from qcrun.files import parse_model_manifest


@pytest.mark.parametrize(("tokens", "grid", "layout", "shape"), [
    (49, None, "grid", (7, 7)),
    (50, None, "grid+cls", (7, 7)),
    (17, None, "grid+cls", (4, 4)),
    (257, None, "grid+cls", (16, 16)),
    (1, None, "grid", (1, 1)),
    (2, None, "strip", (None, None)),  # not 1x1 + CLS: too small to call a grid
    (8, None, "strip", (None, None)),
    (8, (2, 4), "grid", (2, 4)),
    (9, (2, 4), "grid+cls", (2, 4)),
    (10, (2, 4), "strip", (None, None)),
])
def test_token_grid(tokens, grid, layout, shape):
    g = token_grid(tokens, grid)
    assert (g.layout, (g.rows, g.cols)) == (layout, shape)
    assert (g.note is None) == (layout != "strip")
    if layout == "strip":
        assert "1-D strip" in g.note and str(tokens) in g.note


def test_parse_grid_and_sizes():
    assert parse_grid("16x24") == (16, 24)
    assert parse_grid(None) is None
    for bad in ("16", "0x4", "axb"):
        with pytest.raises(UserError, match="ROWSxCOLS"):
            parse_grid(bad)
    assert parse_sizes(["tokens=257", "batch=2"]) == {"tokens": 257, "batch": 2}
    with pytest.raises(UserError, match="AXIS=N"):
        parse_sizes(["tokens"])


def test_entropy_of_known_distributions():
    p = np.array([[0.25, 0.25, 0.25, 0.25], [1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]])
    h = entropy(p)
    np.testing.assert_allclose(h[:3], [math.log(4), 0.0, math.log(2)])
    assert np.isnan(h[3])  # a query that sees nothing has no entropy
    np.testing.assert_allclose(normalized_entropy(p)[:3], [1.0, 0.0, 1.0])  # over visible keys
    assert np.isnan(normalized_entropy(p)[3])


def test_cosine_and_duplicates_flag_identical_queries():
    rng = np.random.default_rng(0)
    outputs = rng.standard_normal((5, 16))
    outputs[3] = outputs[1]
    attention = rng.dirichlet(np.ones(10), size=5)
    attention[3] = attention[1]
    out_cos, attn_cos = pairwise_cosine(outputs), pairwise_cosine(attention)
    assert out_cos[1, 3] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diag(out_cos), 1.0)
    pairs = near_duplicates(out_cos, attn_cos, 0.95)
    assert [(d["i"], d["j"]) for d in pairs] == [(1, 3)]
    # Same attention but different outputs: not redundant.
    outputs[3] = rng.standard_normal(16)
    assert near_duplicates(pairwise_cosine(outputs), attn_cos, 0.95) == []
    # A query that sees nothing (zero row) is never a duplicate by its attention.
    attention[3] = 0
    assert np.isnan(pairwise_cosine(attention)[1, 3])


def _descriptor(**extra):
    return {
        "format": 1, "mechanism": "toy", "heads": "mean", "visual_input": "x",
        "token_axis": 1, "media_axis": None, "rows": "batch", "queries": "queries",
        "query_output": "y",
        "maps": [{"output": "attn_map.a", "core": "a", "layer": 0, "label": "toy",
                  "keys": "visual", "heads": 1, "same_queries": True}],
        **extra,
    }


def test_analyse_on_hand_made_maps():
    # 3 queries over a 2x2 grid: query 0 on token 3, query 1 uniform, query 2 a copy of 0.
    maps = np.array([[[0, 0, 0, 1.0], [0.25] * 4, [0, 0, 0, 1.0]]])
    y = np.array([[[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]]])
    run = Run("toy", {"x": np.zeros((1, 4, 2), np.float32)}, {"attn_map.a": maps, "y": y})
    result = analyse(_descriptor(), [run])
    case = result["cases"][0]
    m = case["maps"][0]
    assert case["grid"]["layout"] == "grid" and case["grid"]["rows"] == 2
    assert m["peak_token"] == [3, 0, 3] and m["peak_cell"][0] == [1, 1]
    assert m["normalized_entropy"] == [0.0, 1.0, 0.0]
    spec = case["specialisation"]
    assert [(d["i"], d["j"]) for d in spec["near_duplicates"]] == [(0, 2)]
    assert result["warnings"] == []


def test_analyse_warns_when_tokens_do_not_form_a_grid():
    maps = np.full((1, 2, 6), 1 / 6)
    run = Run("odd", {"x": np.zeros((1, 6, 2), np.float32)},
              {"attn_map.a": maps, "y": np.ones((1, 2, 3))})
    result = analyse(_descriptor(), [run])
    assert result["cases"][0]["grid"]["layout"] == "strip"
    assert len(result["warnings"]) == 1 and "6 visual tokens" in result["warnings"][0]
    with pytest.raises(UserError, match="no sample 1"):
        analyse(_descriptor(), [run], sample=1)


def test_media_keys_pick_the_image_each_text_token_sees():
    # 2 text tokens over 2 media items of 4 tokens: token 0 sees image 2, token 1 nothing.
    row0 = np.zeros(8)
    row0[4:] = [0.1, 0.2, 0.6, 0.1]
    maps = np.stack([row0, np.zeros(8)])[None]
    descriptor = _descriptor(query_output=None)
    descriptor["maps"][0]["keys"] = "media"
    run = Run("media", {"x": np.zeros((1, 2, 4, 3), np.float32)}, {"attn_map.a": maps})
    descriptor["token_axis"] = 2
    m = analyse(descriptor, [run])["cases"][0]["maps"][0]
    assert m["media"] == [2, None]
    assert m["peak_token"] == [2, None] and m["peak_cell"] == [[1, 0], None]
    assert m["entropy"][1] is None


def test_require_maps_says_how_to_re_export():
    data = {"format": 1, "mechanism": "qformer", "preset": "tiny", "precision": "fp32",
            "model": "model.onnx", "model_sha256": "0" * 64, "inputs": [], "outputs": []}
    manifest = parse_model_manifest(data, where="out/q/manifest.json")
    with pytest.raises(UserError) as err:
        require_maps(manifest, ["query_outputs"], "out/q")
    assert "no attention-map outputs" in str(err.value)
    assert "qcexport convert qformer --preset tiny --with-attention-maps" in str(err.value)
    manifest = parse_model_manifest({**data, "attention_maps": _descriptor()}, where="m")
    with pytest.raises(UserError, match="lacks: attn_map.a"):
        require_maps(manifest, ["y"], "out/q")
    assert require_maps(manifest, ["y", "attn_map.a"], "out/q")["mechanism"] == "toy"


def test_random_feed_and_sweep_feeds():
    descriptor = _descriptor(sweep={"input": "m", "values": [1, 2, 4], "output": "y"})
    specs = [{"name": "x", "dtype": "float32", "shape": ["batch", "tokens", 5]},
             {"name": "mask", "dtype": "bool", "shape": ["batch", "tokens"]},
             {"name": "ids", "dtype": "int64", "shape": ["batch", "text"]},
             {"name": "m", "dtype": "int64", "shape": []}]
    specs[2]["range"] = {"min": 3, "max": 5}
    descriptor["example_sizes"] = {"batch": 1, "tokens": 49, "text": 8}
    feed = random_feed(specs, descriptor, sizes={"tokens": 50})
    assert feed["x"].shape == (1, 50, 5) and feed["x"].dtype == np.float32
    # masks keep their first position; integers stay in their recorded range
    assert feed["mask"][:, 0].all() and feed["mask"].dtype == bool
    assert feed["ids"].shape == (1, 8)  # the example's text length
    assert feed["ids"].min() >= 3 and feed["ids"].max() <= 5
    assert feed["m"].shape == () and int(feed["m"]) == 4
    values = [(v, int(f["m"])) for v, f in sweep_feeds(descriptor, feed)]
    assert values == [(1, 1), (2, 2), (4, 4)]


def test_a_sample_missing_from_some_cases_skips_them_with_a_note():
    one = Run("one", {"x": np.zeros((1, 4, 2), np.float32)},
              {"attn_map.a": np.full((1, 2, 4), 0.25), "y": np.ones((1, 2, 3))})
    two = Run("two", {"x": np.zeros((2, 4, 2), np.float32)},
              {"attn_map.a": np.full((2, 2, 4), 0.25), "y": np.ones((2, 2, 3))})
    result = analyse(_descriptor(), [one, two], sample=1)
    assert [c["case"] for c in result["cases"]] == ["two"]
    assert result["warnings"] == ["case one has 1 rows: no sample 1, skipped"]

"""The context/query split: exact for every mechanism with a context, refused across models,
guarded against a tampered cut, and Flamingo's decoding loop token by token."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import qcrun
import torch
from qcrun.errors import UserError
from qcrun.files import read_model_dir

from qcexport import mechanisms
from qcexport.split.model_dir import split_model_dir

pytestmark = pytest.mark.slow
FP32_ATOL = 1e-5  # the fp32 policy's element bound (qcrun.parity) is looser than this
WITH_CONTEXT = [n for n in mechanisms.names() if mechanisms.get(n).context_inputs]


@pytest.fixture(scope="module")
def split_dirs(tiny_models, tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            dest = tmp_path_factory.mktemp("split") / name
            tiny_models.copy(dest, name)
            split_model_dir(dest)
            done[name] = dest
        return done[name]

    return get


def test_every_mechanism_with_a_query_side_has_context_inputs():
    for name in WITH_CONTEXT:
        spec = mechanisms.get(name)
        every = {*spec.input_names, *spec.optional_inputs}
        assert set(spec.context_inputs) < every, name  # a strict subset: something is queried
    assert {"qformer", "routing", "flamingo-xattn", "matryoshka", "perceiver-io"} \
        <= set(WITH_CONTEXT)


@pytest.mark.parametrize("name", WITH_CONTEXT)
def test_pair_reproduces_single_graph_and_eager(name, split_dirs):
    directory = split_dirs(name)
    spec = mechanisms.get(name)
    config = spec.config("tiny")
    module = mechanisms.create(name, "tiny")
    with qcrun.load(directory, target="ort-cpu") as model:
        for case in (*spec.golden_cases, spec.verify_case):
            tensors = spec.inputs(config, case)
            feed = {k: v.numpy() for k, v in tensors.items()}
            whole = model(**feed)
            ctx = model.encode(**{k: feed[k] for k in spec.context_inputs})
            pair = model.query(ctx, **{k: v for k, v in feed.items()
                                       if k not in spec.context_inputs})
            with torch.no_grad():
                eager = module(**tensors)
            eager = eager if isinstance(eager, (tuple, list)) else (eager,)
            assert set(pair) == set(whole)
            for out, ref in zip(spec.output_names, eager, strict=False):
                np.testing.assert_allclose(pair[out], whole[out], atol=FP32_ATOL, rtol=0)
                np.testing.assert_allclose(pair[out], ref.numpy(), atol=FP32_ATOL, rtol=1e-4)


def test_the_cut_is_after_the_visual_projections(split_dirs):
    """Only the visual keys and values cross for the Q-Former: no shape scalar, no mask of
    ones, no raw features."""
    manifest = read_model_dir(split_dirs("qformer")).manifest
    config = mechanisms.get("qformer").config("tiny")
    crossing = manifest.split.boundary
    cross_layers = len(range(0, config.layers, config.cross_attention_freq))
    assert all(len(b.shape) == 4 and b.dtype == "float32" for b in crossing)
    assert "tokens" in crossing[0].shape
    assert len(crossing) == 2 * cross_layers  # one key and one value per cross-attention


def test_context_from_another_model_is_refused(split_dirs):
    q, r = split_dirs("qformer"), split_dirs("matryoshka")
    spec = mechanisms.get("matryoshka")
    feed = {k: v.numpy() for k, v in spec.inputs(spec.config("tiny")).items()}
    with qcrun.load(q, target="ort-cpu") as qformer, qcrun.load(r, target="ort-cpu") as other:
        ctx = other.encode(image_features=feed["image_features"])
        with pytest.raises(UserError, match="computed by another model") as info:
            qformer.query(ctx, text_ids=np.zeros((1, 4), np.int64),
                          text_mask=np.ones((1, 4), np.int64))
        assert info.value.stage == "query"
        with pytest.raises(UserError, match="needs a Context"):
            qformer.query(dict(ctx.arrays), text_ids=np.zeros((1, 4), np.int64),
                          text_mask=np.ones((1, 4), np.int64))


def test_tampered_boundary_is_refused(split_dirs, tmp_path):
    directory = shutil.copytree(split_dirs("qformer"), tmp_path / "m")
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["split"]["boundary"][0]["shape"][1] = 5  # heads: the graph says 4
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="split.boundary"):
        read_model_dir(directory)
    data["split"]["boundary"] = data["split"]["boundary"][:1]  # a boundary tensor dropped
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="split"):
        read_model_dir(directory)


def test_swapped_query_graph_is_refused(split_dirs, tmp_path):
    directory = shutil.copytree(split_dirs("qformer"), tmp_path / "m")
    shutil.copy(split_dirs("matryoshka") / "query.onnx", directory / "query.onnx")
    with pytest.raises(UserError, match="changed after export"):
        qcrun.load(directory, target="ort-cpu")


def test_old_manifest_without_split_still_reads(tiny_models):
    model = read_model_dir(tiny_models.dir("qformer"))
    assert model.manifest.split is None
    with qcrun.load(model.path, target="ort-cpu") as m, pytest.raises(UserError, match="split"):
        m.encode(image_features=np.zeros((1, 5, 48), np.float32))


def test_flamingo_decoding_loop_matches_eager_token_by_token(split_dirs):
    """One decoding step: the query graph gets the new token only, against the cached
    image context, and matches eager on the whole sequence at that token."""
    spec = mechanisms.get("flamingo-xattn")
    module = mechanisms.create("flamingo-xattn", "tiny")
    tensors = spec.inputs(spec.config("tiny"), spec.golden_cases[0])
    with torch.no_grad():
        eager = module(**tensors).numpy()
    feed = {k: v.numpy() for k, v in tensors.items()}
    steps = feed["text_hidden"].shape[1]
    with qcrun.load(split_dirs("flamingo-xattn"), target="ort-cpu") as model:
        ctx = model.encode(media_features=feed["media_features"])
        for t in range(steps):
            out = model.query(ctx, text_hidden=feed["text_hidden"][:, t:t + 1],
                              media_ids=feed["media_ids"][:, t:t + 1])["text_hidden_out"]
            assert out.shape == (1, 1, eager.shape[-1])
            np.testing.assert_allclose(out[:, 0], eager[:, t], atol=FP32_ATOL, rtol=1e-4)
    assert (feed["media_ids"] == 0).any() and (feed["media_ids"] > 0).any()  # both kinds of step


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_encode_query_threads(split_dirs, target):
    """Concurrent queries against one context give the serial answers (OpenVINO holds the
    context in its own tensors)."""
    from concurrent.futures import ThreadPoolExecutor

    ok, why = qcrun.engines.availability(target)
    if not ok:
        pytest.skip(why)
    spec = mechanisms.get("qformer")
    config = spec.config("tiny")
    feeds = [{k: v.numpy() for k, v in spec.inputs(config, case, seed=i).items()}
             for i, case in enumerate(spec.golden_cases[:1] * 6)]
    with qcrun.load(split_dirs("qformer"), target=target) as model:
        ctx = model.encode(image_features=feeds[0]["image_features"])
        queries = [{k: v for k, v in f.items() if k != "image_features"} for f in feeds]
        serial = [model.query(ctx, **q) for q in queries]
        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(lambda q: model.query(ctx, **q), queries))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a["query_outputs"], b["query_outputs"])


def test_unknown_context_input_is_a_clean_error(tiny_models, tmp_path):
    directory = tiny_models.copy(tmp_path / "m", "qformer")
    with pytest.raises(UserError, match="not inputs of the model"):
        split_model_dir(directory, ["pixels"])
    with pytest.raises(UserError, match="nothing is left to query"):
        split_model_dir(directory, ["image_features", "text_ids", "text_mask"])
    assert read_model_dir(directory).manifest.split is None  # nothing half-written


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_perceiver_io_new_queries_against_cached_latents_match_eager(split_dirs, target):
    """Perceiver IO's output queries are an optional run-time input of the query graph: the
    latents are encoded once and new queries of any count are decoded against them, as eager
    computes them from the whole image; left out, the learned queries are used."""
    ok, why = qcrun.engines.availability(target)
    if not ok:
        pytest.skip(why)
    spec = mechanisms.get("perceiver-io")
    module = mechanisms.create("perceiver-io", "tiny")
    tensors = spec.inputs(spec.config("tiny"), spec.golden_cases[1])  # two images, one padded
    g = torch.Generator().manual_seed(7)
    new = [torch.randn(n, module.config.output_dim, generator=g) for n in (1, 3, 8, 13)]
    with torch.no_grad():
        learned = module(**tensors).numpy()
        wanted = [module(**tensors, queries=q).numpy() for q in new]
    directory = split_dirs("perceiver-io")
    cut = read_model_dir(directory).manifest.split
    assert cut.query_defaults == ["queries"]
    # the encoder's self-attention layers are all on the context side: the query graph is
    # the decoder (one cross-attention)
    with qcrun.load(directory, target=target) as model:
        ctx = model.encode(**{k: v.numpy() for k, v in tensors.items()})
        np.testing.assert_allclose(model.query(ctx)["outputs"], learned, atol=FP32_ATOL, rtol=0)
        for q, want in zip(new, wanted, strict=True):
            got = model.query(ctx, queries=q.numpy())["outputs"]
            assert got.shape == (2, q.shape[0], module.config.output_dim)
            np.testing.assert_allclose(got, want, atol=FP32_ATOL, rtol=1e-4)
        # a new query changes the answer (the input is really read, not the default)
        assert np.abs(model.query(ctx, queries=new[2].numpy())["outputs"] - learned).max() > 1e-3
        with pytest.raises(UserError, match="not an input|queries"):
            model(**{k: v.numpy() for k, v in tensors.items()}, queries=new[0].numpy())


def test_perceiver_io_query_graph_is_the_decoder_only(split_dirs):
    import onnx

    directory = split_dirs("perceiver-io")
    query = onnx.load(str(directory / "query.onnx"))
    context = onnx.load(str(directory / "context.onnx"))
    config = mechanisms.get("perceiver-io").config("tiny")
    attention = [n for n in query.graph.node if n.op_type == "Attention"]
    assert len(attention) == 1  # the decoder's cross-attention
    assert sum(n.op_type == "Attention" for n in context.graph.node) == 1 + config.self_layers
    assert [i.name for i in query.graph.input][-1] == "queries"
    assert "queries" not in {t.name for t in query.graph.initializer}  # required there


def test_split_model_through_parity_quantize_and_bundle(split_dirs, tmp_path):
    """parity runs the pair too; quantize re-splits the reduced model (the pair verified
    against its own single graph); a bundle carries both graphs, verifies without torch and
    encodes/queries through qcrun.load."""
    import subprocess
    import sys

    from qcexport.bundle import make_bundle
    from qcexport.optimize import quantize_model_dir
    from qcexport.parity import parity_for_model_dir

    directory = shutil.copytree(split_dirs("perceiver-io"), tmp_path / "m")
    run = parity_for_model_dir(directory, ["ort-cpu", "openvino-cpu"], optional=["openvino-cpu"])
    pair = [r for r in run.report.records if r.case.endswith("[context+query]")]
    assert run.passed and pair and all(r.verdict == "pass" for r in pair)
    assert {r.case.split(" ")[0] for r in pair} == {"b1_t49", "b2_t17_pad", "b2_t65"}

    quantized = tmp_path / "q"
    quantize_model_dir(directory, "int8-dynamic", quantized)
    model = read_model_dir(quantized)
    assert model.precision == "int8-dynamic" and model.manifest.split is not None
    assert model.manifest.split.query_sha256 != read_model_dir(directory).manifest.split \
        .query_sha256  # the reduced model's graphs, not the fp32 ones

    bundle = tmp_path / "m.bundle"
    make_bundle(directory, target="ort-cpu", output=bundle)
    assert {"context.onnx", "query.onnx"} <= {p.name for p in bundle.iterdir()}
    listed = json.loads((bundle / "bundle.json").read_text())
    assert {"context.onnx", "query.onnx"} <= set(json.dumps(listed).replace('"', " ").split())
    script = (
        "import sys, numpy as np, qcrun\n"
        "sys.modules['torch'] = None  # a device has no torch\n"
        f"m = qcrun.load({str(bundle)!r})\n"
        "ctx = m.encode(image_features=np.ones((1, 5, 64), np.float32),"
        " image_mask=np.ones((1, 5), bool))\n"
        "out = m.query(ctx, queries=np.ones((3, 32), np.float32))['outputs']\n"
        "assert out.shape == (1, 3, 32), out.shape\n"
        "print('ok', m.query(ctx)['outputs'].shape)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ok (1, 8, 32)" in done.stdout
    verify = subprocess.run([sys.executable, "-m", "qcrun.cli", "verify", str(bundle)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_nncf_refuses_a_split_model_with_the_fix(split_dirs, tmp_path):
    from qcexport.split.model_dir import split_of

    with pytest.raises(UserError, match="OpenVINO IR") as info:
        split_of(split_dirs("qformer"), "int8-nncf")
    assert "unsplit" in info.value.hint

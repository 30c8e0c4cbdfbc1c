"""profile and inspect of a split model: the context graph (encode) and the query graph against
a cached context get latency rows of their own, and inspect shows the cut."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner
from qcrun.cli import main as qcrun_main
from qcrun.context import SplitInfo
from qcrun.engines import LoadFailed, adapter_for
from qcrun.files import read_model_dir
from qcrun.latency import SweepPoint, synthetic_feeds
from qcrun.profile import profile_model
from qcrun.profiling.records import CONTEXT, FULL, QUERY, ProfileReport
from qcrun.schema import dump, parse

from qcexport import mechanisms
from qcexport.cli import main as qcexport_main
from qcexport.split.model_dir import split_model_dir

pytestmark = pytest.mark.slow
CONFIG = mechanisms.get("qformer").config("tiny")
TOKENS = (9, 33)


def context_bytes(batch: int, tokens: int) -> int:
    """One Q-Former context, from its config: a key and a value [batch, heads, tokens,
    head_dim] of float32 per cross-attention layer."""
    cross = len(range(0, CONFIG.layers, CONFIG.cross_attention_freq))
    return 2 * cross * batch * CONFIG.heads * tokens * (CONFIG.dim // CONFIG.heads) * 4


@pytest.fixture(scope="module")
def split_qformer(tiny_models, tmp_path_factory):
    directory = tiny_models.copy(tmp_path_factory.mktemp("split") / "qformer", "qformer")
    split_model_dir(directory)
    return read_model_dir(directory)


class Counting:
    """The real adapters of ``adapter_for``, with their runs counted per model file."""

    def __init__(self, fail: str | None = None):
        self.runs: dict[str, int] = {}
        self.fail = fail

    def __call__(self, path, target, **options):
        if path.name == self.fail:
            raise LoadFailed(f"{path.name} refused by the test")
        adapter = adapter_for(path, target, **options)
        name, run = path.name, adapter.run
        run_held = adapter.run_held

        def counted(feed):
            self.runs[name] = self.runs.get(name, 0) + 1
            return run(feed)

        def counted_held(feed, held):
            self.runs[name] = self.runs.get(name, 0) + 1
            return run_held(feed, held)

        adapter.run, adapter.run_held = counted, counted_held
        return adapter


def profile(model, factory=adapter_for, split=True, **kwargs) -> ProfileReport:
    points = [SweepPoint.of({"batch": 1, "tokens": t}) for t in TOKENS]
    feeds = synthetic_feeds(model)
    return profile_model(model.model, ["ort-cpu"], points,
                         lambda p: feeds(model.manifest, p), warmup=1, runs=3, op_runs=0,
                         gemm_sizes=None, adapter_factory=factory,
                         split=model if split else None, **kwargs)


def test_profile_times_encode_and_query_with_a_context_encoded_once(split_qformer):
    counting = Counting()
    report = profile(split_qformer, counting)
    ort = report.target("ort-cpu")
    assert ort.status == "ok", ort.reason
    assert [(p.graph, p.sizes["tokens"]) for p in ort.rows()] == [
        (g, t) for t in TOKENS for g in (FULL, CONTEXT, QUERY)]
    for p in ort.split_points:
        assert len(p.samples_ms) == 3 and p.stats.p50_ms > 0
        assert p.context_bytes == context_bytes(1, p.sizes["tokens"])
    # the context graph runs once per point untimed (the context the queries read), then
    # warm-up + timed; the query graph never encodes again
    assert counting.runs["context.onnx"] == len(TOKENS) * (1 + 1 + 3)
    assert counting.runs["query.onnx"] == len(TOKENS) * (1 + 3)
    assert counting.runs["model.onnx"] == len(TOKENS) * (1 + 3)
    query = [p for p in ort.split_points if p.graph == QUERY][0]
    boundary = [b.name for b in split_qformer.manifest.split.boundary]
    assert set(query.input_shapes) == {"text_ids", "text_mask", *boundary}
    assert query.input_shapes[boundary[0]][2] == TOKENS[0]  # [batch, heads, tokens, dim]
    assert {p.flops for p in ort.split_points} != {None}  # each graph's own FLOPs


def test_split_rows_in_json_markdown_and_html(split_qformer):
    from qcrun.report_html import render_html

    report = profile(split_qformer)
    back = ProfileReport.from_json(report.to_json())
    ort = back.target("ort-cpu")
    assert [(p.graph, p.context_bytes) for p in ort.split_points] == [
        (g, context_bytes(1, t)) for t in TOKENS for g in (CONTEXT, QUERY)]
    summary = ort.split_summary()
    assert [r.sizes["tokens"] for r in summary] == list(TOKENS)
    row = summary[0]
    assert row.full_ms == ort.points[0].stats.p50_ms
    assert row.per_query_speedup == pytest.approx(row.full_ms / row.query_ms)
    data = json.loads(report.to_json())["targets"][0]
    assert data["split"][0]["context_bytes"] == context_bytes(1, TOKENS[0])
    markdown = report.to_markdown()
    assert "batch=1 tokens=9 [encode: context graph]" in markdown
    assert "batch=1 tokens=33 [query: cached context]" in markdown
    assert "queries to break even" in markdown
    html = render_html(report)
    assert "Split model: encode once" in html and "[query: cached context]" in html


def test_unsplit_profile_has_no_split_rows(split_qformer):
    report = profile(split_qformer, split=False)
    ort = report.target("ort-cpu")
    assert ort.split_points == [] and ort.split_summary() == []
    assert "[encode" not in report.to_markdown() and "Split model" not in report.to_markdown()


def test_split_graph_that_fails_to_load_fails_the_target(split_qformer):
    report = profile(split_qformer, Counting(fail="query.onnx"))
    ort = report.target("ort-cpu")
    assert ort.status == "failed" and "split graphs" in ort.reason
    assert "query.onnx refused" in ort.reason


def test_qcrun_profile_of_a_split_bundle(split_qformer, tmp_path):
    from qcexport.bundle import make_bundle

    bundle = tmp_path / "q.bundle"
    make_bundle(split_qformer.path, target="ort-cpu", output=bundle)
    out = tmp_path / "p.json"
    result = CliRunner().invoke(qcrun_main, [
        "profile", str(bundle), "--target", "ort-cpu", "--runs", "2", "--warmup", "0",
        "--op-runs", "0", "--gemm-sizes", "0", "--tokens", "17", "--json", str(out)])
    assert result.exit_code == 0, result.output
    ort = ProfileReport.from_json(out.read_text()).target("ort-cpu")
    assert [p.graph for p in ort.rows()] == [FULL, CONTEXT, QUERY]
    assert ort.split_points[0].context_bytes == context_bytes(1, 17)
    assert "[query: cached context]" in result.output


def _node_count(path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def test_qcrun_inspect_shows_the_cut(split_qformer, tmp_path):
    out = tmp_path / "i.json"
    result = CliRunner().invoke(qcrun_main, ["inspect", str(split_qformer.path), "--size",
                                             "tokens=1025", "--json", str(out)])
    assert result.exit_code == 0, result.output
    info = parse(SplitInfo, json.loads(out.read_text())["split"], where="test", stage="test")
    cut = split_qformer.manifest.split
    assert [s.name for s in info.context_inputs] == ["image_features"]
    assert [s.name for s in info.query_inputs] == ["text_ids", "text_mask"]
    assert [(b.name, b.dtype, b.shape) for b in info.boundary] == [
        (b.name, "float32", ["batch", CONFIG.heads, "tokens", CONFIG.dim // CONFIG.heads])
        for b in cut.boundary]
    directory = split_qformer.path
    assert info.nodes == {"full": _node_count(directory / "model.onnx"),
                          "context": _node_count(directory / "context.onnx"),
                          "query": _node_count(directory / "query.onnx")}
    [one] = info.contexts
    assert one.nbytes == context_bytes(1, 1025)
    assert one.shapes[cut.boundary[0].name] == [1, CONFIG.heads, 1025, CONFIG.dim // CONFIG.heads]
    assert f"{context_bytes(1, 1025):,} bytes" in result.output
    assert "boundary" in result.output and "query inputs" in result.output


def test_qcexport_inspect_shows_a_context_per_golden_case(split_qformer, tmp_path):
    spec = mechanisms.get("qformer")
    result = CliRunner().invoke(qcexport_main, ["inspect", str(split_qformer.path), "-o",
                                                str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    info = parse(SplitInfo, json.loads(result.output)["split"], where="test", stage="test")
    want = {c.name: context_bytes(c.params["batch"], c.params["tokens"])
            for c in spec.golden_cases}
    assert {c.case: c.nbytes for c in info.contexts} == want
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["split"] == dump(info)


def test_inspect_of_an_unsplit_model_still_asks_for_maps(tiny_models):
    result = CliRunner().invoke(qcrun_main, ["inspect", str(tiny_models.dir("qformer"))])
    assert result.exit_code == 1 and "attention-map" in result.output
    assert "split model" not in result.output

"""`qcexport inspect` and `qcrun inspect`: the page, the PNGs, the numbers, the bad inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import qcrun
from click.testing import CliRunner
from PIL import Image
from qcrun.cli import main as qcrun_main

from qcexport.cli import main as qcexport_main
from qcexport.golden import golden_dir


def qcexport(*args):
    return CliRunner().invoke(qcexport_main, [str(a) for a in args])


def qcrun_cli(*args):
    return CliRunner().invoke(qcrun_main, [str(a) for a in args])


def _images(index: Path) -> list[str]:
    return re.findall(r"<img src='([^']+)'", index.read_text())


@pytest.mark.slow
def test_inspect_qformer_writes_page_pngs_and_metrics(tmp_path):
    out = tmp_path / "inspect"
    result = qcexport("inspect", "qformer", "--preset", "tiny", "-o", out)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "index.html" in result.output

    index = out / "index.html"
    sources = _images(index)
    # 8 query heatmaps and 2 cosine matrices, every one a relative path to a real PNG.
    assert len(sources) == 10
    for src in sources:
        assert not src.startswith(("/", "http")) and ".." not in src
        with Image.open(out / src) as png:
            assert png.format == "PNG" and png.width >= 100 and png.height >= 100
    assert "metrics.json" in index.read_text()
    assert (out / "img/b1_t49_text/layers.0.cross_attn/sheet.png").is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    case = metrics["cases"][0]
    assert case["case"] == "b1_t49_text" and case["grid"]["layout"] == "grid"
    m = case["maps"][0]
    assert m["queries"] == 8 and m["key_count"] == 49
    assert all(0 < h <= np.log(49) + 1e-6 for h in m["entropy"])
    spec = case["specialisation"]
    assert len(spec["output_cosine"]) == 8 and spec["output_cosine"][3][3] == pytest.approx(1)

    # A second run replaces the images instead of piling up stale ones.
    stale = out / "img" / "stale.png"
    stale.write_bytes(b"x")
    assert qcexport("inspect", "qformer", "-o", out).exit_code == 0
    assert not stale.exists() and not list(out.glob(".inspect-*"))


@pytest.mark.slow
def test_inspect_overlays_an_image_and_conditions_on_text(tmp_path):
    picture = tmp_path / "scene.png"
    Image.new("RGB", (140, 100), (20, 40, 90)).save(picture)
    out = tmp_path / "inspect"
    result = qcexport("inspect", "qformer", "--image", picture, "--text", "a red car",
                      "--text", "the sky", "--grid", "5x7", "-o", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [c["case"] for c in metrics["cases"]] == ["t0-a-red-car", "t1-the-sky"]
    assert metrics["cases"][0]["grid"]["rows"] == 5 and metrics["cases"][0]["visual_tokens"] == 35
    with Image.open(out / "img/t0-a-red-car/layers.0.cross_attn/q000.png") as png:
        # the 5x7 grid drawn 7 cells wide: wider than tall, below a caption
        assert png.width > 7 * 20 - 1
    assert "scene.png" in (out / "index.html").read_text()


def test_unreadable_image_is_a_clean_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    result = qcexport("inspect", "qformer", "--image", bad, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert f"cannot read image {bad}" in result.output and "Traceback" not in result.output
    missing = qcexport("inspect", "qformer", "--image", tmp_path / "nope.jpg", "-o", tmp_path)
    assert missing.exit_code == 1 and "nope.jpg" in missing.output


def test_tokens_without_a_grid_fall_back_to_a_strip(tmp_path):
    out = tmp_path / "xattn"
    result = qcexport("inspect", "flamingo-xattn", "-o", out)  # 8 tokens per image
    assert result.exit_code == 0, result.output
    assert "8 visual tokens do not form a square patch grid" in result.output
    assert "1-D strip" in (out / "index.html").read_text()
    with Image.open(out / "img/b1_t12_m2/blocks.0.attn/q005.png") as png:
        assert png.width == 8 * 24 and png.height < 80  # one row of 8 cells under a caption
    metrics = json.loads((out / "metrics.json").read_text())
    gates = metrics["cases"][0]["gates"]
    assert [g["attention_gate"] for g in gates["layers"]] == pytest.approx([np.tanh(0.55)] * 2)
    assert 0 < gates["overall_visual_share"] < 1
    assert metrics["cases"][0]["maps"][0]["media"][:3] == [None, None, None]  # before any image


@pytest.mark.slow
def test_routing_table_and_matryoshka_sweep(tmp_path):
    tasks = ["task0_t49", "task1_t17", "task4_t33"]  # between them, every branch runs
    result = qcexport("inspect", "routing", *(f"--case={t}" for t in tasks), "--json", "-o",
                      tmp_path / "routing")
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)["routing_table"]
    assert [row["case"] for row in table["rows"]] == tasks and table["mode"] == "cond"
    chosen = {branch for row in table["rows"] for branch in row["chosen"]}
    assert chosen == {"global", "local", "mlp"}
    assert all(row["ran"] == row["chosen"] for row in table["rows"])  # batch 1: same branch

    result = qcexport("inspect", "matryoshka", "--json", "-o", tmp_path / "mqt")
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.output)["sweep"]
    assert [r["m"] for r in sweep["rows"]] == [1, 2, 4, 8, 16]
    # every row against an independent eager computation of the same sweep (the m = M row
    # against itself would be 0 whatever the code did)
    expected = _eager_sweep(sweep["case"], [r["m"] for r in sweep["rows"]])
    for row in sweep["rows"]:
        change, pooled = expected[row["m"]]
        assert row["relative_change"] == pytest.approx(change, rel=1e-3, abs=1e-6), row
        assert row["pooled_cosine"] == pytest.approx(pooled, rel=1e-5), row
    assert sweep["rows"][0]["relative_change"] > sweep["rows"][-2]["relative_change"] > 0


def _eager_sweep(case_name: str, ms: list[int]) -> dict[int, tuple[float, float]]:
    """(relative change, pooled cosine) of the first sample's m-query output against all M
    queries, from PyTorch eager with the golden weights on the golden case's image."""
    import torch
    from qcrun.golden import load_golden

    from qcexport.golden import golden_dir, module_from_golden

    gset = load_golden(golden_dir("matryoshka", "tiny"))
    module = module_from_golden(gset)
    image = torch.from_numpy(gset.case(case_name).inputs["image_features"].copy())
    with torch.no_grad():
        outs = {m: module(image, torch.tensor(m))[0].double().numpy() for m in ms}
    ref = outs[max(ms)]
    result = {}
    for m, out in outs.items():
        change = float(np.linalg.norm(out - ref[:m]) / np.linalg.norm(ref[:m]))
        a, b = out.mean(axis=0), ref.mean(axis=0)
        result[m] = (change, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return result


def test_inspect_exported_model_matches_eager_and_qcrun(exported, tmp_path):
    model_dir = exported("qformer").path.parent
    host = qcexport("inspect", model_dir, "--case", "all", "-o", tmp_path / "dir", "--json")
    assert host.exit_code == 0, host.output
    eager = qcexport("inspect", "qformer", "--case", "all", "-o", tmp_path / "eager", "--json")
    device_json = tmp_path / "device.json"
    device = qcrun_cli("inspect", model_dir, "--golden", golden_dir("qformer", "tiny"),
                       "--json", device_json)
    assert device.exit_code == 0, device.output
    assert "golden set" in device.output and "b2_t65_notext" in device.output
    runs = [json.loads(host.output), json.loads(eager.output), json.loads(device_json.read_text())]
    for case in range(3):
        entropies = [r["cases"][case]["maps"][0]["entropy"] for r in runs]
        np.testing.assert_allclose(entropies[0], entropies[1], atol=1e-5)
        np.testing.assert_allclose(entropies[2], entropies[1], atol=1e-5)
        assert runs[2]["cases"][case]["maps"][0]["peak_token"] == \
            runs[1]["cases"][case]["maps"][0]["peak_token"]


def test_model_without_maps_says_how_to_add_them(tmp_path, tiny_models):
    plain = tiny_models.dir("qformer", "tiny")  # as `qcexport convert qformer` writes it
    for result in (qcrun_cli("inspect", plain, "--random"),
                   qcexport("inspect", plain, "-o", tmp_path / "out")):
        assert result.exit_code == 1
        assert "has no attention-map outputs" in result.output
        assert "qcexport convert qformer --preset tiny --with-attention-maps" in result.output
        assert "Traceback" not in result.output


BLOCKED = r"""
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, NoTorch())
sys.modules["torch"] = None
from qcrun.cli import main
main(sys.argv[1:])
"""


def test_qcrun_inspect_runs_without_torch(exported, tmp_path):
    model_dir = exported("qformer").path.parent
    env = dict(os.environ)
    package = Path(qcrun.__file__).parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
    out = tmp_path / "numbers.json"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, "inspect", str(model_dir), "--random", "--size",
         "tokens=65", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    assert metrics["inputs"] == "random inputs (seed 0)"
    case = metrics["cases"][0]
    assert case["visual_tokens"] == 65 and case["grid"]["layout"] == "grid+cls"
    assert len(case["maps"][0]["entropy"]) == 8


@pytest.mark.slow
def test_convert_flags_add_per_head_maps(tmp_path):
    out = tmp_path / "perceiver"
    result = qcexport("convert", "perceiver", "--with-attention-maps", "--map-heads", "each",
                      "-o", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["attention_maps"]["heads"] == "each"
    shapes = {o["name"]: o["shape"] for o in manifest["outputs"]}
    assert shapes["attn_map.encode.attn"] == ["batch", 1, 16, "tokens"]  # [B, heads, Q, keys]
    assert shapes["latent_tokens"] == ["batch", 16, 64]

    refused = qcexport("convert", "--module", "pkg.mod:factory", "--with-attention-maps")
    assert refused.exit_code == 1 and "built-in mechanisms" in refused.output


def test_output_directory_with_someone_elses_img_is_refused(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "photo.png").write_bytes(b"mine")
    result = qcexport("inspect", "qformer", "-o", tmp_path)
    assert result.exit_code == 1 and "was not written by qcexport inspect" in result.output
    assert (tmp_path / "img" / "photo.png").read_bytes() == b"mine"

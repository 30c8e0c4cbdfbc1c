"""Fuzzing the trust boundary: damaged model directories, golden sets and bundles.

Seeded and bounded (a few seconds): random byte flips, truncations and JSON type changes over
a model directory (manifest.json, model.onnx), a golden set (manifest + npz) and a bundle
directory. Every mutated artifact goes through the real `qcrun verify`, and every run must end
either in exit 0 with the artifact byte-identical to the original, or in exit 1 with an
`error:` message: never a traceback, never a pass of a changed artifact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from qcrun.cli import main as qcrun_main

from qcexport.cli import main as qcexport_main
from qcexport.golden import golden_dir

SEED = 20_260_101
MUTATIONS_PER_FILE = 4
NAME = "perceiver"
JSON_VALUES = ([1, 2, 3], 5, "x", None, {}, -1, 1e308, True, "../../etc/passwd")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_models) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    model = tiny_models.dir(NAME, "tiny")  # shared: every case damages a copy
    golden = Path(shutil.copytree(golden_dir(NAME, "tiny"), root / "golden"))
    bundle = root / "b.bundle"
    result = CliRunner().invoke(qcexport_main, ["bundle", str(model), "--target", "ort-cpu",
                                                "-o", str(bundle), "--cases", "1"])
    assert result.exit_code == 0, result.output
    return {"model": model, "golden": golden, "bundle": bundle}


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _json_paths(value, path=()):
    """Every (path, value) inside a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _json_paths(v, (*path, i))


def _mutate(path: Path, kind: str, rng: random.Random) -> str:
    data = path.read_bytes()
    if kind == "flip":
        i = rng.randrange(len(data))
        path.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
        return f"flip byte {i}"
    if kind == "truncate":
        n = rng.randrange(len(data))
        path.write_bytes(data[:n])
        return f"truncate to {n} bytes"
    doc = json.loads(data)
    paths = [p for p, _ in _json_paths(doc) if p]
    where = rng.choice(paths)
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    old = parent[where[-1]]
    new = rng.choice([v for v in JSON_VALUES if type(v) is not type(old) or v != old])
    parent[where[-1]] = new
    path.write_text(json.dumps(doc, indent=2))
    return f"{'/'.join(map(str, where))}: {old!r:.40} -> {new!r}"


def _plan() -> list[tuple[str, str, str, int]]:
    """(artifact, file, kind, seed) cases, fixed by SEED."""
    files = {
        "model": ["manifest.json", "model.onnx"],
        "golden": ["manifest.json", "weights.npz", "b1_t49.npz"],
        "bundle": ["bundle.json", "model.onnx", "golden/manifest.json"],
    }
    rng = random.Random(SEED)
    cases = []
    for artifact, names in files.items():
        for name in names:
            kinds = ["flip", "truncate"] + (["json"] if name.endswith(".json") else [])
            for _ in range(MUTATIONS_PER_FILE):
                cases.append((artifact, name, rng.choice(kinds), rng.randrange(2**32)))
    return cases


@pytest.mark.parametrize(("artifact", "name", "kind", "seed"), _plan(),
                         ids=lambda v: str(v).replace("/", "_"))
def test_a_damaged_artifact_is_refused_cleanly(pristine, tmp_path, artifact, name, kind, seed):
    copy = Path(shutil.copytree(pristine[artifact], tmp_path / artifact))
    target = copy / name
    if not target.is_file():
        candidates = sorted(p for p in copy.rglob(Path(name).suffix and f"*{Path(name).suffix}")
                            if p.is_file())
        target = random.Random(seed).choice(candidates)
    before = _files(copy)
    what = _mutate(target, kind, random.Random(seed))
    args = {
        "model": ["verify", copy, "--target", "ort-cpu", "--golden", pristine["golden"]],
        "golden": ["verify", pristine["model"], "--target", "ort-cpu", "--golden", copy],
        "bundle": ["verify", copy],
    }[artifact]
    result = CliRunner().invoke(qcrun_main, [str(a) for a in args])
    context = f"{artifact}/{target.relative_to(copy)}: {what}\n{result.output[-2000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"traceback: {result.exception!r}\n{context}")
    if result.exit_code == 0:
        assert _files(copy) == before, f"a changed artifact passed\n{context}"
    else:
        assert result.exit_code == 1, context
        assert "error: " in result.stderr and "Traceback" not in result.output, context

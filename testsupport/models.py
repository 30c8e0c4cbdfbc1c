"""Tiny built-in models exported once per test session and shared by every test folder.

Exporting is the slow part of the suite (seconds per model), and the same tiny Q-Former used
to be exported again in five folders. ``tiny_models`` exports each distinct (mechanism,
preset, target, attention form, opset, attention maps, precision overrides, config overrides)
once into the session's temporary directory and hands out the result. A shared directory is
read-only by contract: a test that edits a model copies it first (``tiny_models.copy``). The
contract is checked: every file is hashed after the export and again at the end of the
session, and a changed or missing file fails the session with the files named.

Tests that use ``tiny_models`` (directly or through another fixture) are marked ``slow``, as
are the other tests that take seconds; the fast tier (``make test-fast``) deselects them.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Imported here, before any test folder is put on sys.path, so that `import qcrun` anywhere
# in the session is the package and never a namespace made of the folder tests/qcrun.
import qcrun
import qcrun.targets

if getattr(qcrun, "__file__", None) is None:
    raise ImportError(f"`import qcrun` found the namespace {list(qcrun.__path__)}, "
                      "not the package: is a tests/ folder on sys.path?")

SLOW = "slow"
#: Fixtures that make models (seconds each): a test that uses one, even through another
#: fixture, is marked slow. ``tiny_hf`` saves the Hugging Face tiny models (tests/hf).
SLOW_FIXTURES = frozenset({"tiny_models", "tiny_hf"})
Exporter = Callable[..., Any]


def _digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _default_opset(form: str) -> int | None:
    # Only to let `opset=None` and the same opset written out share one export; without the
    # table the two are exported separately, which is slower but still right.
    try:
        from qcexport.export.pipeline import DEFAULT_OPSET
    except ImportError:
        return None
    return DEFAULT_OPSET.get(form)


class TinyModels:
    """get(name, **options) -> ConvertResult; dir(...) -> its directory; copy(dest, ...)."""

    def __init__(self, root: Path, export: Exporter | None = None):
        self.root = root
        self._export = export
        self._results: dict[tuple, Any] = {}
        self._hashes: dict[Path, dict[str, str]] = {}

    def key(self, name: str, preset: str = "tiny", *, target: str = "ort-cpu",
            attention: str = "auto", opset: int | None = None,
            with_attention_maps: bool = False, attention_map_heads: str = "mean",
            precision: str = "fp32", **overrides) -> tuple:
        """The options that change the exported model, with equal spellings made equal."""
        from qcexport import mechanisms

        if attention == "auto":  # the target's first attention form (qcrun.targets)
            attention = qcrun.targets.get_target(target).attention_forms[0]
        if opset is not None and opset == _default_opset(attention):
            opset = None
        if not mechanisms.get(name).precision_overrides.get(precision):
            precision = "fp32"  # precision only selects the spec's config overrides
        heads = attention_map_heads if with_attention_maps else "mean"
        return (name, preset, target, attention, opset, with_attention_maps, heads, precision,
                tuple(sorted(overrides.items())))

    def get(self, name: str, preset: str = "tiny", **options):
        """The ConvertResult of ``convert_mechanism(name, preset, **options)``, exported once.

        A failed export is kept too: every test that asks for it fails at once with the same
        error instead of exporting again.
        """
        key = self.key(name, preset, **options)
        if key not in self._results:
            out = self.root / f"{name}-{len(self._results)}"
            try:
                result = self._exporter()(name, preset, output_dir=out, **options)
            except Exception as exc:  # kept and raised again for every test that asks
                self._results[key] = exc
            else:
                self._results[key] = result
                self._hashes[out] = _digests(out)
        hit = self._results[key]
        if isinstance(hit, BaseException):
            raise hit
        return hit

    def dir(self, name: str, preset: str = "tiny", **options) -> Path:
        """The shared model directory (manifest.json, model.onnx): read it, never write it."""
        return Path(self.get(name, preset, **options).path).parent

    def copy(self, dest: Path, name: str, preset: str = "tiny", **options) -> Path:
        """A writable copy of the model directory at ``dest``, for tests that change it."""
        return Path(shutil.copytree(self.dir(name, preset, **options), dest))

    def changed(self) -> list[str]:
        """Files of the shared directories that differ from what the export wrote."""
        problems = []
        for directory, before in self._hashes.items():
            after = _digests(directory) if directory.is_dir() else {}
            for file in sorted(set(before) | set(after)):
                if before.get(file) != after.get(file):
                    state = ("removed" if file not in after else
                             "added" if file not in before else "changed")
                    problems.append(f"{directory / file}: {state}")
        return problems

    def _exporter(self) -> Exporter:
        if self._export is None:
            from qcexport.export import convert_mechanism

            self._export = convert_mechanism
        return self._export


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The session's TinyModels; fails at the end if a test changed a shared model."""
    models = TinyModels(tmp_path_factory.mktemp("tiny-models"))
    yield models
    problems = models.changed()
    assert not problems, ("a test changed a shared model directory in place (copy it first "
                          "with tiny_models.copy):\n  " + "\n  ".join(problems))


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(SLOW)

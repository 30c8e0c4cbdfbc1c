"""Fixtures for the export tests.

Exporting is the slow part (seconds per model), so every (mechanism, attention form) pair is
converted once per session by ``converted`` (``tiny_models``, shared with the other folders)
and shared by all the tests that look at it; the PyTorch eager references are cached the same
way by ``eager_cases``. Helpers are fixtures rather than importable functions: the test
folders have no ``__init__.py``.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from qcexport import mechanisms
from qcexport.export import ConvertResult

FORMS = ("onnx", "ort", "decomposed")
#: Seeds for the runtime checks, other than the converter's own (0 export, 1 and 2 verify).
EXPORT_SEED, VERIFY_SEED = 11, 12


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (inputs use their own generators)."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def converted(tiny_models):
    """converted(name, form) -> ConvertResult of the tiny preset, converted once per session
    and shared with the other folders (testsupport.models): read it, never write it.

    A failed conversion is kept too, so the tests that depend on it fail at once with the
    same error instead of exporting again.
    """

    def get(name: str, form: str) -> ConvertResult:
        return tiny_models.get(name, "tiny", attention=form)

    return get


@dataclass
class EagerCase:
    """One input set of a mechanism and PyTorch eager's outputs for it, by output name."""

    case: str
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def eager_cases():
    """eager_cases(name) -> [export case, verify case] of the tiny preset, with eager outputs.

    The module is ``mechanisms.create(name, "tiny")``, the one ``convert_mechanism`` exports;
    the inputs come from the spec's export and verify cases with seeds of their own.
    """
    cache: dict[str, list[EagerCase]] = {}

    def get(name: str) -> list[EagerCase]:
        if name not in cache:
            spec = mechanisms.get(name)
            config = spec.config("tiny")
            module = mechanisms.create(name, "tiny")
            cases = []
            for case, seed in ((spec.export_case, EXPORT_SEED), (spec.verify_case, VERIFY_SEED)):
                inputs = spec.inputs(config, case, seed=seed)
                with torch.no_grad():
                    out = module(**inputs)
                out = out if isinstance(out, tuple) else (out,)
                cases.append(EagerCase(case.name, inputs,
                                       dict(zip(spec.output_names, out, strict=True))))
            cache[name] = cases
        return cache[name]

    return get


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """factory_module(source) -> importable module name of a file written into tmp_path.

    The working directory becomes tmp_path (where ``qcexport convert --module`` looks) and it
    is on sys.path; every module written here is dropped from sys.modules afterwards.
    """
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    written: list[str] = []
    counter = itertools.count()

    def write(source: str) -> str:
        name = f"qcx_factory_{tmp_path.name.replace('-', '_')}_{next(counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def files_in(directory: Path) -> list[str]:
    """Names in ``directory``; a directory that a failed convert removed again holds nothing."""
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def listdir():
    """listdir(path) -> sorted names in it, hidden ones included (temporaries start with '.')."""
    return files_in


class TinyCrossAttention(nn.Module):
    """Learned queries attend to tokens, then to themselves: two 4-D SDPA calls."""

    def __init__(self, dim: int = 16, heads: int = 2, queries: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.queries = nn.Parameter(torch.randn(queries, dim))
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.queries.expand(b, -1, -1)  # [B, Q, D]
        nq = q.shape[1]
        q4 = q.reshape(b, nq, self.heads, self.head_dim).transpose(1, 2)  # [B, H, Q, Dh]
        kv = self.to_kv(x).reshape(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        h = torch.nn.functional.scaled_dot_product_attention(q4, kv[0], kv[1])  # [B, H, Q, Dh]
        h = h.transpose(1, 2).reshape(b, nq, d) + q  # [B, Q, D]
        qkv = self.to_qkv(h).reshape(b, nq, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        s = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out(s.transpose(1, 2).reshape(b, nq, d)) + h  # [B, Q, D]


class EinsumAttention(nn.Module):
    """Attention spelled out with einsum and softmax: nothing for the exporter to fuse."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        weights = torch.einsum("bqd,bkd->bqk", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        return torch.einsum("bqk,bkd->bqd", weights, v)


@pytest.fixture(scope="session")
def custom_modules():
    """The modules not in the registry, by name: 'sdpa' (two fused calls) and 'einsum'."""
    return {"sdpa": TinyCrossAttention, "einsum": EinsumAttention}

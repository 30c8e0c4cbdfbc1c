"""`qcexport convert`: clean errors (exit 1, a message, no traceback, nothing written) and outputs.

Most tests call the click command in-process with CliRunner; one runs the installed script, so
the entry point itself is covered. Modules for --module are written into tmp_path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from qcrun.golden import file_sha256
from qcrun.targets import target_names

from qcexport import mechanisms
from qcexport.cli import main

SDPA_FACTORY = """
import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


def make():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    return SelfAttention(), {"x": x}, {"x": {0: "batch", 1: "tokens"}}
"""

FORWARD_RAISES = """
import torch
from torch import nn


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom from forward")


def make():
    return Broken(), {"x": torch.zeros(2, 3)}, {"x": {0: "batch"}}
"""

DATA_DEPENDENT = """
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.proj(x)
        return -self.proj(x)


def make():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    return Branchy(), {"x": x}, {"x": {0: "batch", 1: "tokens"}}
"""


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_clean_failure(result, *phrases: str) -> str:
    """Exit 1 through the UserError path: `error: ...` on stderr, no traceback anywhere."""
    assert result.exit_code == 1, result.output
    # An uncaught exception also gives exit code 1 in CliRunner; a clean exit is SystemExit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)
    return result.stderr


@pytest.mark.parametrize(
    ("args", "listing"),
    [
        (["nosuch"], "valid mechanisms: " + ", ".join(sorted(mechanisms.names()))),
        (["qformer", "--preset", "huge"], "valid presets: base, tiny"),
        (["qformer", "--target", "tpu"], "valid targets: " + ", ".join(sorted(target_names()))),
        (["qformer", "--attention", "flash"], "valid attention forms: auto, decomposed, onnx, ort"),
    ],
    ids=["mechanism", "preset", "target", "attention"],
)
def test_unknown_choice_lists_the_valid_ones(tmp_path, monkeypatch, listdir, args, listing):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", *args, "-o", str(tmp_path / "out"))
    assert_clean_failure(result, listing, repr(args[-1]))
    assert listdir(tmp_path) == []  # neither -o nor the default out/ was created


def test_target_that_refuses_the_attention_form(tmp_path, monkeypatch, listdir):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", "qformer", "--target", "ort-tensorrt", "--attention", "onnx",
                    "-o", "out")
    assert_clean_failure(result, "does not accept the 'onnx' attention form", "decomposed")
    assert listdir(tmp_path) == []


@pytest.mark.slow
def test_unknown_mechanism_from_the_installed_script(tmp_path):
    script = Path(sys.executable).parent / "qcexport"
    proc = subprocess.run([str(script), "convert", "nosuch", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "unknown mechanism 'nosuch'" in proc.stderr and "qformer" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_name_module_and_all_are_exclusive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_clean_failure(invoke("convert"), "exactly one of NAME, --all, --module or --hf")
    assert_clean_failure(invoke("convert", "qformer", "--all"), "exactly one of")


def test_module_that_cannot_be_imported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", "--module", "nonexistent.mod:f", "-o", "out")
    assert_clean_failure(result, "load: ", "cannot import 'nonexistent.mod'")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("spec", "phrase"), [
    ("{mod}:missing", "has no callable 'missing'"),
    ("{mod}", "is not of the form package.module:factory"),
])
def test_module_factory_mistakes(factory_module, spec, phrase):
    mod = factory_module(SDPA_FACTORY)
    assert_clean_failure(invoke("convert", "--module", spec.format(mod=mod)), phrase)


def test_module_whose_forward_raises_fails_at_the_eager_stage(factory_module, tmp_path, listdir):
    mod = factory_module(FORWARD_RAISES)
    result = invoke("convert", "--module", f"{mod}:make", "-o", str(tmp_path / "out"))
    assert_clean_failure(result, "eager: ", "RuntimeError: boom from forward")
    assert listdir(tmp_path / "out") == []


@pytest.mark.slow
def test_data_dependent_control_flow_is_a_clean_export_error(factory_module, tmp_path, listdir):
    mod = factory_module(DATA_DEPENDENT)
    result = invoke("convert", "--module", f"{mod}:make", "-o", str(tmp_path / "out"))
    message = assert_clean_failure(result, "export: ", "data-dependent", "torch.cond")
    assert "\x1b[" not in message  # no terminal colour codes from the exporter
    assert "x.sum() > 0" in message  # the user's own line that cannot be captured
    assert listdir(tmp_path / "out") == []


def test_output_that_is_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("not a directory")
    result = invoke("convert", "qformer", "-o", "taken")
    assert_clean_failure(result, "save: ", "'taken' is a file")
    assert (tmp_path / "taken").read_text() == "not a directory"


@pytest.mark.slow
def test_convert_qformer_decomposed(tmp_path, monkeypatch, listdir):
    monkeypatch.chdir(tmp_path)
    result = invoke("convert", "qformer", "--attention", "decomposed", "-o", "qf")
    assert result.exit_code == 0, result.output

    out = tmp_path / "qf"
    assert listdir(out) == ["manifest.json", "model.onnx"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["mechanism"], manifest["attention"], manifest["opset"]) == (
        "qformer", "decomposed", 17)
    assert manifest["model_sha256"] == file_sha256(out / "model.onnx")
    assert manifest["fused_attention"] == {"form": "decomposed", "expected": 0, "found": 0,
                                           "sdpa_calls": 0}  # the math path was exported
    model = onnx.load(str(out / "model.onnx"))
    assert [(op.domain, op.version) for op in model.opset_import] == [("", 17)]
    # The human output: every stage timed, both shapes verified.
    for stage in ("eager", "export", "simplify", "lower", "check", "verify", "save"):
        assert f"  {stage} " in result.stdout, stage
    verify_lines = [line for line in result.stdout.splitlines() if "max abs" in line]
    assert len(verify_lines) == 2 and all(line.endswith(" ok") for line in verify_lines)


@pytest.mark.slow
def test_convert_module_json(factory_module, tmp_path):
    mod = factory_module(SDPA_FACTORY)
    result = invoke("convert", "--module", f"{mod}:make", "-o", "mine", "--json")
    assert result.exit_code == 0, result.output

    data = json.loads(result.stdout)  # JSON only on stdout: no progress lines
    assert data["passed"] is True
    assert Path(data["path"]) == Path("mine") / "model.onnx"
    assert (data["attention"], data["opset"]) == ("onnx", 23)
    assert data["fused_attention"] == {"expected": 1, "found": 1, "sdpa_calls": 1}
    assert data["attention_report"] == (
        "1 scaled_dot_product_attention call captured, 1 fused as 'onnx' attention node")
    assert data["outputs"] == ["output"] and data["constants"] == {}
    assert [(r["case"], r["shape"]) for r in data["verification"]] == [
        ("export_shape", [2, 5, 16]), ("other_shape", [3, 8, 16])]
    assert all(r["max_abs"] <= 1e-4 for r in data["verification"])
    manifest = json.loads((tmp_path / "mine" / "manifest.json").read_text())
    assert (manifest["mechanism"], manifest["factory"]) == ("custom", f"{mod}:make")

"""Localising on a device: against module outputs stored with the golden set, or another
runtime, with no torch in the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from qcrun.errors import UserError
from qcrun.golden import (
    MANIFEST,
    golden_manifest_json,
    load_golden,
    read_golden_manifest,
    read_intermediates,
)

from qcexport.golden import golden_root, write_golden
from qcexport.localize.perturb import perturb_weight

MODULE = "layers.0.cross_attn"

# qcrun's CLI in a process where importing torch fails, as on a device without it
NO_TORCH = (
    "import sys\n"
    "sys.modules['torch'] = None\n"
    "from qcrun.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:], standalone_mode=False)\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "except Exception as e:\n"
    "    print('error:', e); code = 1\n"
    "else:\n"
    "    code = 0\n"
    "loaded = [m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m]]\n"
    "print('torch modules:', loaded)\n"
    "sys.exit(code)\n"
)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    write_golden("qformer", "tiny", root=root, with_intermediates=True)
    return root / "qformer" / "tiny"


def test_committed_golden_sets_keep_their_bytes():
    """The new manifest field is absent unless written: every committed set still verifies,
    and its manifest serialises back to the same JSON (no new key)."""
    manifests = sorted(golden_root().glob(f"*/*/{MANIFEST}"))
    assert manifests
    for path in manifests:
        assert json.loads(golden_manifest_json(read_golden_manifest(path.parent))) == \
            json.loads(path.read_text()), path
        assert load_golden(path.parent).manifest.intermediates is None


@pytest.mark.slow
def test_stored_intermediates_are_hashed_and_ordered(stored, tmp_path):
    gset = load_golden(stored)
    entries = gset.manifest.intermediates
    assert [e.case for e in entries] == [c.name for c in gset.cases]
    first = entries[0]
    names = first.modules
    assert names.index("layers.0.cross_attn") < names.index("layers.0") < names.index("layers.1")
    values = read_intermediates(gset, first.case, ["layers.0"])
    assert values["layers.0"].dtype == np.float32
    # a changed file is refused by name
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in stored.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with np.load(stored / first.file) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["layers.0"] = arrays["layers.0"] + 1
    np.savez(copy / first.file, **arrays)
    with pytest.raises(UserError, match=first.file):
        load_golden(copy)


def _qcrun(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_verify_localize_without_torch(stored, tiny_models, tmp_path):
    bad = tmp_path / "bad"
    perturb_weight(tiny_models.dir("qformer"), MODULE, bad, seed=3)
    done = _qcrun("verify", bad, "--golden", stored, "--target", "ort-cpu",
                  "--target", "openvino-cpu", "--localize")
    out = done.stdout + done.stderr
    assert "torch modules: []" in out, out
    assert "error: verify: parity failed" in out, out  # the verdict is still verify's
    for target in ("ort-cpu", "openvino-cpu"):
        line = next(x for x in out.splitlines() if x.startswith(f"{target}: first divergence"))
        assert f" at {MODULE}" in line, out


@pytest.mark.slow
def test_verify_localize_against_another_runtime(stored, tiny_models, tmp_path):
    """Two runtimes on one model agree module by module (kernel tolerances); no eager, no
    stored outputs needed."""
    bad = tmp_path / "bad"
    perturb_weight(tiny_models.dir("qformer"), MODULE, bad, seed=3)
    done = _qcrun("verify", bad, "--golden", stored, "--target", "ort-cpu", "--localize",
                  "--against", "openvino-cpu")
    out = done.stdout + done.stderr
    assert "torch modules: []" in out, out
    assert "ort-cpu vs openvino-cpu" in out, out
    assert "ort-cpu: no module breaks the policy" in out, out


@pytest.mark.slow
def test_verify_localize_needs_stored_intermediates(tiny_models, tmp_path):
    plain = Path(golden_root()) / "qformer" / "tiny"
    assert json.loads((plain / MANIFEST).read_text()).get("intermediates") is None
    done = _qcrun("verify", tiny_models.dir("qformer"), "--golden", plain, "--target",
                  "ort-cpu", "--localize")
    out = done.stdout + done.stderr
    assert "--with-intermediates" in out, out

"""A model directory with one weight of one module perturbed: the fault a localisation test
(and the acceptance run) must find. Seeded, so the same call gives the same model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from qcrun.boundaries import node_key, node_modules
from qcrun.errors import UserError
from qcrun.files import MANIFEST_FILE, read_model_dir
from qcrun.graphs import walk_graphs

from qcexport.export.save import save_model_and_manifest


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def module_weights(model: onnx.ModelProto, module: str) -> list[str]:
    """Float initializers (2-D or more) that only nodes of ``module`` read, in node order."""
    paths = node_modules(model)
    readers: dict[str, set[bool]] = {}
    order: list[str] = []
    for graph, _ in walk_graphs(model.graph):
        for node in graph.node:
            inside = _inside(paths.get(node_key(node), ""), module)
            for name in node.input:
                readers.setdefault(name, set()).add(inside)
                if inside and name not in order:
                    order.append(name)
    names = [t.name for g, _ in walk_graphs(model.graph) for t in g.initializer]
    # a name that several (sub)graphs define is not one weight: left alone
    inits = {t.name: t for g, _ in walk_graphs(model.graph) for t in g.initializer
             if names.count(t.name) == 1}
    return [n for n in order if n in inits and readers[n] == {True}
            and inits[n].data_type == onnx.TensorProto.FLOAT and len(inits[n].dims) >= 2]


def perturb_weight(model_dir: Path, module: str, out_dir: Path, *, scale: float = 0.5,
                   seed: int = 0, initializer: str | None = None) -> str:
    """Write ``model_dir`` to ``out_dir`` (new or empty) with one weight of ``module`` moved by
    ``scale`` standard deviations of seeded noise; returns the initializer's name."""
    source = read_model_dir(model_dir, stage="perturb")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} is not empty", stage="perturb",
                        hint="name a new directory with -o")
    model = onnx.load(str(source.model))
    weights = module_weights(model, module)
    if not weights:
        known = sorted({p for p in node_modules(model).values() if p})
        raise UserError(f"no weight is read only by module {module!r}", stage="perturb",
                        hint=f"modules with nodes: {', '.join(known[:20])}")
    name = initializer or weights[0]
    if name not in weights:
        raise UserError(f"{name!r} is not a weight of {module!r}", stage="perturb",
                        hint=f"its weights: {', '.join(weights)}")
    for graph, _ in walk_graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.name == name:
                value = numpy_helper.to_array(tensor).astype(np.float32)
                noise = np.random.default_rng(seed).standard_normal(value.shape)
                moved = value + np.float32(scale * float(value.std() or 1.0)) * noise
                tensor.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), name))
    manifest = json.loads((source.path / MANIFEST_FILE).read_text())
    manifest["warnings"] = [*manifest.get("warnings", []),
                            f"perturbed on purpose: {name} of {module} (scale {scale}, "
                            f"seed {seed})"]
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model_and_manifest(model, out_dir / source.model.name, out_dir / MANIFEST_FILE,
                            manifest)
    return name

"""Load and fixed-shape benchmark: OpenVINO IR bundles and qcrun.load(fix_axes=...), on real
third-party modules at published sizes.

Modules (transformers classes built from configs at the published sizes, seeded random
weights; nothing is downloaded), each taken as qcexport's ``--hf`` component of that name:

- ``blip2-qformer``: BLIP-2 Q-Former (hidden 768, 12 layers, cross-attention every 2nd,
  encoder_hidden_size 1408, 32 queries), fed ViT-g features (257 tokens of 1408).
- ``gated-xattn-2048``: the Idefics gated cross-attention block at width 2048 (16 heads,
  OpenFlamingo-3B's width), 32 text tokens attending to 257 image tokens of 1024.
- ``idefics2-resampler``: the Idefics2-8B perceiver resampler (hidden 4096, 64 latents,
  depth 3, 16 heads of 96, 4 key-value heads), fed 257 tokens. About 2.6 GB of fp32
  weights: not in the default run (``--models idefics2-resampler``).

Two questions per module, each with its variants alternated in one run (order rotated every
round), medians, ratios, and the target printed as met or missed:

1. Load on openvino-cpu, a fresh engine each: the ONNX model (read + convert + compile), the
   IR (read + compile), and an IR bundle's compiled-model cache (import of the blob, mapped).
   Target: the cached load at least 2x faster than loading ONNX.
2. Run on ort-cpu at batch 1, 257 tokens: qcexport's dynamic-shape model, the same loaded
   with ``fix_axes`` (every symbolic axis at the fed size), and a plain static-shape
   ``torch.onnx.export`` of the same module at that shape. Target: fixed axes never slower
   than the static export (3% noise allowed). What the dynamic graph keeps at run time is
   counted from the graphs onnxruntime optimised (nodes, Shape ops, Reshape/Expand whose
   target shape is computed at run time), for each variant.

    python scripts/bench_load.py                                   # default models
    python scripts/bench_load.py --models blip2-qformer --rounds 3 --runs 10
    python scripts/bench_load.py --work /tmp/bench-load            # keep/reuse the models
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

BATCH, TOKENS, TEXT = 1, 257, 32
DEFAULT_MODELS = "blip2-qformer,gated-xattn-2048"


# --- the modules, at published sizes ----------------------------------------------------------


def _blip2():
    import torch
    from transformers import Blip2Config
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel

    from qcexport.hf.components import QueryTokensQFormer

    config = Blip2Config(
        vision_config={"hidden_size": 1408, "image_size": 224, "patch_size": 14},
        qformer_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                        "intermediate_size": 3072, "encoder_hidden_size": 1408,
                        "cross_attention_frequency": 2, "vocab_size": 30522},
        num_query_tokens=32)
    queries = torch.nn.Parameter(torch.randn(1, 32, 768) * 0.02)
    return "qformer", config, QueryTokensQFormer(Blip2QFormerModel(config.qformer_config),
                                                 queries, text=False), {}


def _gated_xattn():
    from transformers import IdeficsConfig
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    from qcexport.hf.components import MaskedGatedCrossAttention

    config = IdeficsConfig(hidden_size=2048, num_attention_heads=16, intermediate_size=8192,
                           vision_config={"embed_dim": 1024, "image_size": 224,
                                          "patch_size": 14},
                           perceiver_config={"resampler_n_latents": 64})
    layer = IdeficsGatedCrossAttentionLayer(config, layer_idx=0)
    return "idefics-gated-xattn", config, MaskedGatedCrossAttention(layer), {"text": TEXT}


def _idefics2():
    from transformers import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    config = Idefics2Config(
        vision_config={"hidden_size": 1152, "image_size": 224, "patch_size": 14},
        text_config={"model_type": "mistral", "hidden_size": 4096},
        perceiver_config={"hidden_size": 4096, "resampler_n_latents": 64, "resampler_depth": 3,
                          "resampler_n_heads": 16, "resampler_head_dim": 96,
                          "num_key_value_heads": 4})
    return ("idefics2-resampler", config, Idefics2PerceiverResampler(config.perceiver_config),
            {})


MODELS = {"blip2-qformer": _blip2, "gated-xattn-2048": _gated_xattn,
          "idefics2-resampler": _idefics2}


def build(name: str):
    """(HFComponent at the published size with seeded random weights, the benchmark feed)."""
    import torch

    from qcexport.hf import components
    from qcexport.hf.load import HFComponent

    torch.manual_seed(0)
    component, config, module, params = MODELS[name]()
    module = module.float().eval()
    with torch.no_grad():  # transformers' training init leaves gates shut and outputs flat
        for pname, p in module.named_parameters():
            if pname.rsplit(".", 1)[-1].startswith("alpha_"):
                p.fill_(0.7)
            elif p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    spec = components.get(component)
    feed = spec.make_inputs(config, seed=4242, batch=BATCH, tokens=TOKENS, **params)
    comp = HFComponent(
        spec=spec, config=config, module=module,
        example_inputs=spec.inputs(config, spec.export_case, seed=0),
        dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()},
        output_names=list(spec.outputs) if spec.outputs else None,
        verify_inputs=[("verify_shape", spec.inputs(config, spec.verify_case, seed=2))],
        metadata={"mechanism": "custom", "roles": spec.axis_roles(),
                  "source": {"kind": "hf", "model": f"{name} (published config, random "
                             "weights)", "component": component}})
    return comp, feed


# --- preparing the variants (reused from --work) ----------------------------------------------


def prepare(name: str, work: Path, say) -> dict:
    """The model directory (ONNX + IR), the compiled blob, the static export and the feed."""
    import numpy as np
    import torch
    from qcrun.engines import get_engine
    from qcrun.targets import get_target

    from qcexport import hf
    from qcexport.ir import write_ir

    comp, feed = build(name)
    model_dir, static = work / name, work / f"{name}-static.onnx"
    blob = work / f"{name}.blob"
    if not (model_dir / "manifest.json").is_file():
        start = time.perf_counter()
        hf.convert(None, comp, output_dir=model_dir, target="openvino-cpu")
        say(f"converted in {time.perf_counter() - start:.0f} s")
    if not (model_dir / "model.xml").is_file():
        write_ir(model_dir)
    settings = get_engine("openvino").write_compiled_cache(
        model_dir / "model.xml", get_target("openvino-cpu"), {"precision": "fp32"}, blob)
    if not static.is_file():
        start = time.perf_counter()
        with torch.no_grad():
            torch.onnx.export(comp.module, (), str(static), kwargs=dict(feed), dynamo=True,
                              opset_version=23, input_names=list(feed), external_data=True,
                              verbose=False)
        say(f"static export in {time.perf_counter() - start:.0f} s")
    arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in feed.items()}
    return {"dir": model_dir, "blob": blob, "settings": settings, "static": static,
            "feed": arrays, "fix": fixed_axes(comp.dynamic_axes, arrays)}


def fixed_axes(dynamic_axes, feed) -> dict[str, int]:
    """Every symbolic axis of the inputs at the size the benchmark feeds."""
    return {label: int(feed[name].shape[axis]) for name, axes in dynamic_axes.items()
            if name in feed for axis, label in axes.items()}


# --- measuring --------------------------------------------------------------------------------


def load_seconds(path, **options) -> float:
    from qcrun.engines import adapter_for

    adapter = adapter_for(path, "openvino-cpu", precision="fp32", **options).load()
    seconds = adapter.load_seconds
    if options.get("compiled_blob") and adapter.cache_state != "used":
        raise RuntimeError(f"cache not used: {adapter.cache_state}")
    adapter.close()
    return seconds


def latency(run, feed, runs: int) -> float:
    run(feed)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rotated(keys: list[str], r: int) -> list[str]:
    return keys[r % len(keys):] + keys[:r % len(keys)]


def check_same(outputs: dict[str, dict]) -> float:
    """Max abs difference between the variants' outputs of the same shape: the three
    variants must compute the same thing, or their times say nothing."""
    import numpy as np

    reference = outputs["dynamic"]
    worst = 0.0
    for other in ("fixed", "static"):
        for name, value in reference.items():
            match = [v for v in outputs[other].values() if v.shape == value.shape]
            if not match:
                raise RuntimeError(f"{other} has no output shaped like {name} {value.shape}")
            worst = max(worst, min(float(np.max(np.abs(v - value))) for v in match))
    return worst


def bench(name: str, work: Path, rounds: int, runs: int, say) -> dict:
    import qcrun
    from qcrun.engines import adapter_for

    p = prepare(name, work, say)
    loads = {
        "onnx": lambda: load_seconds(p["dir"] / "model.onnx"),
        "ir": lambda: load_seconds(p["dir"] / "model.xml"),
        "cached": lambda: load_seconds(p["dir"] / "model.xml", compiled_blob=str(p["blob"]),
                                       compiled_config=p["settings"]),
    }
    dynamic = qcrun.load(p["dir"], target="ort-cpu")
    fixed = qcrun.load(p["dir"], target="ort-cpu", fix_axes=p["fix"])
    static = adapter_for(p["static"], "ort-cpu").load()
    runners = {"dynamic": dynamic.run, "fixed": fixed.run, "static": static.run}
    diff = check_same({k: run(p["feed"]) for k, run in runners.items()})
    samples: dict[str, list[float]] = {k: [] for k in [*loads, *runners]}
    for r in range(rounds):
        for key in rotated(list(loads), r):
            samples[key].append(loads[key]())
        for key in rotated(list(runners), r):
            samples[key].append(latency(runners[key], p["feed"], runs))
    for m in (dynamic, fixed, static):
        m.close()
    result = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    result["fix"], result["max_diff"] = p["fix"], diff
    result["graphs"] = {
        "dynamic": graph_facts(p["dir"] / "model.onnx", work / f"{name}-opt-dynamic.onnx"),
        "fixed": graph_facts(p["dir"] / "model.onnx", work / f"{name}-opt-fixed.onnx",
                             p["fix"]),
        "static": graph_facts(p["static"], work / f"{name}-opt-static.onnx"),
    }
    return result


SHAPE_OPS = ("Shape", "Size", "ConstantOfShape", "Range")


def graph_facts(model: Path, out: Path, overrides: dict[str, int] | None = None) -> dict:
    """What is left to compute at run time in the graph onnxruntime runs (its optimised
    graph, with the free-dimension overrides of ``fix_axes`` when given): nodes, shape
    ops, and Reshape/Expand whose target shape is not a constant."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # its note that an optimised graph is machine-specific
    options.optimized_model_filepath = str(out)
    for label, size in (overrides or {}).items():
        options.add_free_dimension_override_by_name(label, size)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(out), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    ops = collections.Counter(n.op_type for n in graph.node)
    runtime_shapes = sum(1 for n in graph.node if n.op_type in ("Reshape", "Expand")
                         and len(n.input) > 1 and n.input[1] not in constants)
    return {"nodes": len(graph.node), "shape_ops": sum(ops[o] for o in SHAPE_OPS),
            "runtime_reshapes": runtime_shapes}


# --- the report -------------------------------------------------------------------------------


def machine() -> str:
    from qcrun.profile import environment

    env = environment()
    engines = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items())
                        if k in ("onnxruntime", "openvino", "torch", "transformers"))
    return f"{env['cpu']}, {env['usable_cpus']} cores, {platform.machine()}; {engines}"


def report(results: dict[str, dict]) -> None:
    print("\nload on openvino-cpu (ms, median; a fresh engine each):")
    print(f"  {'module':<20} {'onnx':>8} {'ir':>8} {'cached':>8} {'onnx/cached':>12}  target")
    for name, r in results.items():
        ratio = r["onnx"] / r["cached"]
        print(f"  {name:<20} {r['onnx']:8.1f} {r['ir']:8.1f} {r['cached']:8.1f} {ratio:11.2f}x  "
              f"{'met' if ratio >= 2 else 'MISSED'} (>= 2x)")
    print(f"\nrun on ort-cpu, batch {BATCH}, {TOKENS} tokens (ms, median; speed relative to the "
          "static export):")
    print(f"  {'module':<20} {'dynamic':>8} {'fixed':>8} {'static':>8} {'dynamic':>8} "
          f"{'fixed':>7}  target")
    for name, r in results.items():
        ratio = r["static"] / r["fixed"]
        print(f"  {name:<20} {r['dynamic']:8.2f} {r['fixed']:8.2f} {r['static']:8.2f} "
              f"{r['static'] / r['dynamic']:7.2f}x {ratio:6.2f}x  "
              f"{'met' if ratio >= 0.97 else 'MISSED'} (fixed not slower than static, 3% noise)")
    print("\nwhat onnxruntime's optimised graph computes at run time (nodes / shape ops "
          "[Shape, Size, ConstantOfShape, Range] / Reshape+Expand with a computed shape):")
    for name, r in results.items():
        g = r["graphs"]
        cells = "   ".join(f"{k} {v['nodes']}/{v['shape_ops']}/{v['runtime_reshapes']}"
                           for k, v in g.items())
        fix = ", ".join(f"{k}={v}" for k, v in r["fix"].items())
        print(f"  {name:<20} {cells}   (fixed: {fix}; outputs agree to {r['max_diff']:.1e})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency sample")
    parser.add_argument("--work", type=Path,
                        help="directory for the converted models, kept and reused "
                        "(default: a temporary one)")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    start = time.perf_counter()
    print(f"machine: {machine()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"== {name}", flush=True)
            results[name] = bench(name, work, args.rounds, args.runs,
                                  lambda text: print(f"  {text}", flush=True))
    report(results)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())

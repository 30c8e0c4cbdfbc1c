#!/usr/bin/env python
"""PyTorch eager vs plain export + onnxruntime vs qcexport's paths, per mechanism, one process.

For every mechanism (base preset, batch 1, 257 visual tokens; other sizes from the spec's input
factory) four variants of the same weights run on the same inputs:

    eager      PyTorch eager, torch.inference_mode(), default threads (what users run today)
    plain-ort  torch.onnx.export(dynamo=True) with default settings (default opset, SDPA
               decomposed, no simplification) + onnxruntime with default SessionOptions
    qc-ort     qcexport convert (opset-23 fused Attention, simplified, verified) + onnxruntime
               through qcrun: graph optimisation ALL, intra-op threads = physical cores
    qc-ov      the same model in OpenVINO CPU: PERFORMANCE_HINT=LATENCY, fp32 inference
               precision (OpenVINO's CPU default on AVX512-BF16 / AMX machines is bf16, which
               is not an fp32 result: it would fail the fp32 parity tolerance)

The variants are alternated: each round runs a block of timed calls of every variant, in an
order that rotates from round to round, with a short pause between blocks so that one engine's
spinning threads are idle before the next starts; latencies are medians over all rounds. Every
exported variant's outputs are compared with eager under the fp32 tolerance first: a fast
wrong answer is reported as such. FLOPs are counted on the qcexport graph with the shapes of a
real run (``qcrun.flops``); each engine's GEMM peak comes from n^3 fp32 MatMul models
(torch.mm for eager; n = 1024, 1536, 2048, the best n counts) timed inside the same rotation as
the models, so that it sees the same load, and "% peak" is (FLOPs / median latency) over
(GEMM FLOPs / median GEMM time).
Latency growth is the slope of log(median latency) against log(tokens) over 257, 1025, 4097,
timed the same way with every (variant, token count) pair in the rotation.

    python scripts/bench.py                                   # everything, 15-25 min here
    python scripts/bench.py --mechanisms qformer,perceiver --rounds 3
    python scripts/bench.py --quick                           # fewer rounds, growth 257 & 4097
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from qcrun.engines import adapter_for
from qcrun.flops import count_flops, observe_shapes
from qcrun.latency import fit_exponent
from qcrun.parity import DEFAULT_TOLERANCES, compare
from qcrun.profile import environment, gemm_model, physical_cores

from qcexport import mechanisms
from qcexport.export import convert_mechanism

VARIANTS = ("eager", "plain-ort", "qc-ort", "qc-ov")
GROWTH_TOKENS = (257, 1025, 4097)
#: Mechanisms whose graph does at least this much matrix work at the base shape count as
#: compute-heavy for the GEMM-peak target.
COMPUTE_HEAVY_FLOPS = 1e9
PAUSE_S = 0.05


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- building the variants -------------------------------------------------------------------


def make_inputs(spec, config, tokens: int) -> dict[str, torch.Tensor]:
    params = inspect.signature(spec.make_inputs).parameters
    sizes = {"batch": 1}
    if "tokens" in params:
        sizes["tokens"] = tokens
    return spec.make_inputs(config, seed=0, **sizes)


def plain_export(module, spec, inputs, path: Path) -> Path:
    """What a user writes today: torch.onnx.export with dynamic axes and otherwise defaults."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = {
        name: {axis: dims.setdefault(label, torch.export.Dim(label))
               for axis, label in spec.dynamic_axes.get(name, {}).items()} or None
        for name in inputs
    }
    torch.onnx.export(module, (), str(path), kwargs=dict(inputs), dynamo=True,
                      dynamic_shapes=shapes, input_names=list(inputs),
                      output_names=list(spec.output_names))
    return path


class Variant:
    def __init__(self, name: str, call, outputs):
        self.name, self.call, self.outputs = name, call, outputs


def build_variants(name: str, preset: str, work: Path, tokens: int, ov_bf16: bool = False):
    spec = mechanisms.get(name)
    config = spec.config(preset)
    module = mechanisms.create(name, preset)
    inputs = make_inputs(spec, config, tokens)
    feed = {k: v.numpy() for k, v in inputs.items()}

    errors = {}
    t0 = time.perf_counter()
    try:
        plain_path = plain_export(module, spec, inputs, work / "plain.onnx")
    except Exception as exc:  # the usual toolchain failing is a result, not a crash
        plain_path = None
        errors["plain-ort"] = f"export failed: {type(exc).__name__}: {str(exc)[:300]}"
        log(f"  plain export FAILED: {errors['plain-ort']}")
    else:
        log(f"  plain export {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    converted = convert_mechanism(name, preset, target="ort-cpu", attention="onnx",
                                  output_dir=work / "qcexport")
    log(f"  qcexport convert {time.perf_counter() - t0:.1f} s "
        f"({converted.fused_found} fused Attention nodes)")

    names = list(spec.output_names)
    variants = {}

    def eager(feed_in):
        with torch.inference_mode():
            out = module(**{k: torch.from_numpy(v) for k, v in feed_in.items()})
        return out

    def eager_outputs(feed_in):
        out = eager(feed_in)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        return dict(zip(names, (o.numpy() for o in out), strict=True))

    variants["eager"] = Variant("eager", eager, eager_outputs)
    if plain_path is not None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            plain = ort.InferenceSession(str(plain_path), sess_options=options,
                                         providers=["CPUExecutionProvider"])
        except Exception as exc:  # a model the engine refuses is a result too
            errors["plain-ort"] = f"load failed: {type(exc).__name__}: {str(exc)[:300]}"
        else:
            variants["plain-ort"] = Variant(
                "plain-ort", lambda f: plain.run(None, f),
                lambda f: dict(zip(names, plain.run(None, f), strict=True)))
    adapters = []
    paths = [("qc-ort", "ort-cpu", {**ORT_OPTIONS, "intra_op_threads": physical_cores()}),
             ("qc-ov", "openvino-cpu", OV_OPTIONS)]
    if ov_bf16:
        paths.append(("qc-ov-bf16", "openvino-cpu", OV_DEFAULT_OPTIONS))
    for vname, target, opts in paths:
        try:
            adapter = adapter_for(converted.path, target, **opts).load()
        except Exception as exc:  # recorded; the other variants still run
            errors[vname] = f"load failed: {type(exc).__name__}: {str(exc)[:300]}"
            continue
        adapters.append(adapter)
        variants[vname] = Variant(vname, adapter.run, adapter.run)
    return spec, config, module, feed, converted, variants, adapters, errors


#: The same model declared bf16 (the hint pinned to bf16 and read back; a CPU without bf16
#: refuses it): --ov-bf16 only, shown beside the fp32 paths, never counted as one (its outputs
#: fail the fp32 tolerance).
OV_DEFAULT_OPTIONS = {"accuracy": False, "precision": "bf16",
                      "config": {"PERFORMANCE_HINT": "LATENCY"}}
OV_OPTIONS = {"accuracy": False,
              "config": {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}}
ORT_OPTIONS = {"graph_optimization_level": "all"}


# --- timing ----------------------------------------------------------------------------------


def alternate(cells: dict, rounds: int, iters: int, warmup: int) -> dict:
    """Every timed call's seconds per cell (key -> (call, feed)), taken round-robin: each round
    runs a block of ``iters`` calls of every cell, in an order rotated from round to round, so
    that a noisy minute on a shared machine lands on every cell alike."""
    for call, feed in cells.values():
        for _ in range(warmup):
            call(feed)
    samples = {key: [] for key in cells}
    order = list(cells)
    for r in range(rounds):
        shift = r % len(order)
        for key in order[shift:] + order[:shift]:
            call, feed = cells[key]
            time.sleep(PAUSE_S)  # let the previous engine's spinning threads go idle
            gc.collect()
            gc.disable()
            try:
                for _ in range(iters):
                    t0 = time.perf_counter_ns()
                    call(feed)
                    samples[key].append((time.perf_counter_ns() - t0) / 1e9)
            finally:
                gc.enable()
    return samples


class Gemms:
    """n^3 fp32 MatMuls per engine (torch.mm; onnxruntime and OpenVINO with the options the
    model variants use) for a few n, timed inside every rotation beside the models: on a shared
    machine the peak must be measured under the same load as the models it is compared with.
    An engine's peak is its best size (powers of two alone understate it)."""

    def __init__(self, sizes: list[int], tmp: Path):
        self.sizes = sizes
        self.adapters = []
        self.cells = {}
        rng = np.random.default_rng(0)
        for n in sizes:
            x = rng.standard_normal((n, n)).astype(np.float32)
            a = torch.from_numpy(x)
            b = torch.from_numpy(rng.standard_normal((n, n)).astype(np.float32))
            path = gemm_model(tmp / f"gemm{n}.onnx", n)
            ort_gemm = adapter_for(path, "ort-cpu", **ORT_OPTIONS,
                                   intra_op_threads=physical_cores()).load()
            ov_gemm = adapter_for(path, "openvino-cpu", **OV_OPTIONS).load()
            self.adapters += [ort_gemm, ov_gemm]

            def torch_mm(_, a=a, b=b):
                with torch.inference_mode():
                    return torch.mm(a, b)

            self.cells[("torch", n)] = (torch_mm, None)
            self.cells[("onnxruntime", n)] = (ort_gemm.run, {"x": x})
            self.cells[("openvino", n)] = (ov_gemm.run, {"x": x})

    def rates(self, samples: dict) -> dict[str, float]:
        """engine -> FLOP/s: its best size, from the median of that size's samples."""
        rates: dict[str, float] = {}
        for (engine, n) in self.cells:
            rate = 2 * n**3 / statistics.median(samples[(engine, n)])
            rates[engine] = max(rates.get(engine, 0.0), rate)
        return rates

    def close(self):
        for adapter in self.adapters:
            adapter.close()


ENGINE_OF = {"eager": "torch", "plain-ort": "onnxruntime", "qc-ort": "onnxruntime",
             "qc-ov-bf16": "openvino",
             "qc-ov": "openvino"}


# --- one mechanism ---------------------------------------------------------------------------


def bench_mechanism(name: str, args, work_root: Path, gemms: Gemms) -> dict:
    log(f"\n== {name} ({args.preset})")
    work = work_root / name
    work.mkdir(parents=True, exist_ok=True)
    spec, config, module, feed, converted, variants, adapters, errors = build_variants(
        name, args.preset, work, args.tokens, args.ov_bf16)
    result = {"mechanism": name, "inputs": {k: list(v.shape) for k, v in feed.items()},
              "fused_attention": converted.fused_found, "errors": errors}

    expected = variants["eager"].outputs(feed)
    tolerance = DEFAULT_TOLERANCES["fp32"]
    result["parity"] = {}
    for vname in [v for v in variants if v != "eager"]:
        actual = variants[vname].outputs(feed)
        worst, ok = 0.0, True
        for out, ref in expected.items():
            cmp = compare(actual[out], ref, tolerance)
            worst = max(worst, cmp.metrics.max_abs or 0.0)
            ok = ok and cmp.passed
        result["parity"][vname] = {"max_abs": worst, "passed": ok}

    observed = observe_shapes(converted.path, feed)
    flops = count_flops(converted.path, observed=observed)
    result["flops"] = flops.total
    result["flops_exact"] = flops.exact

    cells = {n: (v.call, feed) for n, v in variants.items()}
    samples = alternate({**cells, **gemms.cells}, args.rounds, args.iters, args.warmup)
    result["gemm_flops_per_s"] = gemms.rates(samples)
    samples = {n: samples[n] for n in cells}
    result["median_ms"] = {n: statistics.median(s) * 1e3 for n, s in samples.items()}
    result["min_ms"] = {n: min(s) * 1e3 for n, s in samples.items()}
    result["runs"] = {n: len(s) for n, s in samples.items()}
    result["round_medians_ms"] = {
        n: [statistics.median(s[i:i + args.iters]) * 1e3 for i in range(0, len(s), args.iters)]
        for n, s in samples.items()
    }
    log("  " + "  ".join(f"{n} {m:.2f} ms" for n, m in result["median_ms"].items())
        + "  GEMM " + ", ".join(f"{k} {v / 1e9:.0f}"
                                for k, v in result["gemm_flops_per_s"].items()) + " GFLOP/s")

    growth = {}
    params = inspect.signature(spec.make_inputs).parameters
    if "tokens" in params and not args.no_growth:
        feeds = {t: {k: v.numpy() for k, v in make_inputs(spec, config, t).items()}
                 for t in args.growth_tokens}
        cells = {(n, t): (v.call, feeds[t]) for t in args.growth_tokens
                 for n, v in variants.items()}
        g_samples = alternate(cells, args.growth_rounds, args.growth_iters, 1)
        for (n, t), values in g_samples.items():
            growth.setdefault(t, {})[n] = statistics.median(values) * 1e3
        for t in args.growth_tokens:
            log(f"  tokens {t}: " + "  ".join(f"{n} {m:.2f} ms" for n, m in growth[t].items()))
        sizes = sorted(growth)
        result["growth_ms"] = {str(t): growth[t] for t in sizes}
        result["growth_flops"] = {
            str(t): count_flops(converted.path,
                                observed=observe_shapes(converted.path, feeds[t])).total
            for t in sizes
        }
        result["flops_exponent"] = fit_exponent(
            sizes, [result["growth_flops"][str(t)] for t in sizes])[0]
        result["growth_exponent"] = {
            n: fit_exponent(sizes, [growth[t][n] for t in sizes])[0] for n in variants
        }
    for adapter in adapters:
        adapter.close()
    del variants, module
    gc.collect()
    return result


# --- report ----------------------------------------------------------------------------------


def _best(r: dict) -> str | None:
    present = [v for v in ("qc-ort", "qc-ov") if v in r.get("median_ms", {})]
    return min(present, key=lambda v: r["median_ms"][v]) if present else None


def _cell(r: dict, variant: str) -> str:
    m = r["median_ms"]
    if variant not in m:
        return "n/a"
    if variant == "eager":
        return f"{m[variant]:.2f}"
    return f"{m[variant]:.2f} ({m['eager'] / m[variant]:.2f}x)"


def report(results: list[dict], env: dict, args) -> str:
    lines = []
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines.append(f"machine: {env['cpu']}, {env['physical_cores']} physical cores "
                 f"({env['usable_cpus']} usable CPUs), flags {' '.join(env['cpu_flags'])}, "
                 f"{env['platform']}")
    lines.append(f"versions: python {env['python']}, torch {torch.__version__}, {versions}")
    lines.append(f"threads: torch {torch.get_num_threads()}, onnxruntime intra-op "
                 f"{physical_cores()}, OpenVINO its LATENCY default")
    lines.append(f"method: {args.preset} preset, batch 1, {args.tokens} visual tokens; "
                 f"{args.rounds} rounds x {args.iters} timed calls per variant, round-robin, "
                 f"medians; {args.warmup} warm-up calls")
    rates = {}
    for r in results:
        for engine, rate in r.get("gemm_flops_per_s", {}).items():
            rates.setdefault(engine, []).append(rate / 1e9)
    sizes = "/".join(map(str, args.gemm_sizes))
    lines.append(f"GEMM peak (n^3 fp32 MatMul, n = {sizes}, timed in each mechanism's rotation, "
                 "best n, from its median; median, and min..max over mechanisms): "
                 + ", ".join(f"{k} {statistics.median(v):.1f} ({min(v):.1f}..{max(v):.1f}) "
                             "GFLOP/s" for k, v in rates.items()))
    lines.append("")
    shown = list(VARIANTS) + (["qc-ov-bf16"] if args.ov_bf16 else [])
    head = ("mechanism", "GFLOP", *(f"{v} ms" for v in shown),
            "best", "best/eager", "best/plain", "% peak", "peak GFLOP/s",
            "parity (max abs vs eager)")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["mechanism"], f"FAILED: {r['error']}", *[""] * (len(head) - 2)))
            continue
        m = r["median_ms"]
        best = _best(r)
        achieved = r["flops"] / (m[best] / 1e3) if best else None
        parity = ", ".join(f"{n} {'ok' if p['passed'] else 'FAIL'} {p['max_abs']:.1e}"
                           for n, p in r["parity"].items())
        rows.append((
            r["mechanism"], f"{r['flops'] / 1e9:.2f}" + ("" if r["flops_exact"] else "*"),
            *(_cell(r, v) for v in shown), best or "-",
            f"{m['eager'] / m[best]:.2f}x" if best else "-",
            f"{m['plain-ort'] / m[best]:.2f}x" if best and "plain-ort" in m else "-",
            f"{achieved / r['gemm_flops_per_s'][ENGINE_OF[best]]:.0%}" if best else "-",
            f"{r['gemm_flops_per_s'][ENGINE_OF[best]] / 1e9:.0f}" if best else "-", parity,
        ))
    lines += _table(head, rows)
    lines.append("")
    lines.append("(Nx) = eager / variant: above 1 is faster than eager. best/plain above 1: "
                 "faster than plain export + onnxruntime. % peak: (GFLOP / best median) over "
                 "the best engine's GEMM peak timed in the same rotation (peak GFLOP/s). "
                 "* FLOPs not exact.")
    for r in results:
        for variant, message in r.get("errors", {}).items():
            lines.append(f"{r['mechanism']} {variant}: {message}")

    grown = [r for r in results if "growth_exponent" in r]
    if grown:
        lines.append("")
        sizes = list(grown[0]["growth_ms"])
        shown = ("eager", "plain-ort", "qc-ort", "qc-ov")
        head = ("mechanism", *(f"{v} @{t}" for t in sizes for v in shown),
                *(f"k {v}" for v in shown), "k FLOPs")
        rows = []
        for r in grown:
            g, k = r["growth_ms"], r["growth_exponent"]
            rows.append((r["mechanism"],
                         *(f"{g[t][v]:.1f}" if v in g[t] else "n/a" for t in sizes for v in shown),
                         *(f"{k[v]:.2f}" if v in k else "n/a" for v in shown),
                         f"{r['flops_exponent']:.2f}"))
        lines.append(f"latency (ms, median) vs visual tokens, and the fitted exponent k "
                     f"(latency ~ tokens^k over {', '.join(sizes)}; k FLOPs: the same fit of "
                     "the counted FLOPs, what the arithmetic alone predicts):")
        lines += _table(head, rows)

    lines.append("")
    lines += verdicts(results)
    return "\n".join(lines)


def verdicts(results: list[dict]) -> list[str]:
    out = ["targets:"]
    faster, not_slower, heavy, growth = [], [], [], []
    for r in results:
        best = _best(r) if "error" not in r else None
        if best is None:
            faster.append((r["mechanism"], 0.0))
            continue
        m = r["median_ms"]
        faster.append((r["mechanism"], m["eager"] / m[best]))
        if "plain-ort" in m:
            not_slower.append((r["mechanism"], m["plain-ort"] / m[best]))
        if r["flops"] >= COMPUTE_HEAVY_FLOPS:
            rate = r["gemm_flops_per_s"][ENGINE_OF[best]]
            heavy.append((r["mechanism"], r["flops"] / (m[best] / 1e3) / rate))
        if "growth_exponent" in r:
            growth.append((r["mechanism"], r["growth_exponent"][best]))

    def line(label, items, ok, fmt):
        missed = [(n, v) for n, v in items if not ok(v)]
        if not items:
            out.append(f"  {label}: not measured (no mechanism qualifies)")
            return
        status = "MET" if not missed else f"MISSED for {len(missed)} of {len(items)}"
        detail = ", ".join(f"{n} {fmt(v)}" for n, v in items)
        out.append(f"  {label}: {status} ({detail})")

    line("best path >= 1.5x faster than eager", faster, lambda v: v >= 1.5, lambda v: f"{v:.2f}x")
    line("best path not slower than plain export + ORT", not_slower, lambda v: v >= 1.0,
         lambda v: f"{v:.2f}x")
    line(f"compute-heavy (>= {COMPUTE_HEAVY_FLOPS / 1e9:g} GFLOP) >= 70% of GEMM peak", heavy,
         lambda v: v >= 0.7, lambda v: f"{v:.0%}")
    line("token growth exponent <= 1.1 (best path)", growth, lambda v: v <= 1.1,
         lambda v: f"{v:.2f}")
    return out


def _table(head, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip()] + [fmt.format(*map(str, r)).rstrip() for r in rows]


# --- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mechanisms", help="comma-separated (default: all)")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--tokens", type=int, default=257)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--growth-tokens", default=",".join(map(str, GROWTH_TOKENS)))
    parser.add_argument("--growth-rounds", type=int, default=5)
    parser.add_argument("--growth-iters", type=int, default=2)
    parser.add_argument("--no-growth", action="store_true")
    parser.add_argument("--ov-bf16", action="store_true",
                        help="also time OpenVINO with its own defaults (bf16 on AVX512-BF16/AMX "
                        "CPUs), shown beside the fp32 paths and not counted as one")
    parser.add_argument("--gemm-sizes", default="1024,1536,2048",
                        help="n of the n^3 MatMuls that measure each engine's peak")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds x 3 calls, growth at 257 and 4097 with 2 rounds")
    parser.add_argument("--work-dir", type=Path, help="where exports go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.iters, args.growth_rounds = 3, 3, 2
        args.growth_tokens = "257,4097"
    args.growth_tokens = [int(t) for t in args.growth_tokens.split(",") if t.strip()]
    args.gemm_sizes = [int(n) for n in args.gemm_sizes.split(",") if n.strip()]
    if min(args.rounds, args.iters, args.growth_rounds, args.growth_iters) < 1 or args.warmup < 0:
        parser.error("--rounds, --iters, --growth-rounds and --growth-iters must be >= 1")
    names = args.mechanisms.split(",") if args.mechanisms else mechanisms.names()
    for n in names:
        mechanisms.get(n)

    env = environment()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qcexport-bench-") as tmp:
        root = args.work_dir or Path(tmp)
        gemms = Gemms(args.gemm_sizes, Path(tmp))
        results = []
        for n in names:
            try:
                results.append(bench_mechanism(n, args, root, gemms))
            except Exception as exc:  # one mechanism failing must not lose the others' numbers
                log(f"  {n} FAILED: {type(exc).__name__}: {exc}")
                results.append({"mechanism": n, "error": f"{type(exc).__name__}: {exc}"[:300]})
            gc.collect()
        gemms.close()
    text = report(results, env, args)
    print(text)
    print(f"\n(bench took {time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

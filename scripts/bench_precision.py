"""Latency and accuracy of fp32, int8-dynamic, int8-static and fp16, per mechanism and runtime.

    python scripts/bench_precision.py                       # every mechanism, base preset
    python scripts/bench_precision.py --mechanisms qformer,flamingo-resampler --rounds 7

For each mechanism: export the fp32 model (qcexport convert), make the three reduced
variants (qcexport quantize), then per runtime load all four variants (untimed), warm them up,
and time them in rounds with the order of the variants rotated every round, so that machine
noise hits every variant alike. Reports the median latency per variant, the speed-up over fp32
on the same runtime, and the accuracy of each variant against fp32 on the benchmark input
(cosine similarity, max abs) and on the quantizer's evaluation cases.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("fp32", "int8-dynamic", "int8-static", "fp16")
RUNTIMES = ("ort-cpu", "openvino-cpu")
# Batch 1 at a ViT-L/14 224px token count (16x16 patches + CLS).
BENCH_PARAMS = {"batch": 1, "tokens": 257, "text": 32, "media": 1, "m": None}


def machine() -> str:
    from qcrun.profile import environment

    env = environment()
    engines = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items())
                        if k in ("onnxruntime", "openvino"))
    return f"{env['cpu']}, {env['usable_cpus']} cores, {platform.machine()}; {engines}"


def bench_inputs(name: str, config) -> dict[str, np.ndarray]:
    from qcexport import mechanisms

    spec = mechanisms.get(name)
    accepted = inspect.signature(spec.make_inputs).parameters
    params = {k: v for k, v in BENCH_PARAMS.items() if k in accepted and v is not None}
    inputs = spec.make_inputs(config, seed=4242, **params)
    return {k: v.numpy() for k, v in inputs.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def time_variants(sessions: dict, feed: dict, rounds: int, runs: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {v: [] for v in sessions}
    order = list(sessions)
    for r in range(rounds):
        rotated = order[r % len(order):] + order[: r % len(order)]
        for variant in rotated:
            session = sessions[variant]
            for _ in range(runs):
                start = time.perf_counter()
                session.run(feed)
                samples[variant].append(time.perf_counter() - start)
    return samples


def bench_mechanism(name: str, preset: str, work: Path, rounds: int, runs: int,
                    calibration_cases: int) -> list[dict]:
    from qcrun.engines import open_adapter

    from qcexport import mechanisms
    from qcexport.export import convert_mechanism
    from qcexport.optimize import quantize_model_dir

    spec = mechanisms.get(name)
    config = spec.config(preset)
    dirs, loss, errors = {}, {}, {}
    print(f"  {name}: exporting fp32 ...", flush=True)
    dirs["fp32"] = convert_mechanism(name, preset, output_dir=work / name / "fp32").path.parent
    for variant in VARIANTS[1:]:
        print(f"  {name}: {variant} ...", flush=True)
        source = dirs["fp32"]
        if spec.precision_overrides.get(variant):  # another export of the same math
            source = convert_mechanism(name, preset, output_dir=work / name / f"fp32-{variant}",
                                       precision=variant).path.parent
        try:
            result = quantize_model_dir(source, variant, work / name / variant,
                                        calibration_cases=calibration_cases, evaluation_cases=4)
        except Exception as exc:  # a variant that fails is reported, the others still run
            errors[variant] = str(exc).splitlines()[0][:160]
            continue
        dirs[variant] = result.path.parent
        loss[variant] = min(r.cosine for r in result.loss)
    feed = bench_inputs(name, config)
    rows = []
    for runtime in RUNTIMES:
        options = {"accuracy": False} if runtime.startswith("openvino") else {}
        sessions = {v: open_adapter(d / "model.onnx", runtime, **options) for v, d in dirs.items()}
        outputs = {v: s.run(feed) for v, s in sessions.items()}  # warm-up, and the outputs
        for s in sessions.values():
            s.run(feed)
        samples = time_variants(sessions, feed, rounds, runs)
        for s in sessions.values():
            s.close()
        base = statistics.median(samples["fp32"])
        first = spec.output_names[0]
        for variant in VARIANTS:
            if variant not in dirs:
                rows.append({"mechanism": name, "runtime": runtime, "variant": variant,
                             "error": errors.get(variant, "not built")})
                continue
            median = statistics.median(samples[variant])
            rows.append({
                "mechanism": name, "runtime": runtime, "variant": variant,
                "median_ms": median * 1e3,
                "p90_ms": float(np.percentile(samples[variant], 90)) * 1e3,
                "speedup": base / median,
                "cosine_vs_fp32": cosine(outputs[variant][first], outputs["fp32"][first]),
                "max_abs_vs_fp32": float(np.abs(outputs[variant][first].astype(np.float64)
                                                - outputs["fp32"][first]).max()),
                "policy_min_cosine": loss.get(variant, 1.0),
                "runs": len(samples[variant]),
            })
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'mechanism':<19}{'runtime':<14}{'variant':<14}{'median ms':>10}{'p90 ms':>9}"
              f"{'vs fp32':>9}{'cosine':>10}{'max abs':>10}{'runs':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['mechanism']:<19}{r['runtime']:<14}{r['variant']:<14}  {r['error']}")
            continue
        print(f"{r['mechanism']:<19}{r['runtime']:<14}{r['variant']:<14}{r['median_ms']:>10.2f}"
              f"{r['p90_ms']:>9.2f}{r['speedup']:>8.2f}x{r['cosine_vs_fp32']:>10.6f}"
              f"{r['max_abs_vs_fp32']:>10.3g}{r['runs']:>6}")


def main(argv=None) -> int:
    from qcexport import mechanisms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanisms", default=",".join(mechanisms.names()))
    parser.add_argument("--preset", default="base")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant per round")
    parser.add_argument("--calibration-cases", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.mechanisms.split(",") if n.strip()]
    print(f"machine: {machine()}")
    print(f"preset {args.preset}, batch 1, {BENCH_PARAMS['tokens']} visual tokens; "
          f"{args.rounds} rounds x {args.runs} runs per variant, order rotated each round; "
          "OpenVINO with its performance defaults (no ACCURACY hint)\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        for name in names:
            rows += bench_mechanism(name, args.preset, Path(tmp), args.rounds, args.runs,
                                    args.calibration_cases)
    print()
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

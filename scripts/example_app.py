"""An app that embeds a qcexport bundle with qcrun: no torch, only numpy and an engine.

    python scripts/example_app.py qformer.bundle --requests 200 --threads 4

It loads the bundle on the best target of this device (or --target), checks one golden case
at start-up (an app should refuse to serve a model that is wrong on this device) under the
policy `qcrun verify` would use: qcrun's built-in tolerances for the precision of the model's
graph (the host's policy recorded in the bundle counts only for a bundle loaded with
trusted_keys that signed it; this app passes none). Then it serves a stream of requests from
a generator -- shaped like the bundle's golden inputs, with fresh visual features each time --
from --threads worker threads sharing one model, and prints throughput, latency percentiles
and a checksum of the outputs (the same inputs give the same checksum on every run and any
thread count; targets agree to qcrun's tolerance for the bundle's precision).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import qcrun
from qcrun.golden import load_golden
from qcrun.parity import compare


def request_stream(template: dict[str, np.ndarray], count: int, seed: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """``count`` requests like ``template``: float inputs (the visual features, hidden states)
    drawn fresh, integer and boolean inputs (token ids, masks, m) kept as in the template."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {name: rng.standard_normal(value.shape).astype(value.dtype)
               if np.issubdtype(value.dtype, np.floating) else value
               for name, value in template.items()}


def self_test(model: qcrun.Model, golden) -> str:
    """Run the first golden case; a UserError when an output is outside the policy that judges
    the bundle (``Bundle.policy``: qcrun's built-in one unless a trusted key signed it)."""
    bundle = model.bundle
    case = golden.cases[0]
    outputs = model(**case.inputs)
    worst = 0.0
    for name, expected in case.outputs.items():
        tolerance = bundle.policy.resolve(bundle.precision, model.target, name)
        result = compare(outputs[name], expected, tolerance)
        if not result.passed:
            raise qcrun.UserError(f"self-test: golden case {case.name} output {name} on "
                                  f"{model.target}: {result.reason}",
                                  hint="run `qcrun verify` on the bundle for the full report")
        worst = max(worst, result.metrics.max_abs or 0.0)
    return f"golden case {case.name} passes (max abs {worst:.1e})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="bundle directory or .tar.gz written by qcexport bundle")
    parser.add_argument("--target", default="auto",
                        help="target name, or auto: TensorRT > CUDA > OpenVINO GPU > OpenVINO "
                        "CPU > ONNX Runtime CPU, among those this device has [default: auto]")
    parser.add_argument("--requests", type=int, default=200, help="requests to serve")
    parser.add_argument("--threads", type=int, default=1, help="worker threads sharing the model")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request stream")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.threads < 1:
        parser.error("--requests and --threads must be at least 1")

    try:
        start = time.perf_counter()
        model = qcrun.load(args.bundle, target=args.target)
        load_s = time.perf_counter() - start
        with model:
            print(f"loaded {args.bundle} on {model.target} in {load_s:.2f} s "
                  f"({model.concurrency})")
            for choice in model.choices:
                if not choice.chosen and not choice.usable:
                    print(f"  skipped {choice.target}: {choice.reason}")
            print("inputs:  " + ", ".join(i.describe() for i in model.inputs))
            print("outputs: " + ", ".join(o.describe() for o in model.outputs))
            golden = load_golden(model.bundle.golden_path)
            print("self-test: " + self_test(model, golden))

            def serve(feed):
                began = time.perf_counter()
                outputs = model(**feed)
                return time.perf_counter() - began, outputs

            stream = request_stream(golden.cases[0].inputs, args.requests, args.seed)
            start = time.perf_counter()
            with ThreadPoolExecutor(args.threads) as pool:
                results = list(pool.map(serve, stream))  # map keeps the request order
            wall = time.perf_counter() - start
    except qcrun.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    latencies = np.array([seconds for seconds, _ in results]) * 1e3
    # Sum of |outputs| in float64, in request order: normalised outputs sum to about zero, so a
    # plain sum would say little.
    checksum = sum(float(np.abs(v).sum(dtype=np.float64)) for _, outputs in results
                   for v in outputs.values())
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    print(f"served {len(results)} requests with {args.threads} thread(s) in {wall:.2f} s: "
          f"{len(results) / wall:.1f} requests/s")
    print(f"latency ms: p50 {p50:.2f}  p90 {p90:.2f}  p99 {p99:.2f}  max {latencies.max():.2f}")
    print(f"checksum (sum of |outputs|): {checksum:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

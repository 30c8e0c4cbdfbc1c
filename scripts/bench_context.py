"""Many queries per image: the full graph against the context/query split (issue 14).

Per mechanism (base preset, batch 1), visual token count and N queries per image: the full
graph run N times, against the context graph once plus the query graph N times, on each
target, alternated within every round; medians over rounds. Prints total and per-query
latency, the memory of one context, and each target ratio of the issue as met or missed.

    .venv/bin/python scripts/bench_context.py                      # the whole run (~10 min)
    .venv/bin/python scripts/bench_context.py --mechanisms flamingo-xattn --tokens 257 \\
        --queries 1,4 --rounds 3 --targets ort-cpu                 # a quick subset

By default each mechanism with a target is measured at the N its target names only
(flamingo-xattn 1 per step, qformer 16, routing 4, perceiver-io 1 per query), at 257 and
1025 tokens, on ort-cpu and openvino-cpu; --queries measures other N (and matryoshka,
which has no target, is measured only when --mechanisms names it). Models are converted
once into --work (default out/bench_context) and reused: a second run skips the conversion.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# issue 14's targets: mechanism -> (queries per image, {tokens: minimum ratio}, what is timed,
# query-side size parameters). "step": one query's latency (a decoding step, one token);
# "total": N queries' total time per image.
TARGETS = {
    "flamingo-xattn": (1, {257: 1.4, 1025: 2.5}, "step", {"text": 1}),
    "qformer": (16, {257: 1.3, 1025: 2.5}, "total", {"text": 12}),
    "routing": (4, {257: 1.2, 1025: 1.8}, "total", {}),
    "matryoshka": (4, {}, "total", {}),
    # new output queries against cached latents, one set of queries per call
    "perceiver-io": (1, {257: 5.0, 1025: 5.0}, "step", {}),
}
#: The case parameter that differs between the queries about one image (routing: N tasks,
#: each query a different task, so the full graph takes each task's branches).
VARIED = {"routing": "task"}
#: Measured by default: the mechanisms the issue sets a target for.
DEFAULT_MECHANISMS = [name for name, goal in TARGETS.items() if goal[1]]


def convert(name: str, preset: str, work: Path) -> Path:
    from qcrun.files import read_model_dir

    from qcexport.export import convert_mechanism
    from qcexport.split.model_dir import split_model_dir

    out = work / f"{name}-{preset}"
    if not (out / "manifest.json").is_file() or read_model_dir(out).manifest.split is None:
        convert_mechanism(name, preset, output_dir=out)
        split_model_dir(out)
    return out


def feeds(name: str, preset: str, tokens: int, n: int) -> list[dict[str, np.ndarray]]:
    """N feeds about one image: the same visual inputs, N different queries (seeds)."""
    from qcexport import mechanisms

    spec = mechanisms.get(name)
    config = spec.config(preset)
    params = spec.roles.one_image(dict(spec.golden_cases[0].params), tokens)
    params.update(TARGETS.get(name, (0, {}, "", {}))[3])
    image = {k: v.numpy() for k, v in spec.inputs(config, _case(params), seed=0).items()
             if k in spec.context_inputs}
    out = []
    g = np.random.default_rng(0)
    for i in range(n):
        query = {**params, **({VARIED[name]: i} if name in VARIED else {})}
        feed = {k: v.numpy() for k, v in spec.inputs(config, _case(query), seed=i + 1).items()}
        # new values of the optional inputs (Perceiver IO's output queries), the learned
        # count: the query graph is timed on new queries, the full graph on its defaults
        for optional, shape in optional_shapes(spec, preset).items():
            feed[optional] = g.standard_normal(shape).astype(np.float32)
        out.append({**feed, **image})
    return out


def optional_shapes(spec, preset: str) -> dict[str, tuple[int, ...]]:
    """The shape of each optional input's default (the module's parameter), read without
    allocating the weights."""
    import torch

    with torch.device("meta"):
        module = spec.builder(spec.config(preset))
    return {name: tuple(module.get_parameter(path).shape)
            for name, path in spec.optional_inputs.items()}


def _case(params):
    from qcexport.mechanisms.registry import Case

    return Case("bench", params)


def measure(model, context_inputs, batch, rounds: int, optional=()) -> dict[str, list[float]]:
    """Full graph N times vs encode once + query N times, alternated in every round (the
    full graph takes no optional input: it runs on their defaults)."""
    times = {"full": [], "split": [], "encode": [], "query": []}
    image = {k: batch[0][k] for k in context_inputs}
    queries = [{k: v for k, v in f.items() if k not in context_inputs} for f in batch]
    batch = [{k: v for k, v in f.items() if k not in optional} for f in batch]
    model(**batch[0])  # warm-up, untimed
    model.query(model.encode(**image), **queries[0])
    for _ in range(rounds):
        start = time.perf_counter()
        for f in batch:
            model(**f)
        times["full"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ctx = model.encode(**image)
        encoded = time.perf_counter()
        for q in queries:
            t0 = time.perf_counter()
            model.query(ctx, **q)
            times["query"].append(time.perf_counter() - t0)
        times["split"].append(time.perf_counter() - start)
        times["encode"].append(encoded - start)
    times["context_bytes"] = [ctx.nbytes]
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mechanisms", default=",".join(DEFAULT_MECHANISMS))
    p.add_argument("--preset", default="base")
    p.add_argument("--tokens", default="257,1025")
    p.add_argument("--queries", help="N queries per image, comma-separated [default: the N "
                   "of each mechanism's target]")
    p.add_argument("--targets", default="ort-cpu,openvino-cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="out/bench_context")
    args = p.parse_args(argv)
    started = time.perf_counter()
    import qcrun

    from qcexport import mechanisms

    print(f"machine: {platform.processor() or platform.machine()}, {platform.node()}, "
          f"threads {args.threads}, rounds {args.rounds} (medians)")
    print("| mechanism | target | tokens | N | full total ms | split total ms | encode ms "
          "| query ms (median) | ratio | context MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for name in args.mechanisms.split(","):
        spec = mechanisms.get(name)
        t0 = time.perf_counter()
        directory = convert(name, args.preset, Path(args.work))
        print(f"{name}: model ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for target in args.targets.split(","):
            options = {"ort-cpu": {"intra_op_threads": args.threads},
                       "openvino-cpu": {"num_threads": args.threads}}
            with qcrun.load(directory, target=target, options=options) as model:
                for tokens in map(int, args.tokens.split(",")):
                    for n in _queries(name, args.queries):
                        t = measure(model, spec.context_inputs,
                                    feeds(name, args.preset, tokens, n), args.rounds,
                                    tuple(spec.optional_inputs))
                        verdicts += _row(name, target, tokens, n, t)
    print(f"\ntargets (issue 14), {time.perf_counter() - started:.0f} s in all:")
    for line in verdicts or ["  (no target applies to the rows measured)"]:
        print(line)


def _queries(name: str, given: str | None) -> list[int]:
    if given:
        return [int(n) for n in given.split(",")]
    return [TARGETS[name][0] if name in TARGETS else 4]


def _row(name, target, tokens, n, t) -> list[str]:
    med = {k: statistics.median(v) * 1e3 for k, v in t.items() if k != "context_bytes"}
    full_one = med["full"] / n
    goal = TARGETS.get(name)
    timed = goal[2] if goal else "total"
    ratio = full_one / med["query"] if timed == "step" else med["full"] / med["split"]
    print(f"| {name} | {target} | {tokens} | {n} | {med['full']:.1f} | {med['split']:.1f} | "
          f"{med['encode']:.1f} | {med['query']:.2f} | {ratio:.2f}x | "
          f"{t['context_bytes'][0] / 2**20:.2f} |")
    if not goal or n != goal[0] or tokens not in goal[1]:
        return []
    want = goal[1][tokens]
    state = "met" if ratio >= want else "MISSED"
    return [f"  {name} {target} {tokens} tokens, N={n} ({timed}): {ratio:.2f}x, target "
            f">= {want}x: {state}"]


if __name__ == "__main__":
    main()

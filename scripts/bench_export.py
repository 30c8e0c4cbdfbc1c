#!/usr/bin/env python
"""Benchmark `qcexport convert` per mechanism: wall time, peak memory, stage times, model size.

Every mechanism is converted in a fresh Python process, so that the peak resident memory is that
conversion's alone and nothing one conversion imported, compiled or cached helps the next.
"peak RSS" is the child's whole-process high-water mark (VmHWM, imports included): on Linux the
mark is read and reset after every stage (``/proc/self/clear_refs``), which gives each stage's
own peak ("stage peaks MiB", the largest marked), and the overall peak is the largest of them;
elsewhere it is ``ru_maxrss`` and there are no stage peaks. "x model" is peak RSS / model size. The child's wall time covers ``convert_mechanism``
only (export, simplify, lower, check, verify, save), not the interpreter start and imports; the
stage columns come from the pipeline's own ``on_stage`` timings. "base RSS" is the child's
resident memory after its imports, before converting: the rest of "peak RSS" is the conversion.

    python scripts/bench_export.py                         # every mechanism, base preset
    python scripts/bench_export.py --preset tiny --mechanisms qformer,perceiver --json

One run per mechanism: this measures what a user waits for once, not a steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

STAGES = ("eager", "export", "simplify", "lower", "check", "verify", "save")
PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "onnxsim", "onnxscript", "numpy")


# --- child: one conversion -------------------------------------------------------------------


def _rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hwm_mib() -> float | None:
    """This process's resident high-water mark since the last reset (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the high-water mark to the current RSS (Linux; also resets ru_maxrss)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _hwm_mib() is not None


def child(args: argparse.Namespace) -> int:
    from qcrun.errors import UserError

    from qcexport import mechanisms
    from qcexport.export import convert_mechanism

    base_rss = _rss_mib()
    per_stage = _reset_hwm()
    stages: dict[str, float] = {}
    stage_peaks: dict[str, float] = {}

    def on_stage(name: str, seconds: float, _detail: str) -> None:
        stages[name] = seconds
        if per_stage:  # a stage reported twice (eager) keeps its larger peak
            stage_peaks[name] = max(stage_peaks.get(name, 0.0), _hwm_mib())
            _reset_hwm()

    def peak() -> float:
        if not per_stage:
            return _rss_mib()
        return max(base_rss, _hwm_mib(), *stage_peaks.values())

    record: dict = {"mechanism": args.child, "base_rss_mib": base_rss}
    start = time.perf_counter()
    try:
        result = convert_mechanism(
            args.child, args.preset, target=args.target, attention=args.attention,
            output_dir=Path(args.output_dir) / f"{args.child}-{args.preset}",
            on_stage=on_stage,
        )
    except UserError as exc:
        record.update(error=str(exc), wall_s=time.perf_counter() - start, stages_s=stages,
                      peak_rss_mib=peak(), stage_peak_rss_mib=stage_peaks)
        Path(args.result_file).write_text(json.dumps(record))
        return 1
    record["wall_s"] = time.perf_counter() - start
    record["peak_rss_mib"] = peak()
    record["stage_peak_rss_mib"] = stage_peaks
    files = [result.path.parent / name for name in result.manifest["files"]]
    record.update(
        parameters=mechanisms.describe(args.child)["presets"][args.preset]["parameters"],
        stages_s=stages,
        model_bytes=sum(f.stat().st_size for f in files),
        attention=result.attention,
        opset=result.opset,
        fused_expected=result.fused_expected,
        fused_found=result.fused_found,
        max_abs=max(r.max_abs for r in result.verification),
        verified_cases=sorted({r.case for r in result.verification}),
        warnings=result.warnings,
    )
    Path(args.result_file).write_text(json.dumps(record))
    return 0


# --- parent: one child per mechanism, then the table -----------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def run_one(name: str, args: argparse.Namespace, out_dir: Path) -> dict:
    result_file = out_dir / f".{name}.result.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name,
               "--preset", args.preset, "--target", args.target, "--attention", args.attention,
               "--output-dir", str(out_dir), "--result-file", str(result_file)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mechanism": name, "error": f"timed out after {args.timeout} s"}
    process_s = time.perf_counter() - start
    if not result_file.is_file():  # a crash, not a UserError: keep the child's last words
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"mechanism": name, "error": f"exit {proc.returncode}: {tail}"}
    record = json.loads(result_file.read_text())
    record["process_s"] = process_s
    return record


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(records: list[dict]) -> str:
    stages = [s for s in STAGES if any(s in r.get("stages_s", {}) for r in records)]
    header = ["mechanism", "params", "wall s", "peak RSS MiB", "base RSS MiB", "x model",
              *[f"{s} s" for s in stages], "model MB", "fused", "max abs"]
    rows = []
    for r in records:
        if "parameters" not in r:
            rows.append([r["mechanism"], "FAILED: " + r["error"].splitlines()[0]])
            continue
        fused = (f"{r['fused_found']}/{r['fused_expected']} {r['attention']}"
                 if r["attention"] != "decomposed" else "decomposed")
        rows.append([
            r["mechanism"],
            f"{r['parameters'] / 1e6:.1f}M",
            _cell(r["wall_s"], ".1f"),
            _cell(r["peak_rss_mib"], ".0f"),
            _cell(r["base_rss_mib"], ".0f"),
            f"{r['peak_rss_mib'] * 2**20 / r['model_bytes']:.2f}",
            *[_cell(r["stages_s"].get(s), ".2f") for s in stages],
            f"{r['model_bytes'] / 1e6:.1f}",
            fused,
            f"{r['max_abs']:.2e}",
        ])
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *full, strict=True)]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=False)))

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) if len(row) == len(header) else f"{row[0].ljust(widths[0])}  {row[1]}"
            for row in rows]
    peaks = [r for r in records if r.get("stage_peak_rss_mib")]
    if peaks:
        out += ["", "stage peaks MiB (whole process, imports included; the largest marked *):"]
        for r in peaks:
            top = max(r["stage_peak_rss_mib"], key=r["stage_peak_rss_mib"].get)
            out.append(f"  {r['mechanism']}: " + ", ".join(
                f"{s} {v:.0f}{'*' if s == top else ''}"
                for s, v in r["stage_peak_rss_mib"].items()))
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", help="tiny or base (default: base)")
    parser.add_argument("--mechanisms", action="append", default=None, metavar="A,B",
                        help="comma-separated subset (default: every registered mechanism)")
    parser.add_argument("--attention", default="auto",
                        help="auto, onnx, ort or decomposed (default: auto)")
    parser.add_argument("--target", default="ort-cpu", help="target profile (default: ort-cpu)")
    parser.add_argument("--output-dir", default=None,
                        help="keep the models here (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mechanism")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)

    from qcexport import mechanisms

    known = mechanisms.names()
    names = ([n.strip() for group in args.mechanisms for n in group.split(",") if n.strip()]
             if args.mechanisms else known)
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: unknown mechanism(s) {', '.join(unknown)}; valid mechanisms: "
              f"{', '.join(known)}", file=sys.stderr)
        return 1

    info = machine()
    if not args.json:
        print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
              f"{info['memory_gib']} GiB")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
              + f", python {info['python']}")
        print(f"preset {args.preset}, target {args.target}, attention {args.attention}; "
              "one fresh process per mechanism\n", flush=True)

    with tempfile.TemporaryDirectory(prefix="qcexport-bench-") as tmp:
        out_dir = Path(args.output_dir) if args.output_dir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        for name in names:
            if not args.json:
                print(f"  converting {name} ...", flush=True)
            records.append(run_one(name, args, out_dir))
            (out_dir / f".{name}.result.json").unlink(missing_ok=True)

    failed = [r for r in records if "error" in r]
    if args.json:
        print(json.dumps({"machine": info, "preset": args.preset, "target": args.target,
                          "attention": args.attention, "results": records}, indent=2))
    else:
        print()
        print(table(records))
        for r in failed:
            print(f"\n{r['mechanism']} failed:\n{r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

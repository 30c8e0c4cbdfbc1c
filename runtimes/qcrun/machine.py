"""The machine a measurement or a report was made on: CPU, cores, memory, versions.

One place for these facts, so that profiles, parity reports and tools that pick a kernel path
(e.g. int8 with or without VNNI) read the same values the same way.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: The engine packages whose versions a report records.
ENGINE_PACKAGES = ("qcrun", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "onnx")
#: CPU flags that decide which kernels an engine uses (reported in profiles).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                "avx_vnni", "neon", "asimd", "sve")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """Every flag the CPU reports (x86 ``flags``, Arm ``Features``); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(2).split()) if match else set()


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = set()
    for cpu in cpus:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (base / "physical_package_id").read_text().strip()
            core = (base / "core_id").read_text().strip()
        except OSError:
            return len(cpus) or os.cpu_count() or 1
        cores.add((package, core))
    return len(cores) or os.cpu_count() or 1


def usable_cpus() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def memory_total() -> int | None:
    """Physical memory in bytes (Linux /proc), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def versions(packages: Iterable[str] = ENGINE_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages``; those not installed are left out."""
    found = {}
    for dist in packages:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def software() -> dict[str, Any]:
    """Python, platform and the versions of the engines present."""
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "versions": versions(),
    }


def hardware() -> dict[str, Any]:
    """CPU model, cores, kernel-relevant flags and memory of this host."""
    present = cpu_flags()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "physical_cores": physical_cores(),
        "cpu_flags": [f for f in KERNEL_FLAGS if f in present],
        "memory_bytes": memory_total(),
        "hostname": platform.node(),
    }


# --- memory of this process ------------------------------------------------------------------


def current_rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), or None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process (since start, or since ``reset_peak_rss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak if platform.system() == "Darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if refused,
    in which case ``peak_rss_bytes`` keeps meaning the peak since the process started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True

"""What every benchmark says about where it ran, and how it summarises repeated figures.

Speed ratios on small CPUs move between machines and between runs (first-touch page faults,
turbo, the other tenants of a shared host), so a figure is reported with its spread: the
minimum, median and maximum over repeats, each repeat ideally a fresh process, and the machine
named beside it.

Example:
    >>> from benchmarks.machine import spread
    >>> spread([1.2, 1.0, 1.1])
    {'min': 1.0, 'median': 1.1, 'max': 1.2, 'n': 3}
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str = "cpu") -> dict[str, Any]:
    """The facts a reader needs to compare two runs: CPU, cores, torch threads, versions, GPU."""
    import torch

    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": device,
        "gpu": gpu,
    }


def machine_line(machine: dict[str, Any]) -> str:
    """One line for a results table: ``AMD EPYC ... (2 cores, 2 threads), torch 2.13.0``."""
    text = f"{machine['cpu']} ({machine['cores']} cores, {machine['threads']} threads), torch {machine['torch']}"
    return text + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")


def spread(values: Iterable[float]) -> dict[str, float]:
    """Minimum, median and maximum of repeated measurements (and how many there were)."""
    data = list(values)
    if not data:
        raise ValueError("spread() of no values: measure at least once")
    return {"min": min(data), "median": statistics.median(data), "max": max(data), "n": len(data)}


def format_spread(stats: dict[str, float], digits: int = 2) -> str:
    """``1.21 (1.10-1.35)``: the median, then the range; just the value when measured once."""
    if stats["n"] == 1:
        return f"{stats['median']:.{digits}f}"
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"

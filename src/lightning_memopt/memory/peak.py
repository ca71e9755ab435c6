"""Peak memory of an interval: the CUDA caching allocator on a GPU, the process on the CPU.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) of the
model's device, reset at every :meth:`PeakMemory.reset`. On the CPU it is the process's peak
resident set (Linux ``VmHWM``), reset through ``/proc/self/clear_refs`` where the kernel
allows it; elsewhere the peak since the process started (``resource.getrusage``), and the
reading says it could not be reset. CPU readings include the interpreter and libraries, so
the tracker subtracts the resident set measured before training (see :mod:`.tracker`).

The CUDA allocation history (:func:`start_cuda_history`, :func:`dump_cuda_snapshot`) writes
a snapshot that https://pytorch.org/memory_viz opens.

Example:
    >>> import torch
    >>> peak = PeakMemory(torch.device("cpu"))
    >>> peak.reset()
    >>> reading = peak.read()
    >>> reading["peak_source"], reading["peak_bytes"] > 0
    ('cpu_rss', True)
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes, or None."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set of this process now, in bytes (0 if it cannot be read).

    Example:
        >>> current_rss_bytes() > 0
        True
    """
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or refused: report nothing rather than fail training
        return 0


def _lifetime_peak_rss_bytes() -> int:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return current_rss_bytes()
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Peak memory on ``device`` since the last :meth:`reset`.

    Example:
        >>> PeakMemory(torch.device("cpu")).read()["peak_resettable"] in (True, False)
        True
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._rss_resettable: bool | None = None

    def _reset_rss_peak(self) -> bool:
        if self._rss_resettable is False:
            return False
        try:
            # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0).
            with open(_CLEAR_REFS, "w") as handle:
                handle.write("5")
            self._rss_resettable = _status_bytes("VmHWM") is not None
        except OSError:
            self._rss_resettable = False
        return self._rss_resettable

    def reset(self) -> None:
        """Start a new interval."""
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._reset_rss_peak()

    def cpu_peak_rss_bytes(self) -> int:
        """Peak resident set of the process in this interval (or lifetime, if not resettable)."""
        if self._rss_resettable:
            peak = _status_bytes("VmHWM")
            if peak is not None:
                return peak
        return _lifetime_peak_rss_bytes()

    def read(self) -> dict[str, Any]:
        """``peak_bytes`` (and ``peak_reserved_bytes`` on CUDA), ``cpu_peak_rss_bytes``,
        ``peak_source`` and ``peak_resettable``."""
        cpu_peak = self.cpu_peak_rss_bytes()
        if self.on_cuda:
            return {
                "peak_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
                "cpu_peak_rss_bytes": cpu_peak,
                "peak_source": "cuda_allocator",
                "peak_resettable": True,
            }
        return {
            "peak_bytes": cpu_peak,
            "cpu_peak_rss_bytes": cpu_peak,
            "peak_source": "cpu_rss",
            "peak_resettable": bool(self._rss_resettable),
        }


def start_cuda_history(max_entries: int = 100_000) -> str | None:
    """Start recording CUDA allocations; returns why not (a reason string) or ``None``.

    Example:
        >>> import os, tempfile
        >>> reason = start_cuda_history()  # None once recording; on the CPU: 'no CUDA device'
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     dump_cuda_snapshot(os.path.join(folder, "snapshot.pickle")) == reason
        True
    """
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        torch.cuda.memory._record_memory_history(max_entries=max_entries)
    except Exception as err:  # private API: never let it stop training
        return f"torch.cuda.memory._record_memory_history failed: {err}"
    return None


def dump_cuda_snapshot(path: str | os.PathLike[str], stop: bool = True) -> str | None:
    """Write the recorded allocation history to ``path`` (a pickle for
    https://pytorch.org/memory_viz); returns why not, or ``None``.

    Example:
        >>> import os, tempfile
        >>> reason = start_cuda_history()  # None once recording; on the CPU: 'no CUDA device'
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     dump_cuda_snapshot(os.path.join(folder, "snapshot.pickle")) == reason
        True
    """
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
    except Exception as err:
        return f"could not write the CUDA memory snapshot to {path}: {err}"
    finally:
        if stop:
            with contextlib.suppress(Exception):
                torch.cuda.memory._record_memory_history(enabled=None)
    return None

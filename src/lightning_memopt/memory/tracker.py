"""The profiler that both trainer callbacks drive, so that they produce the same report.

A trainer adapter calls four methods, in training order:

1. :meth:`MemoryTracker.start` once before the first step (the model exists);
2. :meth:`MemoryTracker.on_gradients` just before each optimizer step, while the gradients
   exist (Lightning ``on_before_optimizer_step``, HF ``on_pre_optimizer_step``);
3. :meth:`MemoryTracker.on_step_end` after each optimizer step, once the optimizer state
   exists (Lightning ``on_train_batch_end``, HF ``on_step_end``); it returns the new record on
   the steps it measured, else None. Measured: every ``interval`` optimizer steps (0,
   interval, ...), the first step of the run (after a resume, the checkpoint's step, not 0),
   and the step the adapter calls ``final`` (the last of the run), so that the report ends
   where training ended;
4. :meth:`MemoryTracker.finish` once at the end: gathers the per-rank entries to rank 0
   (``torch.distributed.all_gather_object`` when a process group is initialized; every rank
   must call it), writes the JSON report and the PNG plot and prints the table on rank 0.

Between measurements the hooks only compare integers, which keeps the cost at the default
interval far below 1% of a step (``benchmarks/profiler_overhead.py`` measures it).

Activations are not tensors the tracker can see; it estimates them as the interval's peak
minus the tensors it counted on the same device. On CUDA the peak is the allocator's; on the
CPU it is the process's peak resident set minus what the process held before training
besides the model (interpreter, libraries), so it is the rougher of the two. Both are
labelled as estimates.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(8, 8)
    >>> opt = torch.optim.AdamW(model.parameters())
    >>> tracker = MemoryTracker(interval=1, report_path=None, table=False)
    >>> tracker.start(model)
    >>> model(torch.randn(4, 8)).sum().backward()
    >>> tracker.on_gradients(model, step=0)
    >>> opt.step(); opt.zero_grad()
    >>> record = tracker.on_step_end(model, opt, step=0)
    >>> record["grads_bytes"], record["optimizer_state_bytes"]  # measured while they existed
    (288, 584)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .accounting import MemoryBreakdown, breakdown, gradient_bytes
from .peak import PeakMemory, current_rss_bytes, dump_cuda_snapshot, start_cuda_history
from .report import build_report, plot_report, print_table, write_report

DEFAULT_REPORT_PATH = "memopt_reports/memory_report.json"


def _dist_rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def make_record(step: int, measured: MemoryBreakdown, peak: dict[str, Any], device_overhead: int) -> dict[str, Any]:
    """One measurement as a flat dict of the report's record keys.

    ``device_overhead`` is what the peak counts besides tensors and activations (the
    process's own resident set on the CPU, 0 on CUDA).

    Example:
        >>> m = breakdown(torch.nn.Linear(4, 2))
        >>> r = make_record(0, m, {"peak_bytes": 1000, "cpu_peak_rss_bytes": 1000}, device_overhead=0)
        >>> r["params_bytes"], r["activations_estimate_bytes"], r["params_saving_ratio"]
        (40, 960, 0.0)
    """
    savings = measured.savings()
    device = peak.get("device")
    # The counted tensors that the peak includes: those on the peak's device (APOLLO's
    # projection cache and step workspace live beside the parameters), or all of them when no
    # device is named.
    if device is None:
        on_device = measured.static_bytes
    else:
        held = measured.projection_cache_bytes + measured.workspace_bytes
        on_device = measured.bytes_by_device.get(device, 0) + held
    peak_bytes = peak.get("peak_bytes")
    activations = None if peak_bytes is None else max(int(peak_bytes) - device_overhead - on_device, 0)
    record: dict[str, Any] = {
        "step": step,
        "params_bytes": measured.params_bytes,
        "grads_bytes": measured.grads_bytes,
        "optimizer_state_bytes": measured.optimizer_state_bytes,
        "projection_cache_bytes": measured.projection_cache_bytes,
        "workspace_bytes": measured.workspace_bytes,
        "buffers_bytes": measured.buffers_bytes,
        "static_bytes": measured.static_bytes,
        "training_state_bytes": savings["total"].measured_bytes,
        "peak_bytes": peak_bytes,
    }
    if "peak_reserved_bytes" in peak:
        record["peak_reserved_bytes"] = peak["peak_reserved_bytes"]
    record.update(
        {
            "cpu_peak_rss_bytes": peak.get("cpu_peak_rss_bytes"),
            "activations_estimate_bytes": activations,
            "adamw_baseline_bytes": measured.baseline.total_bytes,
            "adamw_baseline_params_bytes": measured.baseline.params_bytes,
            "adamw_baseline_grads_bytes": measured.baseline.grads_bytes,
            "adamw_baseline_optimizer_state_bytes": measured.baseline.optimizer_state_bytes,
            "saving_bytes": savings["total"].saving_bytes,
            "saving_ratio": savings["total"].saving_ratio,
            "params_saving_ratio": savings["params"].saving_ratio,
            "grads_saving_ratio": savings["grads"].saving_ratio,
            "optimizer_state_saving_ratio": savings["optimizer_state"].saving_ratio,
        }
    )
    return record


class MemoryTracker:
    """Per-device memory over training: records every ``interval`` steps, a report at the end.

    Args:
        interval: measure every ``interval`` optimizer steps (steps 0, interval, 2*interval...).
        report_path: the JSON report (rank 0 writes it for all ranks); the PNG plot goes
            beside it with the suffix ``.png``. ``None`` writes no files.
        plot: write the PNG plot.
        table: print the table at the end (rank 0).
        cuda_snapshot: on CUDA, record the allocation history from :meth:`start` and dump a
            snapshot for https://pytorch.org/memory_viz at :meth:`finish` (and on
            :meth:`dump_snapshot`, e.g. after an out-of-memory error); ignored on the CPU with
            a note in the report.
        snapshot_path: where the snapshot goes (``{rank}`` is replaced by the rank); by
            default beside the report, ``cuda_memory_snapshot_rank{rank}.pickle``.

    Example:
        >>> tracker = MemoryTracker(interval=10, report_path=None, table=False)
        >>> tracker.due(0), tracker.due(130), tracker.due(299, final=True)  # no record yet: 130 is the first
        (True, True, True)
    """

    def __init__(
        self,
        interval: int = 50,
        report_path: str | os.PathLike[str] | None = DEFAULT_REPORT_PATH,
        plot: bool = True,
        table: bool = True,
        cuda_snapshot: bool = False,
        snapshot_path: str | None = None,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"MemoryProfiler: interval={interval!r} must be a positive integer (steps between measurements)."
            )
        self.interval = interval
        self.report_path = None if report_path is None else Path(report_path)
        self.plot = plot
        self.table = table
        self.cuda_snapshot = cuda_snapshot
        self.snapshot_path = snapshot_path
        self.history: list[dict[str, Any]] = []
        self.last_breakdown: MemoryBreakdown | None = None
        self.notes: list[str] = []
        self.report: dict[str, Any] | None = None
        self.started = False
        self._peak: PeakMemory | None = None
        self._device = torch.device("cpu")
        self._device_overhead = 0
        self._pending_grads: tuple[int, int, dict[str, int]] | None = None
        self._last_step = -1
        self._seen_step = -1
        self._failed = False
        self._recording_history = False

    # ------------------------------------------------------------------ hooks
    def start(self, model: nn.Module) -> None:
        """Begin a run (a second ``fit`` with the same tracker starts afresh): set the device,
        the process baseline and the first peak interval."""
        self.started = True
        self.history, self.notes, self.last_breakdown, self.report = [], [], None, None
        self._pending_grads, self._last_step, self._seen_step, self._failed = None, -1, -1, False
        try:
            self._start(model)
        except Exception as err:
            self._fail(err)

    def _start(self, model: nn.Module) -> None:
        self._device = _model_device(model)
        self._peak = PeakMemory(self._device)
        if self._peak.on_cuda:
            self.notes.append("peak: CUDA caching allocator (max_memory_allocated), reset every interval")
        else:
            # What the process holds besides the model's tensors: subtracted from the CPU peak.
            static = breakdown(model, grads=False).bytes_by_device.get("cpu", 0)
            self._device_overhead = max(current_rss_bytes() - static, 0)
            self.notes.append(
                "peak: process peak resident set; activations estimate = peak - resident set before "
                f"training besides the model ({self._device_overhead} bytes) - counted tensors"
            )
        if self.cuda_snapshot:
            reason = start_cuda_history()
            self._recording_history = reason is None
            if reason is not None:
                self.notes.append(f"CUDA memory snapshot skipped: {reason}")
        self._peak.reset()
        if not self._peak.read()["peak_resettable"]:
            self.notes.append("peak: could not be reset per interval; it is the peak since the process started")

    def due(self, step: int, final: bool = False) -> bool:
        """Whether optimizer step ``step`` (0-based) is measured and not measured yet: every
        ``interval`` steps, the run's first step and its ``final`` one."""
        if step < 0 or step == self._last_step:
            return False
        return final or step % self.interval == 0 or not self.history

    def on_gradients(self, model: nn.Module, step: int, final: bool = False) -> None:
        """Just before optimizer step ``step``: note the gradients' bytes if the step is due
        (``final``: the run's last step)."""
        if not self.due(step, final) or self._failed:
            return
        try:
            total, by_device = gradient_bytes(model)
        except Exception as err:
            self._fail(err)
            return
        self._pending_grads = (step, total, by_device)

    def on_step_end(self, model: nn.Module, optimizer: Any, step: int, final: bool = False) -> dict[str, Any] | None:
        """After optimizer step ``step``: the new record if the step is due, else None."""
        self._seen_step = max(self._seen_step, step)
        if not self.due(step, final) or self._failed:
            return None
        if not self.started:
            self.start(model)
        try:
            return self._measure(model, optimizer, step)
        except Exception as err:
            self._fail(err)
            return None

    def _measure(self, model: nn.Module, optimizer: Any, step: int) -> dict[str, Any]:
        assert self._peak is not None
        measured = breakdown(model, optimizer, grads=False)
        if self._pending_grads is not None and self._pending_grads[0] == step:
            _, grads, grads_by_device = self._pending_grads
        else:  # no pre-step hook ran: the gradients that exist now (none after zero_grad)
            grads, grads_by_device = gradient_bytes(model)
        by_device = dict(measured.bytes_by_device)
        for device, nbytes in grads_by_device.items():
            by_device[device] = by_device.get(device, 0) + nbytes
        measured = dataclasses.replace(measured, grads_bytes=grads, bytes_by_device=by_device)
        peak = self._peak.read()
        self._peak.reset()
        peak["device"] = str(self._device)
        record = make_record(step, measured, peak, self._device_overhead)
        self.history.append(record)
        self.last_breakdown = measured
        self._last_step = step
        self._pending_grads = None
        return record

    def _fail(self, err: Exception) -> None:
        self._failed = True
        warnings.warn(
            f"MemoryProfiler: measuring memory failed ({type(err).__name__}: {err}); "
            "profiling stops, training goes on.",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ end
    def entry(self) -> dict[str, Any]:
        """This rank's part of the report."""
        rank, world = _dist_rank_and_world()
        peak = self._peak.read() if self._peak is not None else {}
        peaks = [r["peak_bytes"] for r in self.history if r.get("peak_bytes") is not None]
        return {
            "rank": rank,
            "world_size": world,
            # The machine: a multi-node report groups its ranks by it (one node's ranks share
            # its host memory; the GPUs' figures are per device either way).
            "host": socket.gethostname(),
            "device": str(self._device),
            "peak_source": peak.get("peak_source"),
            "peak_resettable": peak.get("peak_resettable"),
            "max_peak_bytes": max(peaks, default=None),
            "notes": list(self.notes),
            "final": self.history[-1] if self.history else None,
            "breakdown": self.last_breakdown.to_dict() if self.last_breakdown is not None else None,
            "history": list(self.history),
        }

    def snapshot_file(self) -> Path:
        """Where this rank's CUDA snapshot goes."""
        rank, _ = _dist_rank_and_world()
        if self.snapshot_path is not None:
            return Path(self.snapshot_path.replace("{rank}", str(rank)))
        folder = self.report_path.parent if self.report_path is not None else Path(".")
        return folder / f"cuda_memory_snapshot_rank{rank}.pickle"

    def dump_snapshot(self) -> Path | None:
        """Write the CUDA allocation history recorded so far (if recording); keeps recording."""
        if not self._recording_history:
            return None
        reason = dump_cuda_snapshot(self.snapshot_file(), stop=False)
        if reason is not None:
            warnings.warn(f"MemoryProfiler: {reason}", RuntimeWarning, stacklevel=2)
            return None
        return self.snapshot_file()

    def finish(self, model: nn.Module | None = None, optimizer: Any = None) -> dict[str, Any]:
        """Gather every rank's entry, write the files and print the table (rank 0); the report.

        If the last step seen was not measured (no adapter said ``final``), or there is no record
        yet (training stopped before its first step ended), ``model`` and ``optimizer`` are
        measured now, so that the report ends where training ended and is never empty.
        """
        unmeasured = not self.history or self._seen_step > self._last_step
        if unmeasured and model is not None and not self._failed:
            if not self.started:
                self.start(model)
            try:
                self._measure(model, optimizer, max(self._seen_step, self._last_step, 0))
            except Exception as err:
                self._fail(err)
        if self._recording_history:
            reason = dump_cuda_snapshot(self.snapshot_file(), stop=True)
            self._recording_history = False
            if reason is not None:
                warnings.warn(f"MemoryProfiler: {reason}", RuntimeWarning, stacklevel=2)
        entries = [self.entry()]
        rank, world = _dist_rank_and_world()
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, entries[0])
            entries = gathered
        self.report = build_report(entries, self.interval)
        if rank == 0:
            if self.report_path is not None:
                written = write_report(self.report, self.report_path)
                if written is not None and self.plot:
                    plot_report(self.report, self.report_path.with_suffix(".png"))
            if self.table:
                print_table(self.report)
        return self.report

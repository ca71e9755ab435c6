"""``MemoryProfiler``: the Lightning callback over :class:`lightning_memopt.memory.MemoryTracker`.

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import MemoryProfiler
    >>> trainer = L.Trainer(callbacks=[MemoryProfiler(interval=50)], accelerator="cpu")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from ..memory import MemoryTracker, metrics_from_record


class MemoryProfiler(Callback):
    """Where training memory goes on each device, and what it saves against fp32 AdamW.

    Every ``interval`` optimizer steps it counts the bytes of parameters (by dtype, quantized
    storage included), gradients (measured in ``on_before_optimizer_step``, while they
    exist), optimizer state and buffers, reads the interval's peak (CUDA allocator, or the
    process on the CPU) and logs them to the trainer's loggers as ``memory/params_bytes``,
    ``memory/grads_bytes``, ``memory/optimizer_state_bytes``, ``memory/buffers_bytes``,
    ``memory/peak_bytes``, ``memory/activations_estimate_bytes``,
    ``memory/adamw_baseline_bytes``, ``memory/saving_ratio`` and the rest of
    :data:`lightning_memopt.memory.RECORD_KEYS`. At the end of fit it prints a table, and rank 0
    writes ``report_path`` (JSON, one entry per rank) and a PNG plot beside it.

    It measures the run's first step (after a resume, the checkpoint's, with its gradients),
    every ``interval`` steps and the last step (``max_steps``, the last epoch, or a stop such as
    :class:`~lightning_memopt.callbacks.CheckpointOnStop`'s), so the final numbers after a
    resume are those an uninterrupted run reports at the same step.

    Works with any optimizer, in single-process, DDP and FSDP2 runs (per-rank numbers count
    the local shards); the same report as the HF Trainer's
    :class:`lightning_memopt.hf.MemoryProfilerCallback`.

    Args:
        interval: optimizer steps between measurements (step 0 is always measured).
        report_path: the JSON report; the PNG goes beside it (``.png``). A relative path is
            relative to the run's log directory (``trainer.log_dir``: beside ``config.yaml``
            and ``checkpoints/``, so every run keeps its own report), or to the working
            directory without a logger. ``None``: no files.
        plot: write the PNG plot.
        table: print the table at the end of fit.
        log_metrics: send the records to ``trainer.loggers``.
        cuda_snapshot: on CUDA, record the allocation history and dump a snapshot for
            https://pytorch.org/memory_viz at the end of fit or when training raises (an
            out-of-memory error, say).
        snapshot_path: where the snapshot goes (``{rank}`` is replaced by the rank).

    Example:
        >>> import lightning as L
        >>> profiler = MemoryProfiler(interval=10, report_path="runs/memory.json")
        >>> trainer = L.Trainer(callbacks=[profiler], accelerator="cpu", logger=False)
    """

    def __init__(
        self,
        interval: int = 50,
        report_path: str | os.PathLike[str] | None = "memory_report.json",
        plot: bool = True,
        table: bool = True,
        log_metrics: bool = True,
        cuda_snapshot: bool = False,
        snapshot_path: str | None = None,
    ) -> None:
        super().__init__()
        self.tracker = MemoryTracker(
            interval=interval,
            report_path=report_path,
            plot=plot,
            table=table,
            cuda_snapshot=cuda_snapshot,
            snapshot_path=snapshot_path,
        )
        self.log_metrics = log_metrics
        self.report_path = None if report_path is None else Path(report_path)

    @property
    def report(self) -> dict[str, Any] | None:
        """The report of the last fit (on every rank), or ``None`` before it ends."""
        return self.tracker.report

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.report_path is None:
            return
        path = self.report_path
        if not path.is_absolute() and trainer.loggers:
            # The run's own folder: a second run never overwrites the first one's report.
            # (trainer.log_dir is a collective under DDP: every rank runs setup.)
            path = Path(trainer.log_dir or ".") / path
        self.tracker.report_path = path

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tracker.start(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step:
            self.tracker.notes.append(f"resumed from step {trainer.global_step}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # global_step counts the steps before this one.
        self.tracker.on_gradients(pl_module, trainer.global_step, final=_last_step(trainer, trainer.global_step + 1))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts finished optimizer steps; on an accumulation micro-batch it has
        # not moved, and the tracker does not measure the same step twice.
        step = trainer.global_step
        record = self.tracker.on_step_end(pl_module, trainer.optimizers, step - 1, final=_last_step(trainer, step))
        if record is not None and self.log_metrics:
            metrics = metrics_from_record(record)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.tracker.finish(pl_module, trainer.optimizers)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # The allocation history up to an out-of-memory error is what one wants to look at.
        self.tracker.dump_snapshot()


def _last_step(trainer: pl.Trainer, steps_done: int) -> bool:
    """Whether the step that makes ``steps_done`` optimizer steps is the run's last."""
    if trainer.should_stop:
        return True
    if trainer.max_steps is not None and trainer.max_steps >= 0 and steps_done >= trainer.max_steps:
        return True
    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    return bool(
        loop.epoch_loop.batch_progress.is_last_batch
        and max_epochs is not None
        and max_epochs >= 0
        and trainer.current_epoch + 1 >= max_epochs
    )

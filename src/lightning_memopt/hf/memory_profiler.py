"""``MemoryProfilerCallback``: the HF ``TrainerCallback`` over :class:`lightning_memopt.memory.MemoryTracker`.

Example:
    >>> from lightning_memopt.hf import MemoryProfilerCallback
    >>> callback = MemoryProfilerCallback(interval=50)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..memory import DEFAULT_REPORT_PATH, MemoryTracker, metrics_from_record
from ..memory.report import METRIC_PREFIX

#: The few metrics that go into the Trainer's ``logs`` (printed on the console by its progress
#: callback, and logged by the reporting integrations placed before this callback); every metric
#: of the record goes into ``state.log_history`` (``trainer_state.json``) and the report.
HEADLINE_METRICS = ("peak_bytes", "training_state_bytes", "optimizer_state_bytes", "saving_ratio")


class MemoryProfilerCallback(TrainerCallback):
    """Where training memory goes on each device, and what it saves against fp32 AdamW.

    The HF Trainer twin of :class:`lightning_memopt.callbacks.MemoryProfiler`, with the same
    options and the same report: every ``interval`` optimizer steps it counts parameters,
    gradients (in ``on_pre_optimizer_step``, while they exist), optimizer state and buffers
    and reads the interval's peak; at the end of training it prints a table and rank 0 writes
    ``report_path`` (JSON, one entry per rank) and a PNG plot beside it.

    The latest record goes into the next ``on_log`` as ``memory/...`` metrics: all of them into
    ``state.log_history`` (``trainer_state.json``), and the headline ones (``logs_metrics``:
    peak, training state, optimizer state, saving against AdamW) into the ``logs`` dict, which the
    Trainer prints, so that a log line stays readable. The reporting integrations of
    ``report_to`` run before user callbacks; to have them log the memory metrics too, put this
    callback first: ``trainer.callback_handler.callbacks.insert(0, MemoryProfilerCallback())``.

    Args:
        interval: optimizer steps between measurements (step 0 is always measured).
        report_path: the JSON report; the PNG goes beside it (``.png``). ``None``: no files.
        plot: write the PNG plot.
        table: print the table at the end of training.
        log_metrics: add the records to the logs.
        logs_metrics: the record's keys (without ``memory/``) that go into the printed ``logs``;
            ``None``: all of them.
        cuda_snapshot: on CUDA, record the allocation history and dump a snapshot for
            https://pytorch.org/memory_viz at the end of training.
        snapshot_path: where the snapshot goes (``{rank}`` is replaced by the rank).

    Example:
        >>> from transformers import Trainer
        >>> callback = MemoryProfilerCallback(interval=10, report_path="out/memory.json")
        >>> # Trainer(model, args, train_dataset=..., callbacks=[callback]).train()
    """

    def __init__(
        self,
        interval: int = 50,
        report_path: str | os.PathLike[str] | None = DEFAULT_REPORT_PATH,
        plot: bool = True,
        table: bool = True,
        log_metrics: bool = True,
        cuda_snapshot: bool = False,
        snapshot_path: str | None = None,
        logs_metrics: Sequence[str] | None = HEADLINE_METRICS,
    ) -> None:
        self.tracker = MemoryTracker(
            interval=interval,
            report_path=report_path,
            plot=plot,
            table=table,
            cuda_snapshot=cuda_snapshot,
            snapshot_path=snapshot_path,
        )
        self.log_metrics = log_metrics
        self.logs_metrics = None if logs_metrics is None else {METRIC_PREFIX + key for key in logs_metrics}
        self._unlogged: dict[str, float] = {}

    @property
    def report(self) -> dict[str, Any] | None:
        """The report of the last training run, or ``None`` before it ends."""
        return self.tracker.report

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if model is not None:
            self.tracker.start(model)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if model is not None:
            # global_step counts the steps done: this one is global_step, the last max_steps - 1.
            self.tracker.on_gradients(model, state.global_step, final=state.global_step + 1 == state.max_steps)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        # global_step was incremented just before this event: the step that ended is one less.
        record = self.tracker.on_step_end(
            model, optimizer, state.global_step - 1, final=state.global_step == state.max_steps
        )
        if record is not None and self.log_metrics:
            self._unlogged = metrics_from_record(record)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._unlogged:
            return
        if logs is not None:
            chosen = self.logs_metrics
            logs.update({k: v for k, v in self._unlogged.items() if chosen is None or k in chosen})
        if state.log_history:
            state.log_history[-1].update(self._unlogged)
        self._unlogged = {}

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.tracker.finish(model, optimizer)

"""``CheckpointOnStop``: Ctrl-C or a scheduler's SIGTERM ends ``fit`` like a finished run, with a
resumable checkpoint; and every run that trained leaves a checkpoint of its last step.

Without it, Lightning saves only where a ``ModelCheckpoint`` fires (after a validation, by
default): a run stopped or ended between two validations leaves nothing to resume from, and
Ctrl-C skips ``on_fit_end`` (no memory report, no summary).

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import CheckpointOnStop
    >>> trainer = L.Trainer(callbacks=[CheckpointOnStop()], max_steps=7, accelerator="cpu")
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

_SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


class CheckpointOnStop(Callback):
    """Stop cleanly on a signal and make sure the last step is checkpointed.

    On the first SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler sends before it preempts
    a job) during training, the current optimizer step finishes, training stops as if
    ``max_steps`` were reached (``trainer.should_stop``; Lightning then validates, as it does for
    early stopping), and ``fit`` ends normally: a checkpoint is saved, callbacks' ``on_fit_end``
    run (the memory report) and the caller goes on (the CLI prints its summary). A second
    signal stops at once (Lightning's own KeyboardInterrupt handling, no checkpoint). In a
    multi-process run, a signal on any rank stops every rank at the same step.

    At the end of training (a signal, ``max_steps``, the last epoch), if no checkpoint of the
    last step exists yet, one is saved beside the ``ModelCheckpoint``'s (same folder and file
    name pattern). Before a validation that a ``ModelCheckpoint`` follows, saving is left to
    it, so a step is not written twice. Nothing is saved under ``fast_dev_run`` or with
    checkpointing disabled.

    Attributes:
        stop_signal: ``"SIGINT"`` / ``"SIGTERM"`` when a signal stopped the last fit, else None.
        start_step: the global step the last fit started from (0, or the resumed checkpoint's).
        checkpoint_path: the checkpoint this callback saved, if any.

    Args:
        signals: which signals stop cleanly (``"SIGINT"``, ``"SIGTERM"``).

    Example:
        >>> stop = CheckpointOnStop(signals=["SIGTERM"])
        >>> stop.stop_signal is None
        True
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGINT", "SIGTERM")) -> None:
        unknown = [name for name in signals if name not in _SIGNALS]
        if unknown:
            raise ValueError(f"CheckpointOnStop: signals={list(signals)} has {unknown}; use {sorted(_SIGNALS)}.")
        self.signals = tuple(signals)
        self.stop_signal: str | None = None
        self.start_step = 0
        self.checkpoint_path: str | None = None
        self.checkpoint_step: int | None = None
        self._received: str | None = None
        self._previous: dict[int, Any] = {}

    # -- signals -----------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._received is not None:
            # The second signal: give up waiting for the step (Lightning shuts down without a checkpoint).
            self._restore_handlers()
            raise KeyboardInterrupt
        self._received = name
        hint = " (Ctrl-C again to quit now, without a checkpoint)" if name == "SIGINT" else ""
        print(
            f"\nlightning-memopt: {name} received: finishing this step, then saving a checkpoint{hint}.",
            file=sys.stderr,
            flush=True,
        )

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for name in self.signals:
            signum = _SIGNALS[name]
            # Installed at on_train_start, after Lightning registered its own SIGTERM notifier,
            # which would otherwise raise out of the loop at the next batch.
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- hooks -------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop_signal, self.checkpoint_path, self.checkpoint_step, self._received = None, None, None, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_step = trainer.global_step  # after a resume: the checkpoint's step
        if self.start_step:
            loader = getattr(trainer.fit_loop, "_combined_loader", None)
            resumable = loader is not None and all(hasattr(dl, "load_state_dict") for dl in loader.flattened)
            rank_zero_info(
                f"Resuming from step {self.start_step}: "
                + (
                    "the data stream continues with the next unseen batch."
                    if resumable
                    else "the training data restarts its epoch (the dataloader keeps no state)."
                )
            )
        self._install_handlers()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        received = self._received is not None
        if trainer.world_size > 1:
            # Every rank must stop at the same step (the checkpoint is a collective save).
            received = bool(trainer.strategy.reduce_boolean_decision(received, all=False))
        if not received or trainer.should_stop or _accumulates(trainer):
            return
        self.stop_signal = self._received or "a signal on another rank"
        trainer.should_stop = True  # this batch still runs: the step it starts is completed

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if _is_last_step(trainer) and not _checkpoint_follows_validation(trainer):
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        if trainer.global_step > self.start_step and not _has_checkpoint_of_step(trainer, self.checkpoint_step):
            self._save(trainer)  # e.g. a ModelCheckpoint that waited for a metric that never came

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # -- saving ------------------------------------------------------------------------------------

    def _save(self, trainer: pl.Trainer) -> None:
        callback = trainer.checkpoint_callback
        if trainer.fast_dev_run or callback is None or self.checkpoint_step == trainer.global_step:
            return
        metrics = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            path = Path(callback.format_checkpoint_name(metrics))  # its folder and file name pattern
        else:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "epoch={epoch}-step={step}.ckpt"
            path = Path(str(path).format(**metrics))
        trainer.save_checkpoint(path, weights_only=False)  # a full, resumable checkpoint
        self.checkpoint_path, self.checkpoint_step = str(path), trainer.global_step


def _accumulates(trainer: pl.Trainer) -> bool:
    """Whether the batch starting now only accumulates gradients (no optimizer step ends it)."""
    try:
        return bool(trainer.fit_loop.epoch_loop._should_accumulate())
    except Exception:  # a Lightning without the private helper: stop at any batch
        return False


def _is_last_step(trainer: pl.Trainer) -> bool:
    if trainer.should_stop:
        return True
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    loop = trainer.fit_loop
    max_epochs = loop.max_epochs
    is_last_batch = loop.epoch_loop.batch_progress.is_last_batch
    return bool(
        is_last_batch and max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    )


def _checkpoint_follows_validation(trainer: pl.Trainer) -> bool:
    """Whether a validation runs after this batch and a ModelCheckpoint saves when it ends."""
    if not any(isinstance(cb, ModelCheckpoint) for cb in trainer.checkpoint_callbacks):
        return False
    loop = trainer.fit_loop
    try:
        return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))
    except Exception:  # cannot tell: save now (at worst the step is saved twice)
        return False


def _has_checkpoint_of_step(trainer: pl.Trainer, own_step: int | None) -> bool:
    step = trainer.global_step
    if own_step == step:
        return True
    return any(getattr(cb, "_last_global_step_saved", None) == step for cb in trainer.checkpoint_callbacks)

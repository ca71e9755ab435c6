"""``StepProgressBar``: one bar over the run's optimizer steps (``120/300``), its ETA from the
first step, and the few metrics worth watching, in 80 columns.

Lightning's bar counts batches per epoch (``Epoch 0/-2`` for a ``max_steps`` run) and prints
every progress-bar metric with its full name plus ``v_num`` (the logger's version, e.g.
``v_num: ollo`` for a folder named ``apollo``), which wraps on a terminal of 80 columns.

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import StepProgressBar
    >>> trainer = L.Trainer(callbacks=[StepProgressBar()], max_steps=300, accelerator="cpu")
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import CustomBarColumn
from rich.progress import ProgressColumn, Task, TextColumn
from rich.text import Text

# Progress-bar metric -> the short label shown; metrics not listed keep their last path part.
SHORT_NAMES = {"train/loss": "loss", "val/loss": "val", "train/tokens_per_s": "tok/s"}


def _format_value(name: str, value: Any) -> str:
    if isinstance(value, (int, float)):
        if name == "tok/s" or abs(value) >= 1000:
            return f"{value / 1000:.1f}k" if abs(value) >= 1000 else f"{value:.0f}"
        return f"{value:.3f}"
    return str(value)


def short_metrics(metrics: dict[str, Any]) -> dict[str, str]:
    """The progress bar's metrics with short names and values, without ``v_num``.

    Example:
        >>> short_metrics({"train/loss": 6.5071, "v_num": 0, "train/tokens_per_s": 4700.9, "val/loss": 6.47})
        {'loss': '6.507', 'tok/s': '4.7k', 'val': '6.470'}
    """
    shown: dict[str, str] = {}
    for name, value in metrics.items():
        if name == "v_num":
            continue
        label = SHORT_NAMES.get(name, name.rsplit("/", 1)[-1])
        shown[label] = _format_value(label, value)
    return shown


class _StepsColumn(ProgressColumn):
    """``done/total`` steps, with elapsed time and the ETA from this run's pace."""

    def render(self, task: Task) -> Text:
        total = int(task.total) if task.total is not None else None
        done = int(task.completed)
        text = f"{done}/{total}" if total is not None else f"{done}"
        started = task.fields.get("started_at")
        first = task.fields.get("first_step")
        if started is not None and first is not None:
            elapsed = time.monotonic() - started
            ran = done - first
            eta = "-:--" if not ran or total is None else _clock(elapsed / ran * max(total - done, 0))
            text += f" {_clock(elapsed)} eta {eta}"
        return Text(text, style="progress.download")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counted in optimizer steps over the whole run.

    The training bar reads ``train ━━━━━━━ 120/300 0:52 eta 1:18 loss 5.113 val 5.201 tok/s
    4.7k``: steps done of ``max_steps`` (or of what the epochs amount to), across epochs and
    from the resumed step after a resume; the time so far and the remaining time at this run's
    pace, from the first step on; the progress-bar metrics under short names (``loss``,
    ``val``, ``tok/s``), without ``v_num``. Validation, test and predict bars are Lightning's.

    Example:
        >>> bar = StepProgressBar()
        >>> bar.train_description
        'train'
    """

    train_description = "train"

    def __init__(self, refresh_rate: int = 1, leave: bool = False, **kwargs: Any) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave, **kwargs)

    def configure_columns(self, trainer: pl.Trainer) -> list:
        columns = super().configure_columns(trainer)
        bar = next((c for c in columns if isinstance(c, CustomBarColumn)), None)
        if bar is not None:
            # 80 columns hold "train", the bar, "300/300 16:01 eta 0:00" and three metrics.
            bar.bar_width = 12
        if trainer.state.fn != "fit":
            return columns
        return [TextColumn("[progress.description]{task.description}"), bar, _StepsColumn()]

    def _total_steps(self, trainer: pl.Trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # an iterable dataset without a length
            return None
        return int(total) if total != float("inf") else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_disabled:
            return
        if self.progress is None or self._progress_stopped:
            self._init_progress(trainer)
        if self.progress is not None and self.train_progress_bar_id is None:
            # One task for the whole run (not reset per epoch), counted in optimizer steps.
            self.train_progress_bar_id = self.progress.add_task(
                self.train_description,
                total=self._total_steps(trainer),
                completed=trainer.global_step,
                started_at=time.monotonic(),
                first_step=trainer.global_step,
            )
        self.refresh()

    def _initialize_train_progress_bar_id(self) -> None:
        self.on_train_epoch_start(self.trainer, self.trainer.lightning_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return short_metrics(super().get_metrics(trainer, pl_module))

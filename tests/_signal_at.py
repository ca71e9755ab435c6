"""A test callback for the CLI's subprocess tests: the process sends itself a real signal (as
Ctrl-C or a scheduler would) when training reaches a given optimizer step."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signal_name`` to this process after optimizer step ``step``."""

    def __init__(self, step: int = 3, signal_name: str = "SIGINT") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
